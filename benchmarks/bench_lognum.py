"""Speed and accuracy of attnprec.lognum (results in benchmarks/results/lognum*.json).

Run: ``python benchmarks/bench_lognum.py [--quick] [--accuracy-only]``. Timings are medians of
interleaved repetitions, measured side by side in one run; accuracy is against
mpmath (elementwise) and a float64 sequential loop (linear recurrence).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import mpmath
import numpy as np
import scipy.special
import torch

from attnprec.lognum import (
    ComplexLog,
    SignedLog,
    linear_recurrence,
    log1mexp,
    log1pexp,
    logaddexp,
    logsubexp,
    logsumexp,
)

RESULTS = Path(__file__).parent / "results"


def medians(fns: dict, reps: int, block: int = 3) -> dict[str, float]:
    """Median seconds per call over ``reps`` rounds; in each round every candidate runs
    once untimed, then ``block`` timed calls. Rounds interleave the candidates against
    drift; the untimed call keeps each timing out of its neighbour's wake (a call right
    after another candidate's 10^6-element passes runs on evicted caches and freed
    memory: torch.logsumexp took 25 % longer after SignedLog.sum than after itself)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            f()
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_reductions(n: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)  # positive data: logs of the values
    pos = SignedLog(x)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1, 1).to(torch.int8)
    mixed = SignedLog(x, signs)
    # Outside the direct range [-600, 700 - log n]: logs near 700 take the block-shifted
    # paths, logs spread over +-3000 (more than 600 inside a block) the exact scan.
    high = SignedLog(x * 30 + 700, signs)
    wide = SignedLog(x * 1000, signs)
    z = pos.to_complex()  # complex64 GOOM form
    cpos = ComplexLog(z)
    # The floor of any sum that rounds once from float64: widen, float64 exp, sum.
    buf = torch.empty(n, dtype=torch.float64)
    out: dict = {}
    out["sum"] = medians(
        {
            "torch.logsumexp (fp32)": lambda: torch.logsumexp(x, 0),
            "float64 exp + sum alone (the floor)": lambda: buf.copy_(x).exp_().sum(),
            "SignedLog.sum (positive)": lambda: pos.sum(),
            "SignedLog.sum (random signs)": lambda: mixed.sum(),
            "SignedLog.sum (random signs, logs near 700)": lambda: high.sum(),
            "SignedLog.sum (random signs, logs +-3000)": lambda: wide.sum(),
            "ComplexLog.sum": lambda: cpos.sum(),
            "torch.logsumexp (complex64, GOOM)": lambda: torch.logsumexp(z, 0),
        },
        reps,
    )
    out["cumsum"] = medians(
        {
            "torch.logcumsumexp (fp32)": lambda: torch.logcumsumexp(x, 0),
            "SignedLog.cumsum (positive)": lambda: pos.cumsum(0),
            "SignedLog.cumsum (random signs)": lambda: mixed.cumsum(0),
            "SignedLog.cumsum (random signs, logs near 700)": lambda: high.cumsum(0),
            "SignedLog.cumsum (random signs, logs +-3000)": lambda: wide.cumsum(0),
            "ComplexLog.cumsum": lambda: cpos.cumsum(0),
            "torch.logcumsumexp (complex64, GOOM)": lambda: torch.logcumsumexp(z, 0),
        },
        max(3, reps // 2),
    )
    # float64 results are computed in double-double and rounded once (lognum/_dd.py).
    x64 = x.double()
    pos64, mixed64 = SignedLog(x64), SignedLog(x64, signs)
    out["sum_float64"] = medians(
        {
            "torch.logsumexp (fp64)": lambda: torch.logsumexp(x64, 0),
            "scipy.special.logsumexp (fp64)": lambda: scipy.special.logsumexp(x64.numpy()),
            "SignedLog.sum (fp64, positive)": lambda: pos64.sum(),
            "SignedLog.sum (fp64, random signs)": lambda: mixed64.sum(),
        },
        reps,
    )
    # The targets: within 2x of torch's float32 op, faster than complex64.
    for op, ref, goom in (
        ("sum", "torch.logsumexp (fp32)", "torch.logsumexp (complex64, GOOM)"),
        ("cumsum", "torch.logcumsumexp (fp32)", "torch.logcumsumexp (complex64, GOOM)"),
    ):
        t = out[op]
        out[f"{op}_ratios"] = {
            k: {"vs_fp32": t[k] / t[ref], "vs_complex64": t[k] / t[goom]}
            for k in t
            if k.startswith(("SignedLog", "float64"))
        }
    return out


def goom_recurrence(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """The complex-log recipe: log with an eps clamp, cumsum + logcumsumexp, complex64."""
    ca = torch.where(a.abs() < eps, eps, a).to(torch.complex64)
    cb = torch.where(b.abs() < eps, eps, b).to(torch.complex64)
    la, lb = torch.log(ca), torch.log(cb)
    big_a = torch.cumsum(la, 0)
    return torch.exp(big_a + torch.logcumsumexp(lb - big_a, 0)).real


def sequential64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact-enough reference: the float64 loop on Python floats (~1 s for 10^6)."""
    out, x = [], 0.0
    for ai, bi in zip(a.double().tolist(), b.double().tolist(), strict=True):
        x = ai * x + bi
        out.append(x)
    return torch.tensor(out, dtype=torch.float64)


def bench_recurrence(n: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(n, generator=g) * 2 - 1).to(torch.float32)  # random signs, |a| < 1
    b = torch.randn(n, generator=g).to(torch.float32)
    ref = sequential64(a, b)
    ours = linear_recurrence(a, b).double()
    goom = goom_recurrence(a, b).double()

    def errs(v: torch.Tensor) -> dict:
        rel = ((v - ref).abs() / ref.abs()).nan_to_num(nan=math.inf)
        return {
            "max_rel": float(rel.max()),
            "median_rel": float(rel.median()),
            "max_abs_over_max_ref": float((v - ref).abs().max() / ref.abs().max()),
        }

    t = medians(
        {
            "linear_recurrence": lambda: linear_recurrence(a, b),
            "complex-log recipe": lambda: goom_recurrence(a, b),
        },
        reps,
    )
    e_ours, e_goom = errs(ours), errs(goom)
    return {
        "n": n,
        "time_s": t,
        "error": {"linear_recurrence": e_ours, "complex-log recipe": e_goom},
        "max_rel_ratio": e_goom["max_rel"] / e_ours["max_rel"],
    }


# --- accuracy of the elementwise functions against mpmath ---------------------------


def _ulp(x: float, p: int) -> float:
    _, e = math.frexp(max(abs(x), 1.0))
    return math.ldexp(1.0, e - p)


def accuracy(samples: int) -> dict:
    mpmath.mp.prec = 300
    rng = np.random.default_rng(2)
    out: dict = {}
    for dt, p in ((torch.float32, 24), (torch.float64, 53)):
        npdt = np.float32 if dt == torch.float32 else np.float64
        # log-uniform magnitudes from e^-20 to the largest float, both signs, switch points
        top = math.log(float(np.finfo(npdt).max)) * 0.999
        mags = np.exp(rng.uniform(-20, top, samples))
        x = (mags * rng.choice([-1.0, 1.0], samples)).astype(npdt)
        x = np.concatenate([x, np.array([-math.log(2), -1e-7, 18.0, 33.3, -37.0], dtype=npdt)])
        y = (
            x - np.abs(rng.normal(size=x.size)) * np.abs(x) * 10.0 ** rng.uniform(-8, 0, x.size)
        ).astype(npdt)
        a = torch.from_numpy(x)
        cases = {
            "log1mexp": (
                lambda t: log1mexp(-t.abs()),
                lambda v: mpmath.log(-mpmath.expm1(-abs(v[0]))),
            ),
            "log1pexp": (
                log1pexp,
                lambda v: mpmath.log1p(mpmath.exp(v[0])) if v[0] < 1e4 else mpmath.mpf(v[0]),
            ),
        }
        res = {}
        for name, (fn, ref) in cases.items():
            got = fn(a).double().tolist()
            e = [
                float(abs(mpmath.mpf(g) - ref((float(v),))) / _ulp(float(ref((float(v),))), p))
                for g, v in zip(got, x, strict=True)
                if v != 0
            ]
            res[name] = (max(e), statistics.mean(e))
        hi, lo = np.maximum(x, y), np.minimum(x, y)
        th, tl = torch.from_numpy(hi), torch.from_numpy(lo)

        def r_add(h: float, l: float) -> mpmath.mpf:
            return mpmath.mpf(h) + (
                mpmath.log1p(mpmath.exp(mpmath.mpf(l) - h)) if h - l < 3000 else 0
            )

        def r_sub(h: float, l: float) -> mpmath.mpf:
            return mpmath.mpf(h) + (
                mpmath.log(-mpmath.expm1(mpmath.mpf(l) - h)) if h - l < 3000 else 0
            )

        for name, fn, ref in (("logaddexp", logaddexp, r_add), ("logsubexp", logsubexp, r_sub)):
            got = fn(th, tl).double().tolist()
            e = []
            for g, h, l in zip(got, hi.tolist(), lo.tolist(), strict=True):
                if h == l:
                    continue
                want = ref(h, l)
                e.append(float(abs(mpmath.mpf(g) - want) / _ulp(float(want), p)))
            res[name] = (max(e), statistics.mean(e))
        out[str(dt).replace("torch.", "")] = res
    return out


def accuracy_vs_scipy(rows: int, n: int) -> dict:
    """Signed logsumexp error (in ulps of max(|exact|, 1)) of ours and SciPy's, per dtype."""
    mpmath.mp.prec = 300
    rng = np.random.default_rng(3)
    out = {}
    for npdt, p in ((np.float32, 24), (np.float64, 53)):
        a = (rng.normal(size=(rows, n)) * 3).astype(npdt)
        b = rng.choice([-1.0, 1.0], size=(rows, n)).astype(npdt)
        b[:, 0] = 1.0
        a[:, 0] += 3.0  # keep the sums well-conditioned
        sc, _ = scipy.special.logsumexp(a, axis=1, b=b, return_sign=True)
        ours = logsumexp(torch.from_numpy(a), 1, b=torch.from_numpy(b), return_sign=True)[0]
        ours = ours.double().numpy()
        e_s, e_o = [], []
        for i in range(rows):
            ex = mpmath.log(
                abs(
                    mpmath.fsum(
                        mpmath.mpf(float(w)) * mpmath.exp(mpmath.mpf(float(v)))
                        for v, w in zip(a[i], b[i], strict=True)
                    )
                )
            )
            u = _ulp(float(ex), p)
            e_s.append(float(abs(mpmath.mpf(float(sc[i])) - ex) / u))
            e_o.append(float(abs(mpmath.mpf(float(ours[i])) - ex) / u))
        out[np.dtype(npdt).name] = {
            "scipy": (max(e_s), statistics.mean(e_s)),
            "attnprec": (max(e_o), statistics.mean(e_o)),
            "attnprec_worse_rows": int(sum(o > s for o, s in zip(e_o, e_s, strict=True))),
            "rows": rows,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument(
        "--accuracy-only",
        action="store_true",
        help="the accuracy figures alone (no timings): results/lognum_accuracy.json",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy_only:
        import datetime

        res = {
            "date": datetime.date.today().isoformat(),
            "machine": {"platform": platform.platform(), "torch": torch.__version__},
            "accuracy_elementwise_ulps": accuracy(300 if args.quick else 3000),
            "accuracy_vs_scipy_ulps": accuracy_vs_scipy(100 if args.quick else 1000, 16),
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "lognum_accuracy.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return
    n = 10_000 if args.quick else 1_000_000
    reps = 5 if args.quick else 21
    res = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "reductions_1e6_fp32": bench_reductions(n, reps),
        "recurrence_fp32": bench_recurrence(n, max(3, reps // 4)),
        "accuracy_elementwise_ulps": accuracy(300 if args.quick else 3000),
        "accuracy_vs_scipy_ulps": accuracy_vs_scipy(100 if args.quick else 1000, 16),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "lognum_quick" if args.quick else "lognum"
    name += f"_threads{args.threads}.json" if args.threads else ".json"
    (RESULTS / name).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
