#!/usr/bin/env bash
# Every GPU check and benchmark for a session lent a GPU (docs/kernels.md, "On a GPU"):
# ``bash benchmarks/gpu_session.sh OUT [STEPS]`` from the repository root, the package
# importable (``pip install -e .`` or ``PYTHONPATH=src``). Each step has its own time limit
# and writes into OUT (at most 8 files); a step that fails or runs out leaves the others.
# STEPS (default 12345) picks steps: "12" and "345" each fit a 10-minute command.
# Steps, most valuable first:
#   1. the device tests (tests/test_devices.py, tests/test_device_path.py on real CUDA);
#   2. the audit on the GPU: reference and bound side by side at 4096 .. 65,536 and the
#      full torch:sdpa audit at 16,384 and 65,536, the selective scan's bound at Mamba width
#      (benchmarks/gpu_audit.py);
#   3. the kernels against their bounds at n = 2048, run and verified there
#      (benchmarks/gpu_check.py; `verify` computes on the GPU);
#   4. the SATA claim's configuration at full size: degree 3, every row of 102,400 tokens,
#      d = 8 .. 64 (benchmarks/sata_study.py --device cuda);
#   5. batched decode (benchmarks/bench_decode.py --quick).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT [STEPS]}
steps=${2:-12345}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
[[ $steps == *1* ]] && timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -rf -n 4 \
  tests/test_devices.py tests/test_device_path.py 2>&1 | tee "$out/devices.log" | tail -30
[[ $steps == *2* ]] && timeout 240 python3 benchmarks/gpu_audit.py --out "$out/gpu_audit.json" --timeout 90 | tail -8
dir=$(mktemp -d)
[[ $steps == *3* ]] && timeout 90 python3 benchmarks/gpu_check.py run "$dir" --n 2048 > /dev/null &&
  timeout 150 python3 benchmarks/gpu_check.py verify "$dir" \
    --output "$out/kernels_gpu_check.json" | tail -3
[[ $steps == *4* ]] && timeout 200 python3 benchmarks/sata_study.py --device cuda --n 102400 --rows 102400 \
  --degrees 3 --no-real --no-plot --check-rows 0 --out "$out/sata_gpu.json" | tail -12
[[ $steps == *5* ]] && timeout 120 python3 benchmarks/bench_decode.py --quick | tail -3 &&
  cp benchmarks/results/decode_gpu.json "$out/"
