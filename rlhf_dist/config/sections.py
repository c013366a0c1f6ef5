"""The shared sections of a recipe (`model`, `lora`, `quantization`, `data`, `watchdog`) and `StageConfig`, the fields
every stage's config has. Light: no torch, no transformers (the run-identity code reads `WatchdogSection`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_dist.config.coerce import check_ranges


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (shown by `rlhf-dist fields`); a list or dict default is copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


DTYPES = ("auto", "float32", "bfloat16", "float16")
# The process group's timeout (seconds): a backstop behind the watchdog's limits, so it must exceed them (the
# defaults of WatchdogSection are at most 3600 s); torch's own default is 1800 s for gloo, 600 s for NCCL.
DDP_TIMEOUT = 5400


# ----------------------------------------------------------------------------------------------
# Shared sections
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    """The base model the first stage starts from, and how every stage loads models."""

    name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id (org/name) or local directory of the base model the first stage starts from."},
    )
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a hub model."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weight dtype: auto (the checkpoint's), float32, bfloat16 or float16."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: eager, sdpa or flash_attention_2 (default: transformers' choice)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the checkpoint. Only for models you trust."}
    )


@dataclass
class LoraSection:
    """Low-rank adapters (PEFT). Off by default: the whole model is trained."""

    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    r: int = field(default=16, metadata={"help": "Adapter rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str = field(
        default="all-linear", metadata={"help": "Modules that get adapters: a list of names, or 'all-linear'."}
    )
    merge: bool = field(
        default=True,
        metadata={"help": "Also save the adapter merged into full weights (what the next stage loads by default)."},
    )


@dataclass
class QuantizationSection:
    """bitsandbytes quantisation of the frozen base weights (QLoRA). Needs lora.enabled to train."""

    load_in_4bit: bool = field(default=False, metadata={"help": "Load base weights in 4 bit (NF4/FP4)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load base weights in 8 bit (LLM.int8)."})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(default=True, metadata={"help": "Quantise the quantisation constants too."})
    compute_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="bfloat16", metadata={"help": "Dtype of the matmuls on dequantised weights."}
    )


@dataclass
class DataSection:
    """Where a stage's data comes from. The top-level `data` section gives defaults for every stage."""

    path: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, local dataset folder, or a .jsonl/.json/.parquet/.csv/.txt file (each also "
                          ".gz/.bz2/.xz/.zst)."},
    )
    name: str | None = field(default=None, metadata={"help": "Dataset config name (hub datasets with several)."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Subfolder of a hub dataset or dataset folder, e.g. harmless-base of "
                                        "Anthropic/hh-rlhf (datasets.load_dataset's data_dir)."})
    split: str = field(default="train", metadata={"help": "Split used for training."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a hub dataset."})
    eval_path: str | None = field(
        default=None, metadata={"help": "Separate file or id for held-out data (default: hold out part of `path`)."}
    )
    eval_split: str | None = field(
        default=None, metadata={"help": "Split used for evaluation, e.g. 'test' (of eval_path, else of path)."}
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of the training rows held out when no eval split is given."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Map the stage's column names to yours, e.g. {prompt: question, completion: answer}."},
    )
    skip_empty: bool = field(
        default=False,
        metadata={"help": "Pretrain only: drop empty texts (e.g. wikitext's blank lines) instead of failing on them."},
    )
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation (datasets.map)."})
    seed: int = field(default=42, metadata={"help": "Seed for shuffling and the held-out split."})
    on_bad_row: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "A row that fails its checks (missing or empty field, not JSON, identical pair, ...): error "
                          "lists every such row and stops before any model loads; skip drops them, counted by reason "
                          "in the log and metrics.json."},
    )
    on_long_row: Literal["truncate", "skip", "error"] | None = field(
        default=None,
        metadata={"help": "A row longer than the stage's limit (sft/reward/dpo training.max_length, ppo "
                          "training.max_prompt_length): truncate (prompts on the left), skip, or error; counted in "
                          "metrics.json. Default: truncate for sft, dpo and ppo, skip for reward (what TRL does)."},
    )


@dataclass
class WatchdogSection:
    """Hang watchdog (`rlhf_dist.watchdog`): a phase that runs longer than its limit (seconds; null = not watched)
    ends the job with every thread's stack in RUN/logs/STAGE/. The defaults are far above what a phase of a healthy
    large run takes; lower them to learn of a hang sooner. Keep them below the process group's timeout
    (training.ddp_timeout), or a stalled collective ends in that timeout's error instead of this report."""

    enabled: bool = field(default=True, metadata={"help": "Watch the phases of every process."})
    train_step: float | None = field(
        default=1800.0, metadata={"help": "pretrain/sft/reward/dpo: one optimizer step, from fetching its batch to the update."})
    rollout: float | None = field(
        default=3600.0, metadata={"help": "ppo: sampling one generation chunk and its policy/value/reference forwards."})
    score: float | None = field(default=1800.0, metadata={"help": "ppo: the reward model or function on one chunk."})
    gather: float | None = field(default=1800.0, metadata={"help": "ppo: gathering a step's rollouts from every process."})
    update: float | None = field(default=3600.0, metadata={"help": "ppo: the minibatch epochs of one step."})
    evaluate: float | None = field(default=3600.0, metadata={"help": "Every stage: one evaluation (before, during, after)."})
    save: float | None = field(default=3600.0, metadata={"help": "Every stage: writing one checkpoint."})
    finish: float | None = field(
        default=3600.0, metadata={"help": "Every stage: writing its output and the last wait for every process."})

    def __post_init__(self):
        check_ranges(self, "watchdog.")  # each limit: seconds > 0, or null to not watch that phase

    def limits(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "enabled"}


# ----------------------------------------------------------------------------------------------
# One config per stage
# ----------------------------------------------------------------------------------------------
@dataclass
class StageConfig:
    """Fields every stage has. Subclasses add `training` (a Hugging Face config) and their own fields."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    data: DataSection = field(default_factory=DataSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Model this stage starts from. Default: the output of the previous stage in the run "
            "directory, else model.name_or_path."
        },
    )

    def __post_init__(self):
        q = self.quantization
        if q.load_in_4bit and q.load_in_8bit:
            raise ValueError("quantization: load_in_4bit and load_in_8bit are both true; choose one")
        if (q.load_in_4bit or q.load_in_8bit) and not self.lora.enabled:
            raise ValueError("quantization needs lora.enabled: true (quantised weights cannot be trained directly)")

    def sequence_length(self, max_positions: int) -> int:
        """Tokens per training sequence (for the memory estimate of `--fallback auto`): training.max_length where the
        stage has one, within the model's positions."""
        return min(getattr(self.training, "max_length", None) or max_positions, max_positions)
