#!/usr/bin/env bash
# The GPU check (issue 17): bf16 PPO and QLoRA PPO of a ~0.4B random Qwen2-shaped model on one CUDA GPU, no downloads;
# writes benchmarks/results/gpu_check.json (tokens/s per phase, peak GPU memory, the planner's estimate).
#   bash benchmarks/gpu_check.sh [--steps 4] [--max-new-tokens 128] [--out PATH]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi
exec .venv/bin/python benchmarks/gpu_check.py "$@"
