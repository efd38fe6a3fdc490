"""Benchmarks of attnprec.kernels: FLOP/byte counts, speed on a GPU, error/bound ratios.

Run ``python benchmarks/bench_kernels.py``. Writes ``benchmarks/results/kernels_counts.json``
always; on a GPU ``kernels_gpu.json`` (medians of side-by-side timings in one run:
the Taylor kernel vs the published PyTorch algorithm with materialized cumulative sums at
n = 64K, d = 16, degree 3; the log kernel vs Heinsen's PyTorch logcumsumexp form over
[n, d_k, d_v]; both vs ``scaled_dot_product_attention``; decode time per token vs n;
each kernel time also as a fraction of its roofline, ``benchmarks/roofline.py``);
without a GPU, under ``TRITON_INTERPRET=1``, ``kernels_interpreter.json``: the measured
max of error / bound per kernel, dtype and family at small sizes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnprec import kernels as K  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def counts(n: int, d: int, d_v: int, degree: int, block: int = 32) -> dict:
    """FLOPs and HBM bytes (fp16 storage, fp32 state) per head of one causal forward."""
    m = math.comb(d + degree, degree)
    s = 2  # bytes per fp16 element
    io = n * (2 * d + 2 * d_v) * s  # read q, k, v, write y
    return {
        "sizes": {"n": n, "d": d, "d_v": d_v, "degree": degree, "features": m},
        "taylor_kernel": {
            # features (degree products per monomial, both sides), state update and query
            # (2 m d_v each), intra-chunk A (2 block m) and A v (2 block d_v), per token
            "flops": n * (2 * degree * m + 4 * m * d_v + 2 * block * m + 2 * block * d_v),
            # inputs/outputs plus the [m, d_v] state loaded and stored once per chunk
            "bytes": io + math.ceil(n / block) * 2 * m * (d_v + 1) * 4,
        },
        "taylor_pytorch_cumsum": {
            "flops": n * (2 * degree * m + 4 * m * d_v),
            "bytes": io + n * m * d_v * 4 * 3,  # k (x) v written, cumsum read+written
            "intermediate_bytes": n * m * d_v * 4,
        },
        "log_kernel": {
            # per token: shifts and carried part (10 d + 4 d d_v), intra-chunk weights with
            # per-row shifts (3 block d) and a v (4 block d_v); docs/kernels.md
            "flops": n * (10 * d + 4 * d * d_v + 3 * block * d + 4 * block * d_v),
            "exp": n * (block + 2) * d,
            "bytes": io,
        },
        "log_pytorch_logcumsumexp": {
            "flops": n * d * d_v * 3 * 4,  # exp + log + add per element, 3 sign-split passes
            "bytes": io + 3 * n * d * d_v * 4 * 2,
            "intermediate_bytes": 3 * n * d * d_v * 4,
        },
        "sdpa_causal": {"flops": 2 * n * n * (d + d_v), "bytes": io},
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn, reps: int = 10) -> float:
    fn()
    _sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def taylor_pytorch(q, k, v, degree):
    """The published algorithm: features, cumulative sums materialized over [n, m, d_v]."""
    from attnprec.attention.taylor import taylor_features, taylor_multinomials

    d = q.shape[-1]
    sc = 1 / math.sqrt(d)
    fq = torch.cat(
        [taylor_features(q.float() * sc, p) * taylor_multinomials(d, p, dtype=torch.float32)
         .to(q.device) / math.factorial(p) for p in range(degree + 1)], -1)  # fmt: skip
    fk = torch.cat([taylor_features(k.float(), p) for p in range(degree + 1)], -1)
    kv = torch.cumsum(fk.unsqueeze(-1) * v.float().unsqueeze(-2), -3)
    z = torch.cumsum(fk, -2)
    return ((fq.unsqueeze(-2) @ kv).squeeze(-2) / (fq * z).sum(-1, keepdim=True)).to(q.dtype)


def log_pytorch(q, k, v):
    """Heinsen's published form: logcumsumexp over [n, d_k, d_v], v split by sign."""
    outs = []
    for part in (v.float().clamp(min=0), (-v.float()).clamp(min=0), torch.ones_like(v[..., :1])):
        x = k.float().unsqueeze(-1) + part.log().unsqueeze(-2)
        outs.append(torch.logsumexp(q.float().unsqueeze(-1) + torch.logcumsumexp(x, -3), -2))
    lp, ln, lz = outs
    return (torch.exp(lp - lz) - torch.exp(ln - lz)).to(q.dtype)


def gpu(
    out: dict, dev: str = "cuda", n: int = 65536, nl: int = 8192,
    decode: tuple = (1024, 4096, 16384, 65536),
) -> None:  # fmt: skip
    """Side-by-side medians; the sizes are parameters so that a smoke run fits the CPU."""
    d, deg = 16, 3  # deg: the decode timings
    q, k, v = (torch.randn(n, d, device=dev, dtype=torch.float16) for _ in range(3))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
        q[None, None], k[None, None], v[None, None], is_causal=True)  # fmt: skip
    out["sdpa_n64k_d16_ms"] = _median_ms(sdpa)
    from attnprec.kernels import _common

    for p in (2, 3):  # the degree-3 state is [969, 16] per head, degree 2 [153, 16]
        tay = lambda p=p: K.taylor_attention(q, k, v, degree=p, causal=True)  # noqa: E731
        row = {"kernel": _median_ms(tay)}
        # the same kernel with one program walking all chunks (no segments), side by side
        seg, _common.TARGET_PROGRAMS = _common.TARGET_PROGRAMS, 1
        row["kernel_one_program"] = _median_ms(tay)
        _common.TARGET_PROGRAMS = seg
        try:
            row["pytorch_cumsum"] = _median_ms(lambda p=p: taylor_pytorch(q, k, v, p), reps=3)
        except torch.cuda.OutOfMemoryError:
            row["pytorch_cumsum"] = "out of memory"
        out[f"taylor_n64k_d16_deg{p}_ms"] = row
    # 32 heads of nl tokens: the kernels run one program per head and feature block, so
    # one head alone leaves most of the GPU idle
    qb, kb, vb = (torch.randn(32, nl, d, device=dev, dtype=torch.float16) for _ in range(3))
    tay = lambda: K.taylor_attention(qb, kb, vb, degree=2, causal=True)  # noqa: E731
    out["heads32_n8k_d16_ms"] = {
        "taylor_deg2_kernel": _median_ms(tay),
        "taylor_deg2_pytorch_cumsum": _median_ms(lambda: taylor_pytorch(qb, kb, vb, 2), reps=3),
        "log_kernel": _median_ms(lambda: K.log_attention(qb, kb, vb, causal=True)),
        "sdpa": _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            qb[None], kb[None], vb[None], is_causal=True)),
    }  # fmt: skip
    for name, (ql, kl, vl) in (("log_n8k_d16_ms", (q[:nl], k[:nl], v[:nl])),
                               ("log_n64k_d16_ms", (q, k, v))):  # fmt: skip
        lg = lambda ql=ql, kl=kl, vl=vl: K.log_attention(ql, kl, vl, causal=True)  # noqa: E731
        row = {"kernel": _median_ms(lg)}
        seg, _common.TARGET_PROGRAMS = _common.TARGET_PROGRAMS, 1
        row["kernel_one_program"] = _median_ms(lg)
        _common.TARGET_PROGRAMS = seg
        row["pytorch_logcumsumexp"] = _median_ms(
            lambda ql=ql, kl=kl, vl=vl: log_pytorch(ql, kl, vl)
        )
        row["sdpa"] = _median_ms(
            lambda ql=ql, kl=kl, vl=vl: torch.nn.functional.scaled_dot_product_attention(
                ql[None, None], kl[None, None], vl[None, None], is_causal=True
            )
        )
        out[name] = row
    dec = {}
    for nn in decode:
        row = {}
        for name, fn, kw in (("taylor", K.taylor_attention, {"degree": deg}),
                             ("log", K.log_attention, {})):  # fmt: skip
            _, st = fn(q[:nn], k[:nn], v[:nn], causal=True, return_state=True, **kw)
            t1 = slice(nn - 1, nn)
            step = lambda fn=fn, t1=t1, st=st, kw=kw: fn(
                q[t1], k[t1], v[t1], causal=True, state=st, **kw
            )  # one token, state updated in place: the cost is the same every call
            row[name] = _median_ms(step)
        dec[nn] = row
    out["decode_ms_per_token"] = dec
    out["roofline_fraction"] = roofline_fractions(out)


def roofline_fractions(out: dict) -> dict:
    """Roofline time / measured time of the kernel timings in ``out`` (benchmarks/roofline.py,
    H200 peaks; 1 = at the roofline), for the sizes ``gpu`` uses (fp16, d = d_v = 16)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import roofline as R

    n, nl, d = 65536, 8192, 16
    fr: dict = {}

    def put(name: str, ms: object, cost: R.Cost) -> None:
        if isinstance(ms, int | float):
            fr[name] = R.fraction(ms * 1e-3, cost)

    for p in (2, 3):
        row = out.get(f"taylor_n64k_d16_deg{p}_ms", {})
        put(f"taylor_deg{p}_n64k", row.get("kernel"),
            R.taylor_cost("prefill", n=n, d_k=d, d_v=d, degree=p))  # fmt: skip
    h = out.get("heads32_n8k_d16_ms", {})
    put("taylor_deg2_32heads_n8k", h.get("taylor_deg2_kernel"),
        R.taylor_cost("prefill", n=nl, d_k=d, d_v=d, degree=2, batch=32))  # fmt: skip
    put("log_32heads_n8k", h.get("log_kernel"),
        R.log_cost("prefill", n=nl, d_k=d, d_v=d, batch=32))  # fmt: skip
    for name, nn in (("log_n8k_d16_ms", nl), ("log_n64k_d16_ms", n)):
        put(name.removesuffix("_d16_ms"), out.get(name, {}).get("kernel"),
            R.log_cost("prefill", n=nn, d_k=d, d_v=d))  # fmt: skip
    for nn, row in out.get("decode_ms_per_token", {}).items():
        put(f"decode_taylor_deg3_one_token_after_{nn}", row.get("taylor"),
            R.taylor_cost("decode", d_k=d, d_v=d, degree=3))  # fmt: skip
        put(f"decode_log_one_token_after_{nn}", row.get("log"),
            R.log_cost("decode", d_k=d, d_v=d))  # fmt: skip
    return fr


def interpreter(out: dict) -> None:
    """Max error / bound per kernel, dtype and family (n = 40, d_k = 8, d_v = 4, causal)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "kernels"))
    from kernel_checks import DTYPES, SYNTHETIC, certified, run_kernel

    from attnprec.testing.inputs import make_inputs

    table: dict = {}
    for method, params in (("log", {}), ("taylor", {"degree": 2}), ("linear", {}),
                           ("polynomial", {"coeffs": [1.0, 0.5, 0.25, -0.05]})):  # fmt: skip
        for dtype in DTYPES:
            worst = {}
            for family in SYNTHETIC:
                g = torch.Generator().manual_seed(0)
                q, k, v = make_inputs(family, n_q=40, d_k=8, d_v=4, dtype=dtype, generator=g)
                y = run_kernel(method, q, k, v, True, params)
                ref, bound = certified(method, q, k, v, True, params)
                err = (y.double() - ref.value).abs()
                worst[family] = float((err / (bound + ref.radius)).max())
            table[f"{method}/{str(dtype).removeprefix('torch.')}"] = worst
    table.update(recurrence_ratios())
    out["error_over_bound_max"] = table


def recurrence_ratios() -> dict:
    from fractions import Fraction

    from attnprec.analysis.bounds.graphs import recurrence_rounding_bound

    res = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        a = (0.8 + 0.2 * torch.rand(4, 200, generator=g)).to(dtype)
        b = torch.randn(4, 200, generator=g).to(dtype)
        y = K.linear_recurrence(a, b)
        ex = []
        for ra, rb in zip(a.double().tolist(), b.double().tolist(), strict=True):
            x, row = Fraction(0), []
            for at, bt in zip(ra, rb, strict=True):
                x = Fraction(at) * x + Fraction(bt)
                row.append(float(x))
            ex.append(row)
        ref = torch.tensor(ex, dtype=torch.float64)
        bd = recurrence_rounding_bound(a, b, None, K.precision_for(dtype, True),
                                       block=K.recurrence.BLOCK_T)  # fmt: skip
        err = (y.double() - ref).abs()
        res[f"recurrence/{str(dtype).removeprefix('torch.')}"] = {
            "decay": float((err / (bd + 2.0**-52 * ref.abs())).max())
        }
    return res


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    # The interpreter sizes are already small; --quick is accepted for run_all.py.
    ap.add_argument("--quick", action="store_true", help="accepted for run_all.py")
    ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    c = {"n64k_d16_deg3": counts(65536, 16, 16, 3), "n8k_d16_log": counts(8192, 16, 16, 0)}
    (RESULTS / "kernels_counts.json").write_text(json.dumps(c, indent=2))
    out: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        gpu(out)
        (RESULTS / "kernels_gpu.json").write_text(json.dumps(out, indent=2))
    else:
        interpreter(out)
        (RESULTS / "kernels_interpreter.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
