"""The log-space selective scan against the complex-log (GOOM / heinsen_sequence) recipe at
10^6 steps: accuracy and time (results in benchmarks/results/ssm_logscan.json, table in
docs/methods/selective_scan.md). Follows benchmarks/bench_lognum.py's comparison for
``linear_recurrence``.

The scan: ``h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[n] u_t[d]``,
``y_t[d] = sum_n C_t[n] h_t[d, n]`` (Euler's B_bar), float32 inputs with random signs.

- ``selective_scan_log``: SignedLog states, :func:`attnprec.lognum.linear_recurrence`
  (float64 inside, rounded once);
- the complex-log recipe: ``log b = log(B_bar u)`` in complex64 (``i pi`` for negative
  values), ``A* = cumsum(delta A)``, ``h = Re exp(A* + logcumsumexp(log b - A*))``,
  ``y = sum_n C h`` (float32);
- reference: the float64 recurrence on Python floats (its error, at most about ``T 2^-52``
  of the absolute-value recurrence, is far below both).

Errors are reported relative to ``|y|`` (max and median) and relative to ``sum_n |C| T``
(``T`` the recurrence on absolute values: the scale the sum is conditioned on; it stays
meaningful where ``y`` cancels to near 0). Run: ``python benchmarks/ssm_logscan.py
[--n N] [--threads K]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from attnprec.attention import selective_scan_log

RESULTS = Path(__file__).parent / "results"


def goom_scan(C, B, u, delta, A):
    """The complex-log recipe in complex64 (float32 inputs)."""
    L = (delta.unsqueeze(-1) * A).float()  # [T, D, N] log-gates (real)
    b = (delta.unsqueeze(-1) * B.unsqueeze(-2) * u.unsqueeze(-1)).float()
    lb = torch.log(b.to(torch.complex64))
    big = torch.cumsum(L, 0).to(torch.complex64)
    h = torch.exp(big + torch.logcumsumexp(lb - big, 0)).real
    return (C.unsqueeze(-2) * h).sum(-1)


def reference64(C, B, u, delta, A):
    """float64 recurrence on Python floats, and the absolute-value recurrence's sum."""
    T, N = C.shape
    Dv = u.shape[1]
    Cl, Bl, ul, dl, Al = (x.double().tolist() for x in (C, B, u, delta, A))
    y = [[0.0] * Dv for _ in range(T)]
    mag = [[0.0] * Dv for _ in range(T)]
    for d in range(Dv):
        for n in range(N):
            g = [math.exp(dl[t][d] * Al[d][n]) for t in range(T)]
            h = ha = 0.0
            for t in range(T):
                w = dl[t][d] * Bl[t][n] * ul[t][d]
                h = g[t] * h + w
                ha = g[t] * ha + abs(w)
                y[t][d] += Cl[t][n] * h
                mag[t][d] += abs(Cl[t][n]) * ha
    return torch.tensor(y, dtype=torch.float64), torch.tensor(mag, dtype=torch.float64)


def errors(y, ref, mag):
    e = (y.double() - ref).abs()
    rel = (e / ref.abs()).nan_to_num(nan=math.inf)
    return {
        "max_rel": float(rel.max()),
        "median_rel": float(rel.median()),
        "max_over_abs_scale": float((e / mag.clamp_min(1e-300)).max()),
        "max_abs_over_max_ref": float(e.max() / ref.abs().max()),
    }


def medians(fns: dict, reps: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10**6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    T, N, Dv = args.n, 4, 2
    C, B = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    u = torch.randn(T, Dv, generator=g)
    # channel 0: Mamba-like steps, A = -(n + 1)/2 (decays of 1e-3 .. 0.2 per step);
    # channel 1: long memory (delta |A| ~ 1e-6 per step)
    delta = torch.stack(
        [10 ** (-3 + 2 * torch.rand(T, generator=g)), 1e-6 * (1 + torch.rand(T, generator=g))], -1
    )
    A = -torch.tensor([[0.5, 1.0, 1.5, 2.0], [1.0, 1.0, 1.0, 1.0]])
    ref, mag = reference64(C, B, u, delta, A)
    ours = selective_scan_log(C, B, u, delta=delta, A=A)
    goom = goom_scan(C, B, u, delta, A)
    out = {
        "n": T,
        "N": N,
        "D": Dv,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "error": {
            "selective_scan_log": errors(ours, ref, mag),
            "complex-log recipe": errors(goom, ref, mag),
        },
        "error_per_channel": {},
        "time_s": {},
    }
    for d, name in ((0, "mamba-like"), (1, "long memory")):
        out["error_per_channel"][name] = {
            "selective_scan_log": errors(ours[:, d], ref[:, d], mag[:, d]),
            "complex-log recipe": errors(goom[:, d], ref[:, d], mag[:, d]),
        }
    for th in args.threads:
        torch.set_num_threads(th)
        out["time_s"][f"{th} thread(s)"] = medians(
            {
                "selective_scan_log": lambda: selective_scan_log(C, B, u, delta=delta, A=A),
                "complex-log recipe": lambda: goom_scan(C, B, u, delta, A),
            },
            args.reps,
        )
    e = out["error"]
    out["max_over_abs_scale_ratio"] = (
        e["complex-log recipe"]["max_over_abs_scale"]
        / e["selective_scan_log"]["max_over_abs_scale"]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ssm_logscan.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
