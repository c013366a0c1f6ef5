#!/usr/bin/env bash
# Create ./.venv and install rlhf-dist into it (editable, with the test extras). Idempotent.
#
#   bash scripts/setup.sh            # then: .venv/bin/rlhf-dist --help
#
# torch is installed first, and chosen for the machine: with an NVIDIA GPU (nvidia-smi works) the
# default CUDA build from PyPI; without one, the CPU build (a local CPU wheel if pip's find-links
# has one, else PyTorch's CPU index), so a laptop or CI runner never downloads multi-GB CUDA wheels.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") and PYTHON (e.g. PYTHON=python3.11).
#
# Versions: by default everything is installed with `-c constraints.txt`, the exact tested stack.
# One switch, the environment variable RLHF_DIST_CONSTRAINTS:
#   unset or empty   constraints.txt (the tested stack)
#   none             no constraints file: every dependency is upgraded to the newest release that
#                    pyproject.toml allows (the installed torch is kept)
#   any other value  the path of another constraints file
#   RLHF_DIST_CONSTRAINTS=none bash scripts/setup.sh     # float to the newest releases
# A change of the pins (or of the choice) re-installs on the next run. A TORCH_SPEC other than
# torch==2.13.0 needs RLHF_DIST_CONSTRAINTS=none or a constraints file that agrees with it.
#   bash scripts/setup.sh --print-constraints   # print the pip -c arguments it would use, and exit
set -euo pipefail

# The constraints, chosen before anything else (a relative path is taken from where the script is run).
CONSTRAINTS="${RLHF_DIST_CONSTRAINTS:-}"
case "$CONSTRAINTS" in
  "") CONSTRAINTS=constraints.txt; CONSTRAINTS_LABEL="the tested stack, pinned by constraints.txt" ;;
  none) CONSTRAINTS=""; CONSTRAINTS_LABEL="floating: the newest releases pyproject.toml allows, no constraints file" ;;
  /*) CONSTRAINTS_LABEL="constraints from $CONSTRAINTS" ;;
  *) CONSTRAINTS="$PWD/$CONSTRAINTS"; CONSTRAINTS_LABEL="constraints from $CONSTRAINTS" ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
  echo "setup: constraints file not found: $CONSTRAINTS (RLHF_DIST_CONSTRAINTS=${RLHF_DIST_CONSTRAINTS:-})" >&2
  exit 2
fi
CONSTRAINT_ARGS=()
[ -z "$CONSTRAINTS" ] || CONSTRAINT_ARGS=(-c "$CONSTRAINTS")

case "${1-}" in
  "") ;;
  --print-constraints) echo "${CONSTRAINT_ARGS[*]}"; exit 0 ;;
  *) echo "usage: bash scripts/setup.sh [--print-constraints]  (see the header of scripts/setup.sh)" >&2; exit 2 ;;
esac

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
# torch's install takes the constraints too (${a[@]+"${a[@]}"}: an empty array is an error under set -u in bash < 4.4).

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing the CUDA build of torch"
    "${PIP[@]}" "$TORCH_SPEC" ${CONSTRAINT_ARGS[@]+"${CONSTRAINT_ARGS[@]}"}
  else
    echo "setup: no NVIDIA GPU; installing the CPU build of torch ($TORCH_SPEC)"
    # A local CPU wheel (pip's find-links) needs no index; otherwise PyTorch's CPU-only index.
    if "${PIP[@]}" --no-index --no-deps "$TORCH_SPEC" ${CONSTRAINT_ARGS[@]+"${CONSTRAINT_ARGS[@]}"} 2>/dev/null; then
      # torch's own dependencies, from the usual index
      "${PIP[@]}" "$TORCH_SPEC" ${CONSTRAINT_ARGS[@]+"${CONSTRAINT_ARGS[@]}"}
    else
      "${PIP[@]}" "$TORCH_SPEC" ${CONSTRAINT_ARGS[@]+"${CONSTRAINT_ARGS[@]}"} \
        --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
  fi
fi

# Re-install only when pyproject.toml, the constraints file or the choice of constraints changed since
# the last successful set-up. The installed torch is pinned while the rest resolves, so no dependency
# can swap it for another (CUDA) build.
stamp=.venv/.rlhf_dist_setup
want="$(.venv/bin/python - "$CONSTRAINTS" <<'PY'
import hashlib, sys
h = hashlib.sha256(open("pyproject.toml", "rb").read())
constraints = sys.argv[1]
h.update(b"\0constraints\0" + (open(constraints, "rb").read() if constraints else b"none"))
print(h.hexdigest())
PY
)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing rlhf-dist and its dependencies ($CONSTRAINTS_LABEL)"
  .venv/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > .venv/torch-pin.txt
  if [ -n "$CONSTRAINTS" ]; then
    "${PIP[@]}" -e ".[test]" -c .venv/torch-pin.txt "${CONSTRAINT_ARGS[@]}"
  else
    # Floating: upgrade what an earlier set-up installed too, not only what is missing.
    "${PIP[@]}" -e ".[test]" -c .venv/torch-pin.txt --upgrade --upgrade-strategy eager
  fi
  echo "$want" > "$stamp"
fi
.venv/bin/python - "$CONSTRAINTS_LABEL" <<'PY'
import sys
import torch, transformers, trl, peft, accelerate, datasets
cuda = torch.cuda.is_available()
print(f"setup: ready ({sys.argv[1]}) - torch {torch.__version__} ({'CUDA' if cuda else 'CPU'}), "
      f"transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}, datasets {datasets.__version__}")
PY
