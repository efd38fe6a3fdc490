"""Kernel correctness at real sizes: each kernel's output against its certified reference
and its composed rounding bound (the check of tests/kernels, at n = 4096 on a GPU).

Two steps, because a GPU machine need not have python-flint and the references are the
expensive part:

``python benchmarks/gpu_check.py run DIR``
    where the kernels run (a GPU; the Triton interpreter with ``--n 64`` for a smoke run):
    draws the inputs from seeded generators, runs every kernel causally on every dtype and
    family, and saves inputs and outputs to ``DIR/<method>.pt``; then decodes
    ``min(n, 256)`` tokens one ``decode_step`` at a time for 4 rows (log, taylor, linear,
    recurrence; ``DIR/decode.pt``).
``python benchmarks/gpu_check.py verify DIR``
    anywhere (on a GPU where there is one): certified references (``reference``, which
    picks its float64 backend at this size) and the bounds of ``graphs.rounding_bound`` /
    ``recurrence_rounding_bound`` for the saved inputs, then the max of
    ``|y - exact| / bound`` per case (a value above 1 is a violation) into
    ``benchmarks/results/kernels_gpu_check.json``; the decode rows (``decode/<method>``)
    against the bounds of one-token chunks (``block=1``).

The bounds do not depend on the device (``precision_for``: fp32 compute, RNE stores on a
GPU and under the interpreter alike), so the same check applies to both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "kernels"))

from kernel_checks import DTYPES, certified, elu1, exact_recurrence, run_kernel  # noqa: E402

from attnprec import kernels as K  # noqa: E402
from attnprec.analysis.bounds.graphs import (  # noqa: E402
    recurrence_rounding_bound,
    rounding_bound,
)
from attnprec.analysis.reference import reference  # noqa: E402
from attnprec.testing.inputs import make_inputs  # noqa: E402

#: method -> (d_k, params); d_v = 32 throughout.
CASES = {
    "log": (64, {}),
    "taylor": (16, {"degree": 2}),
    "polynomial": (16, {"coeffs": [1.0, 0.5, 0.25, -0.05]}),
    "linear": (64, {}),
}
FAMILIES = ("typical", "outliers")
D_V = 32
#: Decode check: tokens decoded one call at a time from the empty state, and rows.
DECODE_N = 256
DECODE_ROWS = 4


def run(out: Path, n: int) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    for method, (d_k, params) in CASES.items():
        saved = []
        for dtype in DTYPES:
            for family in FAMILIES:
                g = torch.Generator().manual_seed(0)
                q, k, v = make_inputs(family, n_q=n, d_k=d_k, d_v=D_V, dtype=dtype, generator=g)
                y = run_kernel(method, q.to(dev), k.to(dev), v.to(dev), True, params).cpu()
                saved.append({"dtype": str(dtype), "family": family, "q": q, "k": k, "v": v,
                              "y": y})  # fmt: skip
                print(method, dtype, family, "done", flush=True)
        torch.save({"params": params, "cases": saved}, out / f"{method}.pt")
    rec = []
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(0)
        a = (0.9 + 0.1 * torch.rand(4, n, generator=g)).to(dtype)
        a = torch.where(torch.rand(4, n, generator=g) < 0.1, -a, a)  # some negative gates
        b = torch.randn(4, n, generator=g).to(dtype)
        rec.append({"dtype": str(dtype), "a": a, "b": b,
                    "y": K.linear_recurrence(a.to(dev), b.to(dev)).cpu()})  # fmt: skip
    torch.save({"cases": rec}, out / "recurrence.pt")
    run_decode(out, min(n, DECODE_N), dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU, Triton interpreter"
    (out / "device.json").write_text(json.dumps({"device": name, "n": n}))


def run_decode(out: Path, n: int, dev: str) -> None:
    """``decode_step`` token by token from the empty state, DECODE_ROWS rows, every kernel
    (linear over elu+1 features) and dtype; saved to ``DIR/decode.pt``."""
    saved = []
    for method, (d_k, params) in (*CASES.items(), ("recurrence", (0, {}))):
        if method == "polynomial":
            continue
        for dtype in DTYPES:
            g = torch.Generator().manual_seed(1)
            if method == "recurrence":
                a = (0.9 + 0.1 * torch.rand(DECODE_ROWS, n, generator=g)).to(dtype)
                b = torch.randn(DECODE_ROWS, n, generator=g).to(dtype)
                toks = [(a[:, t].to(dev), b[:, t].to(dev)) for t in range(n)]
                inputs = {"a": a, "b": b}
            else:
                q, k, v = make_inputs("typical", n_q=n, d_k=d_k, d_v=D_V, batch=(DECODE_ROWS,),
                                      dtype=dtype, generator=g)  # fmt: skip
                if method == "linear":
                    q, k = elu1(q), elu1(k)
                toks = [tuple(x[:, t : t + 1].to(dev) for x in (q, k, v)) for t in range(n)]
                inputs = {"q": q, "k": k, "v": v}
            st: object = method
            ys = []
            for t, tok in enumerate(toks):
                y, st = K.decode_step(st, *tok, **(params if t == 0 else {}))
                ys.append(y.cpu())
            y = torch.stack(ys, 1) if method == "recurrence" else torch.cat(ys, 1)
            saved.append({"method": method, "params": params, "dtype": str(dtype), **inputs,
                          "y": y})  # fmt: skip
            print("decode", method, dtype, "done", flush=True)
    torch.save({"cases": saved}, out / "decode.pt")


def verify_decode(src: Path) -> list[dict]:
    """Decode outputs within ``block=1`` bounds (one-token chunks) of the exact outputs."""
    if not (src / "decode.pt").exists():
        return []
    rows = []
    for c in torch.load(src / "decode.pt")["cases"]:
        method, params = c["method"], c["params"]
        if method == "recurrence":
            a, b = c["a"], c["b"]
            exact = exact_recurrence(a, b, None)
            bd = recurrence_rounding_bound(a, b, None, K.precision_for(a.dtype, False), block=1)
            r = _ratio(c["y"], exact, bd + 2.0**-52 * exact.abs())
        else:
            q, k, v = c["q"], c["k"], c["v"]
            fm = {"feature_map": lambda x: x} if method == "linear" else {}
            ref = reference(method, q, k, v, causal=True, **params, **fm)
            bd = rounding_bound(method, q, k, v, K.precision_for(q.dtype, False), causal=True,
                                block=1, **params)  # fmt: skip
            r = _ratio(c["y"], ref.value, bd + ref.radius)
        rows.append({"method": f"decode/{method}", "dtype": c["dtype"], "family": "typical",
                     **r})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _ratio(y: torch.Tensor, exact: torch.Tensor, lim: torch.Tensor) -> dict:
    err = (y.double() - exact).abs()
    fin = torch.isfinite(lim)
    return {
        "max_error_over_bound": float((err[fin] / lim[fin]).max()),
        "violations": int((err > lim).sum()),
        "infinite_bounds": int((~fin).sum()),
        "max_error": float(err.max()),
    }


def verify(src: Path) -> dict:
    meta = json.loads((src / "device.json").read_text())
    rows = []
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # references and bounds there
    for method in CASES:
        blob = torch.load(src / f"{method}.pt")
        for c in blob["cases"]:
            qkv = (c[x].to(dev) for x in "qkv")
            ref, bound = certified(method, *qkv, True, blob["params"])
            r = _ratio(c["y"], ref.value.cpu(), (bound + ref.radius).cpu())
            rows.append({"method": method, "dtype": c["dtype"], "family": c["family"], **r})
            print(rows[-1], flush=True)
    for c in torch.load(src / "recurrence.pt")["cases"]:
        a, b = c["a"], c["b"]
        exact = exact_recurrence(a, b, None)
        bd = recurrence_rounding_bound(a, b, None, K.precision_for(a.dtype, False),
                                       block=K.recurrence.BLOCK_T)  # fmt: skip
        r = _ratio(c["y"], exact, bd + 2.0**-52 * exact.abs())  # exact rounded once to f64
        rows.append({"method": "recurrence", "dtype": c["dtype"], "family": "gates", **r})
        print(rows[-1], flush=True)
    rows += verify_decode(src)
    return {**meta, "d_v": D_V, "cases": {m: c[0] for m, c in CASES.items()}, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("step", choices=("run", "verify"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--n", type=int, default=4096, help="sequence length (run)")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "kernels_gpu_check.json")
    args = ap.parse_args()
    if args.step == "run":
        run(args.dir, args.n)
        return
    res = verify(args.dir)
    args.output.write_text(json.dumps(res, indent=2))
    bad = sum(r["violations"] for r in res["rows"])
    print(f"{len(res['rows'])} cases, {bad} violations; wrote {args.output}")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
