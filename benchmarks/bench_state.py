"""Bounds evaluated from key states (``evaluation="state"``) against the pair evaluation:
time, peak memory and tightness against n, each measurement in its own process.

- ``pairs`` / ``state``: :func:`attnprec.analysis.bounds.attention_error_bound` of
  ``--method`` (log; taylor of degree 3; linear over elu + 1 features; FAVOR+ with 64
  features; gated with per-channel log-gates ``-softplus(N(0, 1))``), causal, N(0, 1)
  inputs stored in bf16, d = 16, partial sums as values; every row up to ``--full-max``
  for the pairs (above: ``--rows`` sampled rows), every row for the states; for taylor,
  favor and gated :func:`attnprec.analysis.bounds.graphs.rounding_bound` (the first two's
  quantization and approximation are against softmax and stay pair-evaluated; gated's
  quantization is zero on stored inputs); ``gated_quantized``: gated on float32 inputs
  that bf16 storage rounds, the whole bound (quantization and rounding);
- ``audit`` (log): :func:`attnprec.analysis.audit.audit` of a float32 linear-sums log
  kernel (keys shifted by the sequence's per-channel maximum, prefix sums by ``cumsum``)
  with the state evaluation, every row; the kernel's own time left out;
- ``ratio``: the state bound over the pair bound on the rows both evaluate (elements
  where both are finite; the infinite ones counted);
- ``--method selective_scan``: Mamba-1 at its published width (:data:`WIDTH` = 1536
  channels, N = 16 states, zoh, ``delta = softplus(N(0, 1) - 4)``, ``A = -(1..16)``, D = 1),
  C, B, u stored in bf16, T = 2^8..2^14 tokens; the whole bound (quantization and
  rounding); its audit with the method's own PyTorch scan as the kernel (the float64-ball
  reference, every row, the state evaluation); the pairs up to T = 512 (O(T^2) per
  channel), the ratio on 32 sampled rows up to T = 1024;
- ``--method ssd``: Mamba-2 at 130M's shapes (24 heads of 64, N = 128, ``dt =
  softplus(N(0, 1) - 3)``, A = -4, D = 1), bf16, T = 512 and 4096 (the pairs and the
  ratio at 512); ``--method h3``: H3 with d = 64, 4 shift taps, per-channel decays in
  (-0.5, 0], bf16, T = 2048, 16,384 and 131,072 (the pairs and the ratio at 2048), and its
  audit with the method's own PyTorch kernel (every row, the state evaluation).

    python benchmarks/bench_state.py                    # writes results/state.json
    python benchmarks/bench_state.py --method taylor    # results/state_taylor.json
    python benchmarks/bench_state.py --quick            # n = 2^10..2^12

The JSON is rewritten after every measurement (a stopped run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "state.json"


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _kernel(q, k, v, causal=True, scale=None):
    """Log attention in float32 with linear sums: exp(scale k - M) per channel (M the
    sequence's maximum), prefix sums of the values and the normalizer, one division."""
    import torch

    sc = 1.0 if scale is None else scale
    X, Y = sc * q.float(), sc * k.float()
    M = Y.amax(-2, keepdim=True)
    E = torch.exp(Y - M)  # [n, C]
    Q = torch.exp(X + M - (X + M).amax(-1, keepdim=True))  # [n, C]
    S = torch.cumsum(E.unsqueeze(-1) * v.float().unsqueeze(-2), -3)  # [n, C, d_v]
    Z = torch.cumsum(E, -2)
    return (torch.einsum("nc,ncv->nv", Q, S) / (Q * Z).sum(-1, keepdim=True)).to(q.dtype)


#: The bound's keywords per method, and the part of the bound compared.
METHODS = {
    "log": ({}, "total"),
    "taylor": ({"degree": 3}, "rounding"),
    "linear": ({"feature_map": None}, "total"),
    "favor": ({}, "rounding"),  # with a projection of 64 features (drawn in _one)
    "gated": ({}, "rounding"),  # log-gates -softplus(N(0, 1)) per channel (drawn in _one)
    "gated_quantized": ({}, "total"),  # the same on float32 inputs: quantization too
    "selective_scan": ({}, "total"),  # Mamba-1 width (drawn in _one)
    "ssd": ({}, "total"),  # Mamba-2 shapes (drawn in _one)
    "h3": ({}, "total"),  # d = 64, 4 taps (drawn in _one)
}

#: The state-space benchmarks: sizes (log2 T), the largest with the pairs, the largest
#: with the ratio (32 sampled rows).
SSM_PLANS = {"selective_scan": ([8, 9, 10, 12, 14], 9, 10), "ssd": ([9, 12], 9, 9),
             "h3": ([11, 14, 17], 11, 11)}  # fmt: skip

#: Channels (d_inner) of the selective-scan benchmark: Mamba-130M's 2 x 768.
WIDTH = 1536


def _one(method: str, part: str, n: int, rows: int | None) -> dict:
    import torch

    from attnprec.analysis.audit import audit
    from attnprec.analysis.bounds import attention_error_bound
    from attnprec.analysis.bounds.attention import _error_bound, sample_rows
    from attnprec.analysis.precision import Precision

    name = method
    g = torch.Generator().manual_seed(n)
    held = torch.float32 if method == "gated_quantized" else torch.bfloat16
    q, k, v = (torch.randn(n, 16, generator=g).to(held) for _ in range(3))
    if method == "linear":
        q, k = (torch.nn.functional.elu(x.float()).add(1).to(torch.bfloat16) for x in (q, k))
    params, what = METHODS[method]
    if method == "favor":
        from attnprec.attention.favor import favor_projection

        params = {"projection": favor_projection(64, 16, generator=g)}
    if method.startswith("gated"):
        lg = torch.randn(n, 16, generator=g, dtype=torch.float64)
        params = {"log_g": -torch.nn.functional.softplus(lg).float().double()}
        method = "gated"
    if method == "ssd":
        q, k = (torch.randn(24, n, 128, generator=g).to(held) for _ in range(2))
        v = torch.randn(24, n, 64, generator=g).to(held)
        dt = torch.nn.functional.softplus(torch.randn(24, n, generator=g) - 3)
        params = {"dt": dt.to(held).double(), "A": -4.0, "D": torch.ones(64, dtype=torch.float64)}
    if method == "h3":
        q, k, v = (torch.randn(n, 64, generator=g).to(held) for _ in range(3))
        shift = (torch.randn(64, 4, generator=g) / 2).to(held).double()
        params = {
            "shift": shift,
            "log_decay": -(0.5 * torch.rand(64, generator=g)).to(held).double(),
        }
    if method == "selective_scan":
        v = torch.randn(n, WIDTH, generator=g).to(held)
        delta = torch.nn.functional.softplus(torch.randn(n, WIDTH, generator=g) - 4)
        params = {
            "delta": delta.to(held).double(),
            "A": -torch.arange(1, 17, dtype=torch.float64).expand(WIDTH, 16).clone(),
            "D": torch.ones(WIDTH, dtype=torch.float64),
            "discretization": "zoh",
        }

    def levels(*a, **kw):
        """(sound, probabilistic) of the part compared."""
        if what == "rounding":  # the rounding part alone (taylor: not its softmax target)
            eb = _error_bound(method, *a, rounding_only=True, **kw)
            return eb.rounding, eb.typical.rounding
        eb = attention_error_bound(method, *a, **kw)
        return eb.total, eb.typical.total

    bound = lambda *a, **kw: levels(*a, **kw)[0]  # noqa: E731
    ssm = method in SSM_PLANS
    prec = Precision("bf16") if ssm else Precision("bf16", sums="linear")
    causal = {} if ssm else {"causal": True}
    base = _rss_mb()
    out: dict = {"method": name, "part": part, "n": n, "rows": rows}
    t0 = time.perf_counter()
    if part == "audit":
        kt = [0.0]

        if ssm:
            from attnprec.methods import method as record

            scan = record(method).resolve("function")
            kern = lambda q, k, v, **kw: scan(q.float(), k.float(), v.float(), **kw).to(q.dtype)  # noqa: E731
        else:
            kern = _kernel

        def kernel(q, k, v, **kw):
            t = time.perf_counter()
            y = kern(q, k, v, **kw)
            kt[0] += time.perf_counter() - t
            return y

        rep = audit(kernel, method, q, k, v, precision=prec, **causal, **params,
                    bound_options={"evaluation": "state"})  # fmt: skip
        case = rep.cases[0]
        out.update(verdict=case.verdict, elements=case.elements, kernel_s=kt[0])
        out["seconds"] = time.perf_counter() - t0 - kt[0]
    elif part == "ratio":
        idx = sample_rows(n, rows, 0)
        (p, pt), (s, st) = (levels(q, k, v, prec, **causal, rows=idx, evaluation=e, **params)
                            for e in ("pairs", "state"))  # fmt: skip
        fin = torch.isfinite(p) & torch.isfinite(s)
        out.update(
            inf_pairs=int((~torch.isfinite(p)).sum()), inf_state=int((~torch.isfinite(s)).sum())
        )
        for key, (a, b) in (("", (p, s)), ("typical_", (pt, st))):
            r = (b / a)[fin & (a > 0)]
            out.update({key + "median": float(r.median()), key + "p99": float(r.quantile(0.99)),
                        key + "max": float(r.max()), key + "min": float(r.min())})  # fmt: skip
        # the probabilistic level's gain over the sound one, from states
        out["sound_over_typical_median"] = float((s / st)[fin].median())
        out["seconds"] = time.perf_counter() - t0
    else:
        b = bound(q, k, v, prec, **causal, rows=rows, evaluation=part, **params)
        out["bound_median"] = float(b.median())
        out["seconds"] = time.perf_counter() - t0
    out["peak_mb"] = _rss_mb() - base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", nargs=3, metavar=("PART", "N", "ROWS"))
    ap.add_argument("--method", choices=sorted(METHODS), default="log")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full-max", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.one:
        part, n, rows = a.one
        print(json.dumps(_one(a.method, part, int(n), None if rows == "all" else int(rows))))
        return
    out = a.out or (OUT if a.method == "log" else OUT.with_name(f"state_{a.method}.json"))
    ssm = a.method in SSM_PLANS
    sizes = [10, 11, 12] if a.quick else [11, 12, 14, 16, 18, 20]
    if ssm:
        sizes, pairs_max, ratio_max = SSM_PLANS[a.method]
        sizes = sizes[:1] if a.quick else sizes
    results, t_all = [], time.perf_counter()
    for lg in sizes:
        n = 2**lg
        sampled = None if n <= a.full_max else a.rows
        plan = [("state", None), ("audit", None), ("ratio", sampled)]
        if a.method not in ("log", "selective_scan", "h3"):
            plan.remove(("audit", None))
        if lg <= (pairs_max if ssm else 16):
            plan.insert(0, ("pairs", sampled))
        if ssm:  # the pairs' O(T^2) per channel: the ratio on 32 sampled rows
            plan.remove(("ratio", sampled))
            if lg <= ratio_max:
                plan.append(("ratio", 32))
        for part, rows in plan:
            args = ["--method", a.method, "--one", part, str(n)]
            args.append("all" if rows is None else str(rows))
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            p = subprocess.run([sys.executable, __file__, *args], capture_output=True,
                               text=True, env=env)  # fmt: skip
            if p.returncode != 0:
                r = {"part": part, "n": n, "rows": rows, "error": p.stderr.strip()[-300:]}
            else:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"[{time.perf_counter() - t_all:6.0f}s] n=2^{lg} {part:6s} "
                  f"{r.get('error') or r}", flush=True)  # fmt: skip
            meta = {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "python": platform.python_version(),
                "method": a.method,
                "wall_s": time.perf_counter() - t_all,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
