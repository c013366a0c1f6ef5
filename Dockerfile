# GPU image for rlhf-dist: the CUDA build of torch, the tested stack, the package, the launch/ and
# ds_configs/ files (the accelerate YAMLs name ds_configs/ relative to the working directory, which
# is why WORKDIR is the package folder). No Docker engine runs where this file is written: it is
# linted with hadolint (tests/test_launch_configs.py), not built, so build it once before relying on it.
#
#   docker build -t rlhf-dist .
#   docker run --rm rlhf-dist                                       # rlhf-dist --help
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/runs" rlhf-dist demo --output /runs/demo
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/runs" -v "$PWD/my.yaml:/my.yaml:ro" \
#       rlhf-dist pipeline --recipe /my.yaml --output /runs/my
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/runs" -v "$PWD/my.yaml:/my.yaml:ro" \
#       --entrypoint accelerate rlhf-dist launch --config_file launch/zero3.yaml --num_processes 8 \
#       -m rlhf_dist sft --recipe /my.yaml --output /runs/sft
#
# The mounted /runs must be writable by uid 10001 (the image's user), e.g. `mkdir runs && chmod 777 runs`,
# or run with `--user "$(id -u):$(id -g)"`.
# Secrets (HF_TOKEN, WANDB_API_KEY) are passed at run time with -e, never baked into the image.
#
# CUDA: torch 2.13.0 from PyPI is built against CUDA 13.0 (it pulls cuda-toolkit 13.0.x wheels), so the
# base is a CUDA 13.0 *devel* image: DeepSpeed compiles its CUDA ops with the image's nvcc on first
# use, and torch refuses an nvcc whose major version differs from its own.
FROM nvidia/cuda:13.0.2-devel-ubuntu24.04

# TOKENIZERS_PARALLELISM is no secret (hadolint's DL3064 matches "TOKEN" in the name).
# hadolint ignore=DL3064
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

# apt versions are fixed by the base image tag (Ubuntu 24.04 archive); pinning exact Debian versions
# breaks the build as soon as the archive publishes a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/rlhf-dist
# Dependencies first, from pyproject.toml and constraints.txt alone (a cached layer that code changes
# do not rebuild). constraints.txt pins the exact tested stack, as scripts/setup.sh installs it (its
# torch==2.13.0 takes the CUDA build from PyPI here); wandb (the tracking extra) is not in it and
# resolves within those pins.
COPY pyproject.toml constraints.txt ./
RUN pip install "torch==2.13.0" -c constraints.txt \
    && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['tracking']))" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c constraints.txt \
    && rm /tmp/requirements.txt
COPY README.md ./
COPY rlhf_dist ./rlhf_dist
RUN pip install --no-deps . \
    && rlhf-dist --help > /dev/null
COPY launch ./launch
COPY ds_configs ./ds_configs
COPY slurm ./slurm

# Non-root user with a numeric uid (Ubuntu 24.04 images already have uid 1000, "ubuntu"). Its home holds
# the Hugging Face cache and DeepSpeed's compiled ops (~/.cache); runs/ is the one writable folder
# here, for relative --output paths.
RUN useradd --uid 10001 --create-home --home-dir /home/rlhf --shell /bin/bash rlhf \
    && mkdir -p /opt/rlhf-dist/runs \
    && chown 10001:10001 /opt/rlhf-dist/runs
# `rlhf-dist launch` finds launch/ and ds_configs/ here, whatever the working directory.
ENV RLHF_DIST_HOME=/opt/rlhf-dist
USER 10001
ENTRYPOINT ["rlhf-dist"]
CMD ["--help"]
