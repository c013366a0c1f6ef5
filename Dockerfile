# GPU image for rlhf-dist: CUDA build of torch, DeepSpeed (its CUDA ops compile on first use, hence
# the devel base with nvcc), and the package with its tracking extras.
#
#   docker build -t rlhf-dist .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/runs" rlhf-dist demo --output /runs/demo
#   docker run --gpus all --ipc=host -v "$PWD/runs:/runs" -v "$PWD/my.yaml:/my.yaml:ro" \
#       rlhf-dist pipeline --recipe /my.yaml --output /runs/my
#
# Secrets (HF_TOKEN, WANDB_API_KEY) are passed at run time with -e, never baked into the image.
FROM nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/rlhf-dist
# Dependencies first, from pyproject.toml alone (a cached layer that code changes do not rebuild),
# then the package itself.
COPY pyproject.toml ./
RUN pip install --upgrade pip \
    && pip install "torch>=2.13.0" \
    && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['tracking']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY rlhf_dist ./rlhf_dist
RUN pip install --no-deps .
COPY launch ./launch
COPY ds_configs ./ds_configs
COPY slurm ./slurm

RUN useradd --create-home rlhf
USER rlhf
ENTRYPOINT ["rlhf-dist"]
CMD ["--help"]
