"""rlhf_dist: the RLHF pipeline (pretrain, SFT, reward, PPO, DPO) from one GPU to a Slurm cluster."""

__version__ = "0.1.0"
