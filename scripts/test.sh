#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff), and run the test suite on CPU.
#   bash scripts/test.sh [pytest args]      e.g. bash scripts/test.sh -m "not slow"
# The tests run in RLHF_DIST_TEST_WORKERS pytest-xdist workers (default 2; 0 = in this process), each test
# file on one worker (its module fixtures built once), every torch process on one thread: two files at a time
# on a 2-core machine instead of one process's threads waiting on each other.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup_slurm.sh || echo "warning: without Slurm the tests in tests/test_slurm_cluster.py fail" >&2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
workers="${RLHF_DIST_TEST_WORKERS:-2}"
case "$workers" in ''|*[!0-9]*) echo "RLHF_DIST_TEST_WORKERS must be a whole number, got '$workers'" >&2; exit 2;; esac
parallel=(-n "$workers")
[ "$workers" -gt 0 ] && parallel+=(--dist loadfile)
.venv/bin/python -m ruff check rlhf_dist tests benchmarks scripts   # lint first: pyproject.toml [tool.ruff]
exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
