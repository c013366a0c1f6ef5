#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff), and run the test suite on CPU.
#   bash scripts/test.sh [pytest args]      e.g. bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup_slurm.sh || echo "warning: without Slurm the tests in tests/test_slurm_cluster.py fail" >&2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check rlhf_dist tests benchmarks scripts   # lint first: pyproject.toml [tool.ruff]
exec .venv/bin/python -m pytest "$@"
