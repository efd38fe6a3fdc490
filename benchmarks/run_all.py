"""Run every benchmark script in turn (``make bench``); ``--quick`` for a smoke run.

Each script writes its own results under benchmarks/results/ and the tables in docs/.
capture_real.py is not a benchmark (it regenerates the committed real-input file).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "bench_lognum.py",
    "bench_reference.py",
    "tightness.py",
    "bench_kernels.py",
    "kernel_accuracy.py",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    args = ap.parse_args()
    failed = []
    for name in SCRIPTS:
        cmd = [sys.executable, str(HERE / name)] + (["--quick"] if args.quick else [])
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
