#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the CPU demo: the whole pipeline on a tiny model, offline.
#   bash scripts/demo.sh [--output DIR] [--overwrite]     (default output: runs/demo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/rlhf-dist demo "$@"
