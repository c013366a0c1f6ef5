#!/usr/bin/env bash
# Create ./.venv and install rlhf-dist into it (editable, with the test extras). Idempotent.
#
#   bash scripts/setup.sh            # then: .venv/bin/rlhf-dist --help
#
# torch is installed first, and chosen for the machine: with an NVIDIA GPU (nvidia-smi works) the
# default CUDA build from PyPI; without one, the CPU build (a local CPU wheel if pip's find-links
# has one, else PyTorch's CPU index), so a laptop or CI runner never downloads multi-GB CUDA wheels.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") and PYTHON (e.g. PYTHON=python3.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  # Missing, or left half-made by a failed attempt (e.g. Debian without python3-venv): start again.
  rm -rf .venv
  echo "setup: creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing the CUDA build of torch"
    "${PIP[@]}" "$TORCH_SPEC"
  else
    echo "setup: no NVIDIA GPU; installing the CPU build of torch ($TORCH_SPEC)"
    # A local CPU wheel (pip's find-links) needs no index; otherwise PyTorch's CPU-only index.
    if "${PIP[@]}" --no-index --no-deps "$TORCH_SPEC" 2>/dev/null; then
      "${PIP[@]}" "$TORCH_SPEC"   # torch's own dependencies, from the usual index
    else
      "${PIP[@]}" "$TORCH_SPEC" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
  fi
fi

# Re-install only when pyproject.toml changed since the last successful set-up. The installed torch
# is pinned while the rest resolves, so no dependency can swap it for another (CUDA) build.
stamp=.venv/.rlhf_dist_setup
want="$(.venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing rlhf-dist and its dependencies"
  .venv/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > .venv/torch-pin.txt
  "${PIP[@]}" -e ".[test]" -c .venv/torch-pin.txt
  echo "$want" > "$stamp"
fi
.venv/bin/python - <<'PY'
import torch, transformers, trl, peft, accelerate, datasets
cuda = torch.cuda.is_available()
print(f"setup: ready - torch {torch.__version__} ({'CUDA' if cuda else 'CPU'}), transformers {transformers.__version__}, "
      f"trl {trl.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, datasets {datasets.__version__}")
PY
