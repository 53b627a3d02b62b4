#!/usr/bin/env bash
# One shot on a machine with a CUDA GPU (under 5 minutes): the GPU tests (no host sync on a step that
# does not log, under torch.cuda.set_sync_debug_mode("error"); everything on the device; bfloat16),
# then step times of the quickstart and MNIST configs with compile off and on. Everything goes to
# one file, ${OUT:-runs/gpu}/gpu.txt (and the step times as JSON beside it).
#   bash benchmarks/gpu.sh            # after bash scripts/setup.sh (a CUDA build of torch)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
report="$out/gpu.txt"
py=${PYTHON:-.venv/bin/python}
{
  echo "# geco GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo
  echo "## GPU tests"
  "$py" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15
  echo
  echo "## step times (ms per training step, median of the timed steps)"
  "$py" benchmarks/gpu_steps.py --json "$out/steps.json" 2>&1
} | tee "$report"
echo "written: $report"
