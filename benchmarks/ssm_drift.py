"""Drift of a recurrent state kept in a low-precision format, measured against the a-priori
bound :func:`attnprec.analysis.bounds.ssm.state_drift_bound` (results in
benchmarks/results/ssm_drift.json, table in docs/bounds/ssm.md).

The state ``h_t = a h_{t-1} + b_t`` of one SSM channel (``a = exp(delta A)``, the decay
``lambda``) is stored in ``fmt`` after every step; the step runs in ``fmt`` itself (the
state updated in place, ``compute = fmt``) or in float32 (``compute = fp32``: a float32
kernel that keeps its state cache in ``fmt``). Every operation is emulated exactly (one
rounding from float64, :func:`attnprec.analysis.precision.round_to`), on ``--rows``
independent sequences, against the float64 recurrence (its own error, at most ``2^-52 T
max|h|``, is negligible at these T and reported). Inputs ``b_t``: standard normal
(random signs) or ``|N(0, 1)|`` (one sign: the state grows to ``1 / (1 - lambda)`` and
each step adds a term far below its ulp).

Measured per (fmt, compute, lambda, inputs, T): ``drift`` = ``max_{t<=T} |h^_t - h_t| /
max_{t<=T} |h^_t|`` (the bound's unit) and the median over sequences of the final
relative error ``|h^_T - h_T| / |h_T|`` (what users report).

Run: ``python benchmarks/ssm_drift.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from attnprec.analysis.bounds.ssm import state_drift_bound
from attnprec.analysis.precision import Format, round_to

RESULTS = Path(__file__).parent / "results"
CHECKPOINTS = (256, 1024, 4096, 16384, 65536)
DECAYS = (1.0 - 1e-2, 1.0 - 1e-4, 1.0 - 1e-7, 1.0)


def _rnd(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    if fmt.name == "fp32":
        return x.float().double()
    return round_to(x, fmt)


def run(fmt_name: str, compute_name: str, T: int, rows: int) -> list:
    """Every decay of :data:`DECAYS` and both input kinds at once (one batch of
    ``configs x rows`` sequences), state in ``fmt``, step in ``compute``."""
    fmt, comp = Format.of(fmt_name), Format.of(compute_name)
    g = torch.Generator().manual_seed(0)
    configs = [(lam, kind) for lam in DECAYS for kind in ("signed", "positive")]
    # the decays as computed (rounded to compute), one per config: [configs, 1]
    a = _rnd(torch.tensor([[lam] for lam, _ in configs], dtype=torch.float64), comp)
    positive = torch.tensor([[kind == "positive"] for _, kind in configs])
    shape = (len(configs), rows)
    h = torch.zeros(shape, dtype=torch.float64)
    e = torch.zeros(shape, dtype=torch.float64)
    err = torch.zeros(shape, dtype=torch.float64)
    big = torch.zeros(shape, dtype=torch.float64)
    out = []
    step = 4096
    for t0 in range(0, T, step):
        b = torch.randn(step, *shape, generator=g, dtype=torch.float64)
        b = _rnd(torch.where(positive, b.abs(), b), fmt)
        for i in range(step):
            h = _rnd(_rnd(_rnd(a * h, comp) + b[i], comp), fmt)
            e = a * e + b[i]
            err = torch.maximum(err, (h - e).abs())
            big = torch.maximum(big, h.abs())
            t = t0 + i + 1
            if t not in CHECKPOINTS or t > T:
                continue
            drift = (err / big.clamp_min(1e-300)).amax(-1)
            rel = ((h - e).abs() / e.abs().clamp_min(1e-300)).median(-1).values
            for c, (lam, kind) in enumerate(configs):
                ac = float(a[c, 0])
                bound = state_drift_bound(fmt, t, decay=abs(ac), compute=comp)
                typ = state_drift_bound(fmt, t, decay=abs(ac), compute=comp, confidence=1 - 1e-6)
                d = float(drift[c])
                out.append(
                    {
                        "fmt": fmt_name,
                        "compute": compute_name,
                        "lambda": lam,
                        "lambda_computed": ac,
                        "inputs": kind,
                        "T": t,
                        "drift": d,
                        "final_rel_median": float(rel[c]),
                        "bound": bound,
                        "typical_bound": typ,
                        "bound_over_drift": bound / d if d > 0 else math.inf,
                        "holds": d <= bound,
                        "typical_holds": d <= typ,
                        "float64_ref_error_max": 2.0**-52 * t,
                    }
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="T up to 4096, 16 rows")
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    T = 4096 if args.quick else CHECKPOINTS[-1]
    rows = 16 if args.quick else args.rows
    torch.set_num_threads(1)
    results = []
    t_start = time.time()
    for fmt in ("bf16", "fp16", "fp32"):
        for comp in sorted({fmt, "fp32"}):
            results += run(fmt, comp, T, rows)
            print(fmt, comp, f"{time.time() - t_start:.0f}s", flush=True)
    meta = {
        "rows": rows,
        "T_max": T,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "violations": sum(not r["holds"] for r in results),
        "typical_exceeded": sum(not r["typical_holds"] for r in results),
    }
    name = "ssm_drift_quick.json" if args.quick else "ssm_drift.json"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
