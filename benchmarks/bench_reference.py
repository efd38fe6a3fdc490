"""Speed and tightness of the certified references (docs/reference.md).

Measures, side by side in one run:

1. arb vs mpmath backends on softmax (and every method) at n=128, d=16: median seconds.
2. the certified float64 backend at n=16384, d=64 (softmax non-causal and causal, causal
   soft-capped at 30, log, causal taylor degree 2, causal linear over exp features):
   median seconds and the radius relative to |value| and to max_j |v_jc|.
3. a cross-check at n=512, d=64: the float64 ball overlaps the arb ball everywhere.

``--streaming``: only the streamed references (docs/reference.md, "Size" and "Sliding
windows and key masks"), causal, d = 16, each with its time and largest radius: arb
softmax every row of 4096 (row blocks), the tropical semiring every row of 16,384, arb
with 256 sampled rows of 2000 tokens (softmax, log, FAVOR+), and the float64 backend
with a window of 512 (softmax, taylor, log, linear, FAVOR+) and a 90% key mask (softmax,
log, linear, taylor) over every row of 4096; writes benchmarks/results/reference_streaming.json.

Run: ``python benchmarks/bench_reference.py [--quick] [--streaming]``; writes
benchmarks/results/reference.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from attnprec.analysis.reference import reference

RESULTS = Path(__file__).parent / "results" / "reference.json"
STREAMING = RESULTS.with_name("reference_streaming.json")


class _Terms:
    terms = ((0.75, 0.5), (0.25, 2.0))


def _median_time(fn, reps):
    times = []
    out = None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))


def _streaming(quick: bool) -> None:
    """The ``--streaming`` cases (module docstring), one measurement each."""
    from attnprec.attention import Tropical
    from attnprec.attention.favor import favor_projection

    n1, n2, n3 = (256, 1024, 256) if quick else (4096, 16384, 2000)
    g = torch.Generator().manual_seed(0)
    km = torch.rand(n1, generator=g) > 0.1
    km[0] = True
    cases = [
        ("arb softmax, every row", n1, "softmax", {"backend": "arb"}),
        ("tropical, every row", n2, "semiring", {"semiring": Tropical()}),
        ("arb softmax, 256 rows", n3, "softmax", {"backend": "arb", "rows": 256}),
        ("arb log, 256 rows", n3, "log", {"backend": "arb", "rows": 256}),
        ("arb favor (64), 256 rows", n3, "favor",
         {"backend": "arb", "rows": 256, "projection": favor_projection(64, 16, generator=g)}),
        ("float64 softmax, window 512", n1, "softmax", {"backend": "float64", "window": 512}),
        ("float64 softmax, key mask", n1, "softmax", {"backend": "float64", "key_mask": km}),
        ("float64 log, key mask", n1, "log", {"backend": "float64", "key_mask": km}),
        ("float64 linear, key mask", n1, "linear", {"backend": "float64", "key_mask": km}),
        ("float64 taylor 2, key mask", n1, "taylor",
         {"backend": "float64", "key_mask": km, "degree": 2}),
        ("float64 taylor 2, window 512", n1, "taylor",
         {"backend": "float64", "window": 512, "degree": 2}),
        ("float64 log, window 512", n1, "log", {"backend": "float64", "window": 512}),
        ("float64 linear, window 512", n1, "linear", {"backend": "float64", "window": 512}),
        ("float64 favor (64), window 512", n1, "favor",
         {"backend": "float64", "window": 512, "projection": favor_projection(64, 16,
                                                                              generator=g)}),
    ]  # fmt: skip
    out = {"machine": platform.processor() or platform.machine(), "quick": quick, "cases": []}
    for name, n, method, kw in cases:
        q, k, v = _inputs(n, 16)
        t, r = _median_time(
            lambda m=method, q=q, k=k, v=v, kw=kw: reference(m, q, k, v, causal=True, **kw), 1
        )
        row = {"case": name, "n": n, "seconds": t, "max_radius": float(r.radius.max())}
        out["cases"].append(row)
        print(f"| {name} | {n} | {t:.2f} s | {row['max_radius']:.1e} |", flush=True)
    STREAMING.write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--streaming", action="store_true", help="only the streamed references")
    args = ap.parse_args()
    if args.streaming:
        _streaming(args.quick)
        return
    n_small, n_big, reps = (32, 2048, 1) if args.quick else (128, 16384, 3)
    res: dict = {
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
    }

    q, k, v = _inputs(n_small, 16)
    reference("softmax", q[:2], k[:2], v[:2], backend="arb")  # warm imports
    methods = {
        "softmax": {},
        "log": {},
        "taylor": {"degree": 2},
        "linear": {},
        "favor": {"projection": torch.randn(32, 16, dtype=torch.float64)},
        "semiring": {"semiring": _Terms()},
    }
    small = {}
    for m, kw in methods.items():
        row = {}
        for be in ("arb", "mpmath"):
            r_reps = reps if (be == "arb" or m == "softmax") else 1
            t, r = _median_time(
                lambda m=m, kw=kw, be=be: reference(m, q, k, v, backend=be, **kw), r_reps
            )
            row[be] = {"seconds": t, "max_radius": float(r.radius.max())}
        row["speedup"] = row["mpmath"]["seconds"] / row["arb"]["seconds"]
        small[m] = row
    res["ball_backends"] = {"n": n_small, "d": 16, "methods": small}

    big = {}
    f64_cases = (
        ("softmax", False, {}),
        ("softmax", True, {}),
        ("softmax", True, {"softcap": 30.0}),
        ("log", False, {}),
        ("taylor", True, {"degree": 2}),
        ("linear", True, {"feature_map": torch.exp}),
    )
    for method, causal, params in f64_cases:
        q, k, v = _inputs(n_big, 64, seed=1)
        t, r = _median_time(
            lambda q=q, k=k, v=v, m=method, c=causal, p=params: reference(
                m, q, k, v, causal=c, backend="float64", **p
            ),
            reps,
        )
        rel = r.radius / r.value.abs()
        rel_v = r.radius / v.abs().amax(dim=-2, keepdim=True)
        cap = f" softcap {params['softcap']:g}" if "softcap" in params else ""
        big[f"{method}{' causal' if causal else ''}{cap}"] = {
            "seconds": t,
            "median_radius_over_value": float(rel.median()),
            "max_radius_over_max_v": float(rel_v.max()),
        }
    res["float64_backend"] = {"n": n_big, "d": 64, **big}

    q, k, v = _inputs(512 if not args.quick else 64, 64, seed=2)
    ra = reference("softmax", q, k, v, backend="arb")
    rf = reference("softmax", q, k, v, backend="float64")
    overlap = bool(((ra.value - rf.value).abs() <= ra.radius + rf.radius).all())
    res["cross_check"] = {
        "n": q.shape[0],
        "d": 64,
        "overlap": overlap,
        "max_abs_diff": float((ra.value - rf.value).abs().max()),
        "max_float64_radius": float(rf.radius.max()),
        "max_arb_radius": float(ra.radius.max()),
    }

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"| method | arb s | mpmath s | speedup |  (n={n_small}, d=16)")
    print("|---|---|---|---|")
    for m, row in small.items():
        a, b = row["arb"]["seconds"], row["mpmath"]["seconds"]
        print(f"| {m} | {a:.3f} | {b:.2f} | {row['speedup']:.0f}x |")
    for key, row in big.items():
        print(
            f"float64 {key} n={n_big} d=64: {row['seconds']:.1f} s, median radius/|value| "
            f"{row['median_radius_over_value']:.2e}, max radius/max|v| "
            f"{row['max_radius_over_max_v']:.2e}"
        )
    print("cross-check:", res["cross_check"])


if __name__ == "__main__":
    main()
