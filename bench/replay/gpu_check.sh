#!/usr/bin/env bash
# The device check of replay's localization (issue 14), one script, under 5 minutes on one H100/H200:
# a ~1.1B-parameter Llama-shaped model built in bf16 from a config (nothing downloaded), an overflow planted in its
# middle layer, and localization's time and peak GPU memory against one plain forward+backward and
# torch.autograd.detect_anomaly, printed as a markdown table (paste it into bench/replay/RESULTS.md).
#
#   bash bench/replay/gpu_check.sh           # on the GPU machine
#   bash bench/replay/gpu_check.sh --tiny    # the same script on the CPU, tiny model (a check that it runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "${1:-}" = "--tiny" ]; then
  args=(--size tiny --device cpu --repeat 5)
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  args=(--size 1b --device cuda --dtype bfloat16 --repeat 5)
fi
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
timeout 280 "$PY" bench/replay/bench_localize.py "${args[@]}" --markdown
