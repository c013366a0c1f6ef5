"""The typed configs of the stages that run a Hugging Face Trainer (pretrain, sft, reward, dpo), and our defaults
for their `training` section. Each `training` takes every field of its Hugging Face / TRL config class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from trl import DPOConfig as TRLDPOConfig
from trl import KTOConfig as TRLKTOConfig
from trl import RewardConfig as TRLRewardConfig
from trl import SFTConfig as TRLSFTConfig

from rlhf_dist.config.sections import DDP_TIMEOUT, StageConfig


@dataclass
class PretrainStageConfig(StageConfig):
    """Domain-adaptive causal-LM training on raw text (perplexity before/after)."""

    block_size: int = field(default=512, metadata={"help": "Tokens per training block (texts are concatenated)."})
    training: TrainingArguments | None = None

    def sequence_length(self, max_positions: int) -> int:
        return min(self.block_size, max_positions)


@dataclass
class SFTStageConfig(StageConfig):
    """Supervised fine-tuning (TRL SFTTrainer); loss on the completion by default."""

    training: TRLSFTConfig | None = None


@dataclass
class RewardStageConfig(StageConfig):
    """Reward model: a sequence classifier with one score, trained on preference pairs."""

    training: TRLRewardConfig | None = None


@dataclass
class DPOStageConfig(StageConfig):
    """Direct preference optimisation (TRL DPOTrainer)."""

    training: TRLDPOConfig | None = None



@dataclass
class KTOStageConfig(StageConfig):
    """Kahneman-Tversky optimisation (TRL KTOTrainer) on unpaired good / bad completions."""

    training: TRLKTOConfig | None = None


def training_defaults() -> dict[str, Any]:
    """Our defaults for the `training` section, applied under the user's values.

    TRL configs default to bf16 and gradient checkpointing even on CPU; we pick bf16 only where
    the GPU supports it and leave checkpointing off unless asked, and run on CPU where there is no GPU.
    """
    import torch

    cuda = torch.cuda.is_available()
    return {
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "fp16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "logging_steps": 10,
        "save_total_limit": 2,
        "ddp_timeout": DDP_TIMEOUT,
        "dataloader_pin_memory": cuda,
        # Without a GPU: CPU processes with gloo, so `accelerate launch` of N processes is N ranks, not N
        # unsynchronised single-process runs (docs/cpu.md traps 1 and 2).
        "use_cpu": not cuda,
    }
