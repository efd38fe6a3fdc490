"""Batched decode: time ``attnprec.kernels.decode_step`` per call, against the roofline.

``python benchmarks/bench_decode.py [--quick]`` times one decode step (every (batch, head)
row advanced by one token, the state updated in place) for each kernel and size, on
whatever is available:

* a GPU: ``benchmarks/results/decode_gpu.json``. Per case, medians of per-call wall time
  (synchronized) of ``decode_step`` (Python checks + one launch),
  ``decode_step(cuda_graph=True)`` (copies in, graph replay, clone out),
  ``DecodeGraph.replay()`` (buffers filled in place: the captured launch alone) and, for
  comparison, the causal kernel called with ``state=`` and one token; each with its
  fraction of the roofline (``benchmarks/roofline.py``, H200 peaks: roofline time /
  measured time). It also checks that the graph's outputs and state equal the plain
  path's bit for bit (``graph_equals_plain``).
* no GPU: ``benchmarks/results/decode_cpu.json``, the plain ``decode_step`` under the
  Triton CPU interpreter (``TRITON_INTERPRET=1``) at small sizes: a smoke test of the
  benchmark, **not a speed** (``mode`` says so; no roofline fraction is given).

Rows are B x H states (the recurrence: B x H x d channels); d_k = d_v = d; fp16 storage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline as R  # noqa: E402
from attnprec import kernels as K  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SMOKE = "interpreter (smoke test, not a speed)"


def cases(gpu: bool, quick: bool) -> list[dict]:
    """(kind, params, d, rows) to time; small ones on the interpreter."""
    if not gpu:
        rows, ds = (1, 64), (16,)
    else:
        rows, ds = ((1, 1024) if quick else (1, 64, 1024, 4096)), (16, 64)
    out = []
    for d in ds:
        for kind, params in (("log", {}), ("taylor", {"degree": 2}), ("taylor", {"degree": 3}),
                             ("linear", {}), ("recurrence", {})):  # fmt: skip
            if kind == "taylor" and params["degree"] == 3 and d > 16:
                continue  # 12 MB of state per row: see the roofline table instead
            for nb in rows:
                if not gpu and kind == "taylor" and params["degree"] == 3 and nb > 1:
                    continue  # seconds per call on the interpreter
                out.append({"kind": kind, "params": params, "d": d, "rows": nb})
    return out


def make_tokens(kind: str, d: int, nb: int, dev: str, dtype: torch.dtype) -> tuple:
    g = torch.Generator(device=dev).manual_seed(0)
    if kind == "recurrence":
        a = (0.9 + 0.1 * torch.rand(nb * d, device=dev, generator=g)).to(dtype)
        return a, torch.randn(nb * d, device=dev, generator=g).to(dtype)
    q, k, v = (torch.randn(nb, 1, d, device=dev, generator=g).to(dtype) for _ in range(3))
    if kind == "linear":
        q, k = ((torch.nn.functional.elu(x.float()) + 1).to(dtype) for x in (q, k))
    return q, k, v


def cost(case: dict) -> R.Cost:
    kind, d, nb, p = case["kind"], case["d"], case["rows"], case["params"]
    if kind == "log":
        return R.log_cost("decode", d_k=d, d_v=d, batch=nb)
    if kind == "taylor":
        return R.taylor_cost("decode", d_k=d, d_v=d, degree=p["degree"], batch=nb)
    if kind == "linear":
        return R.linear_cost("decode", m=d, d_v=d, batch=nb)
    return R.recurrence_cost("decode", rows=nb * d)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call_s(fn, reps: int, repeats: int) -> float:
    """Median over ``repeats`` of (wall time of ``reps`` calls, synchronized) / reps."""
    fn()
    _sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        ts.append((time.perf_counter() - t) / reps)
    return statistics.median(ts)


def old_path(case: dict, state: K.KernelState, toks: tuple):
    """The causal kernel with ``state=`` and one token (a whole chunk computed for it)."""
    fn = {"log": K.log_attention, "taylor": K.taylor_attention,
          "linear": K.linear_attention}[case["kind"]]  # fmt: skip
    return lambda: fn(*toks, causal=True, state=state, **case["params"])


def run_case(case: dict, dev: str, gpu: bool, reps: int, repeats: int) -> dict:
    dtype = torch.float16
    kind, d, nb = case["kind"], case["d"], case["rows"]
    toks = make_tokens(kind, d, nb, dev, dtype)
    _, st = K.decode_step(kind, *toks, **case["params"])
    c = cost(case)
    roof = R.roofline(c)
    row: dict = {
        "kind": kind, **case["params"], "d": d, "rows": nb,
        "state_bytes": st.nbytes(), "roofline_us": roof["time_s"] * 1e6,
        "roofline_bound": roof["bound"],
    }  # fmt: skip
    timed = {"decode_step": lambda: K.decode_step(st, *toks)}
    if gpu:
        plain, graphed = st.clone(), st.clone()
        y_plain, _ = K.decode_step(plain, *toks)
        y_graph, _ = K.decode_step(graphed, *toks, cuda_graph=True)
        row["graph_equals_plain"] = bool(torch.equal(y_plain, y_graph)) and all(
            torch.equal(a, b) for a, b in zip(plain.tensors, graphed.tensors, strict=True)
        )
        graph = K.decode_graph(st, *toks)
        timed["decode_step_cuda_graph"] = lambda: K.decode_step(st, *toks, cuda_graph=True)
        timed["graph_replay"] = graph.replay
        if kind != "recurrence":
            timed["causal_kernel_one_token"] = old_path(case, st, toks)
    for name, fn in timed.items():
        t = per_call_s(fn, reps, repeats)
        row[f"{name}_us"] = t * 1e6
        if gpu:
            row[f"{name}_roofline_fraction"] = R.fraction(t, c)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    reps, repeats = ((50, 3) if args.quick else (200, 5)) if gpu else (2, 3)
    out = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "mode": "gpu" if gpu else SMOKE,
        "dtype": "float16",
        "roofline_peak": R.H200.name,
        "note": (
            "per-call wall time, synchronized, median of repeats; fraction = roofline time "
            "(benchmarks/roofline.py, H200 peaks) / measured"
            if gpu
            else "Triton CPU interpreter: checks that the benchmark runs; the times are not "
            "speeds and no roofline fraction is given (the roofline is an H200's)"
        ),
        "rows": [run_case(c, dev, gpu, reps, repeats) for c in cases(gpu, args.quick)],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("decode_gpu.json" if gpu else "decode_cpu.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
