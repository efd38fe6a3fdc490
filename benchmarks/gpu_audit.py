"""The audit on a GPU (issue 14's GPU rows): the float64 reference and the bound computed
where the inputs are (``attnprec._device``).

Run on a CUDA machine: ``python benchmarks/gpu_audit.py [--out PATH]``.

1. Reference and bound side by side (softmax, bf16 inputs, d = 16, causal, every row) at
   n = 4096, 16,384 and 65,536: medians of 3 alternations after a warm-up, and the peak
   CUDA memory of each.
2. The command line's full audit of ``torch:sdpa`` (fp16, d = 64, causal, one head, every
   row) at n = 16,384 and 65,536, each in a child process: wall time (start-up, kernel,
   references, bounds, judging) and its summary line.
3. The bound of a Mamba-1 selective scan (1536 channels, N = 16, bf16, every row, the
   state evaluation) at 4096 and 16,384 tokens on the GPU (the CPU took 226 s at 16,384:
   docs/benchmarks.md).

Results: ``benchmarks/results/gpu_audit.json``; docs/scale.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from attnprec.analysis import Precision, reference
from attnprec.analysis.bounds import attention_error_bound

OUT = Path(__file__).resolve().parent / "results" / "gpu_audit.json"


def _timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20


def side_by_side(n: int, d: int = 16, repeats: int = 3) -> dict:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, d, generator=g).bfloat16().cuda() for _ in range(3))
    prec = Precision("bf16")
    runs = {
        "reference": lambda: reference("softmax", q, k, v, causal=True, backend="float64"),
        "bound": lambda: attention_error_bound("softmax", q, k, v, prec, causal=True),
    }
    for fn in runs.values():  # warm-up (CUDA context, cuBLAS handles, allocator)
        fn()
    times: dict[str, list[float]] = {key: [] for key in runs}
    peak = {key: 0.0 for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            s, mb = _timed(fn)
            times[key].append(s)
            peak[key] = max(peak[key], mb)
    med = {key: statistics.median(t) for key, t in times.items()}
    row = {"n": n, "d": d, "seconds": times, "median": med, "peak_mb": peak,
           "ratio": med["bound"] / med["reference"]}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def full_audit(n: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "attnprec", "audit", "--kernel", "torch:sdpa",
           "--method", "softmax", "--dtype", "fp16", "--family", "typical", "--n", str(n),
           "--d", "64", "--causal", "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"n": n, "error": f"over {timeout:.0f} s"}
    row = {"n": n, "d": 64, "kernel": "torch:sdpa", "dtype": "fp16",
           "seconds": time.perf_counter() - t0, "exit_status": p.returncode,
           "summary": (p.stdout.strip().splitlines() or [""])[-1][:300],
           "stderr_tail": p.stderr.strip()[-300:]}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def ssm_bound(T: int, channels: int = 1536, N: int = 16) -> dict:
    g = torch.Generator().manual_seed(T)
    C, B = (torch.randn(T, N, generator=g).bfloat16().cuda() for _ in range(2))
    u = torch.randn(T, channels, generator=g).bfloat16().cuda()
    delta = (10 ** (-3 + 2 * torch.rand(T, channels, generator=g))).bfloat16().cuda()
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(channels, N).bfloat16().cuda()
    prec = Precision("bf16", sums="linear")

    def run(t: int):
        return attention_error_bound("selective_scan", C[:t], B[:t], u[:t], prec, delta=delta[:t],
                                     A=A, evaluation="state")  # fmt: skip

    run(64)  # warm-up
    s, mb = _timed(lambda: run(T))
    row = {"T": T, "channels": channels, "N": N, "seconds": s, "peak_mb": mb}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--audits", type=int, nargs="*", default=[16384, 65536])
    ap.add_argument("--timeout", type=float, default=150.0, help="per full audit (s)")
    ap.add_argument("--ssm", type=int, nargs="*", default=[4096, 16384], help="tokens")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_audit.py: needs a CUDA device")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "side_by_side": [], "full_audit": [], "ssm_bound": []}  # fmt: skip
    for n in a.sizes:
        res["side_by_side"].append(side_by_side(n))
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    for n in a.audits:
        res["full_audit"].append(full_audit(n, a.timeout))
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    for T in a.ssm:
        res["ssm_bound"].append(ssm_bound(T))
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
