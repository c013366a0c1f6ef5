"""rlhf_dist: the RLHF pipeline (pretrain, SFT, reward, PPO, DPO) from one GPU to a Slurm cluster."""

import logging as _logging

__version__ = "0.1.0"

# On a CPU with AVX512-BF16, importing bitsandbytes (with `kernels`, which transformers >= 5.25 installs) asks the
# Hugging Face Hub for a 4-bit matmul kernel. The publisher check refuses it (offline: nothing is cached), and
# bitsandbytes falls back to its own kernel after two warnings on every import; they would precede every one-line
# error of ours. Only warnings are hidden: an error still shows.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
