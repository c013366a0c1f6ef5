"""Typed configuration: one dataclass per stage, pipeline recipes in YAML, command-line overrides.

A *recipe* is one YAML file holding the shared sections (`model`, `lora`, `quantization`, `data`)
and one section per stage. A stage section may repeat any shared section to override it for that
stage, and has a `training` section that takes every field of the matching Hugging Face config
class (`transformers.TrainingArguments` for pretrain, `trl.SFTConfig`, `trl.RewardConfig`,
`trl.DPOConfig`)::

    model: {name_or_path: Qwen/Qwen2.5-0.5B, dtype: bfloat16}
    data: {num_proc: 4}                      # defaults for every stage's `data`
    stages: [sft, reward, dpo]
    sft:
      lora: {enabled: true, r: 16}
      data: {path: HuggingFaceH4/ultrachat_200k, split: train_sft}
      training: {learning_rate: 2.0e-5, num_train_epochs: 1}

Any field can be overridden on the command line as `section.key=value`, for example
`sft.training.learning_rate=1e-5` or `model.name_or_path=./my-model`. Unknown keys fail with a
suggestion, values are checked against the field's type and, for numbers, its valid range (`RANGES`:
every numeric field of our sections and the common ones of the Hugging Face/TRL `training` sections), and
`${output}` in any string is replaced by the run directory. `rlhf-dist fields STAGE` lists every field with
its help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from transformers import TrainingArguments
from trl import DPOConfig as TRLDPOConfig
from trl import RewardConfig as TRLRewardConfig
from trl import SFTConfig as TRLSFTConfig

from rlhf_dist.errors import ConfigError
from rlhf_dist.recipe import (  # noqa: F401 - re-exported: part of this module's interface
    STAGE_ORDER,
    RecipeLoader,
    apply_overrides,
    load_recipe,
    parse_yaml,
    shipped_recipes,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The process group's timeout (seconds): a backstop behind the watchdog's limits, so it must exceed them (the
# defaults of WatchdogConfig are at most 3600 s); torch's own default is 1800 s for gloo, 600 s for NCCL.
DDP_TIMEOUT = 5400


# ----------------------------------------------------------------------------------------------
# Valid ranges of numeric fields (checked by `build` for every value a recipe or override sets, and by the
# `__post_init__` of our dataclasses that call `check_ranges`)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Valid values of a numeric field: [low, high], either end open or absent, plus a few special values
    (`also`, e.g. HF's max_steps=-1). null is valid wherever the field's type allows it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    unit: str = ""  # what the number is, for the message: "a number of seconds"

    def ok(self, value: float) -> bool:
        if value in self.also:
            return True
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return not (isinstance(value, float) and math.isnan(value))

    def describe(self, nullable: bool = False) -> str:
        if self.low is not None and self.high is not None:
            text = (f"within {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "a number"
        if self.unit:
            text = f"{self.unit} {text}"
        special = [f"{v:g}" for v in self.also]
        return " or ".join([*special, text, *(["null"] if nullable else [])])



POSITIVE = Range(0, low_open=True)  # > 0
NON_NEGATIVE = Range(0)  # >= 0
AT_LEAST_1 = Range(1)  # >= 1 (counts, sizes, lengths)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
UNIT_CLOSED = Range(0, 1)  # [0, 1]
PROBABILITY = Range(0, 1, low_open=True)  # (0, 1]
SECONDS = Range(0, low_open=True, unit="a number of seconds")

# Field name -> valid range. A key "Class.field" applies to that class and its subclasses and wins over the bare
# field name, which applies to a field of that name in any section: ours and the Hugging Face/TRL `training`
# classes alike. Every int/float field of our own dataclasses must have a rule (tests/test_config_checks.py).
RANGES: dict[str, Range] = {
    # optimisation
    "learning_rate": POSITIVE,
    "value_learning_rate": POSITIVE,
    "num_train_epochs": POSITIVE,
    "max_steps": Range(1, also=(-1,)),  # Hugging Face: -1 = num_train_epochs decides
    "warmup_steps": NON_NEGATIVE,  # Hugging Face: a float below 1 is a share of the steps
    "warmup_ratio": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,  # Hugging Face: 0 = no clipping
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": POSITIVE,
    "label_smoothing_factor": FRACTION,
    "neftune_noise_alpha": NON_NEGATIVE,
    "router_aux_loss_coef": NON_NEGATIVE,
    # batches and steps
    "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "eval_accumulation_steps": AT_LEAST_1,
    "rollout_batch_size": AT_LEAST_1,
    "samples_per_prompt": AT_LEAST_1,
    "generation_batch_size": AT_LEAST_1,
    "mini_batch_size": AT_LEAST_1,
    "ppo_epochs": AT_LEAST_1,
    "precompute_ref_batch_size": AT_LEAST_1,
    "logging_steps": POSITIVE,  # Hugging Face: a float below 1 is a share of the steps
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": NON_NEGATIVE,  # Hugging Face: 0 = keep all
    "torch_empty_cache_steps": AT_LEAST_1,
    "ref_model_sync_steps": AT_LEAST_1,
    # lengths
    "max_length": AT_LEAST_1,
    "max_prompt_length": AT_LEAST_1,
    "max_completion_length": AT_LEAST_1,
    "max_seq_length": AT_LEAST_1,
    "block_size": AT_LEAST_1,
    "max_new_tokens": AT_LEAST_1,
    "pad_to_multiple_of": AT_LEAST_1,
    # data and processes
    "eval_fraction": FRACTION,
    "max_samples": AT_LEAST_1,
    "max_eval_samples": AT_LEAST_1,
    "eval_max_prompts": AT_LEAST_1,
    "num_sample_completions": NON_NEGATIVE,
    "num_proc": AT_LEAST_1,
    "dataset_num_proc": AT_LEAST_1,
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": AT_LEAST_1,
    "ddp_timeout": AT_LEAST_1,  # seconds
    "ddp_bucket_cap_mb": AT_LEAST_1,
    "seed": NON_NEGATIVE,
    "data_seed": NON_NEGATIVE,
    "dropout": FRACTION,
    # sampling
    "temperature": POSITIVE,
    "top_k": NON_NEGATIVE,
    "top_p": PROBABILITY,
    # preference and RL coefficients
    "beta": POSITIVE,  # DPO: 0 gives a constant (sigmoid) or infinite (IPO) loss
    "label_smoothing": Range(0, 0.5, high_open=True),  # TRL: a label-flip probability in [0, 0.5)
    "ld_alpha": UNIT_CLOSED,
    "ref_model_mixup_alpha": UNIT_CLOSED,
    "discopop_tau": POSITIVE,
    "center_rewards_coefficient": NON_NEGATIVE,
    "kl_coef": NON_NEGATIVE,
    "kl_target": POSITIVE,
    "kl_horizon": POSITIVE,
    "kl_clamp": POSITIVE,
    "missing_eos_penalty": NON_NEGATIVE,
    "reward_clip": POSITIVE,
    "gamma": UNIT_CLOSED,
    "lam": UNIT_CLOSED,
    "clip_eps": POSITIVE,
    "value_clip": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "entropy_coef": NON_NEGATIVE,
    # our classes, where the bare name means something else there
    "LoraConfig.r": AT_LEAST_1,
    "LoraConfig.alpha": POSITIVE,
    "PPOTrainingConfig.max_steps": AT_LEAST_1,  # null = num_train_epochs decides
    "PPOTrainingConfig.save_steps": NON_NEGATIVE,  # 0 = only at the end
    "PPOTrainingConfig.save_total_limit": AT_LEAST_1,
    "PPOTrainingConfig.max_grad_norm": POSITIVE,  # null = no clipping
    "GuardRule.limit": NON_NEGATIVE,  # null = rule off
    "GuardRule.patience": AT_LEAST_1,
    "GuardrailsConfig.max_skipped": AT_LEAST_1,
    "GuardrailsConfig.heldout_every": NON_NEGATIVE,  # 0 = never
    "RollbackConfig.lr_factor": PROBABILITY,
    "RollbackConfig.kl_factor": AT_LEAST_1,
    "RollbackConfig.max_rollbacks": NON_NEGATIVE,
    **{f"WatchdogConfig.{phase}": SECONDS  # null = not watched
       for phase in ("train_step", "rollout", "score", "gather", "update", "evaluate", "save", "finish")},
}


def range_rule(cls: type, name: str) -> Range | None:
    """The valid range of field `name` of dataclass `cls` (see RANGES), or None if it has none."""
    for klass in getattr(cls, "__mro__", (cls,)):
        rule = RANGES.get(f"{klass.__name__}.{name}")
        if rule is not None:
            return rule
    return RANGES.get(name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _allows_none(tp: Any) -> bool:
    return tp is type(None) or (typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp))


def range_error(cls: type, name: str, value: Any, where: str, tp: Any = None) -> str | None:
    """'WHERE must be RANGE, got VALUE' for a value outside field `name`'s range (see RANGES); None if it is within,
    not a number, or the field has no rule. `tp`, the field's type, says whether null is valid too."""
    rule = range_rule(cls, name) if _is_number(value) else None
    if rule is None or rule.ok(value):
        return None
    return f"{where} must be {rule.describe(_allows_none(tp))}, got {value!r}"


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Raise ValueError for the first numeric field of dataclass `obj` outside its range (for `__post_init__`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        message = range_error(type(obj), f.name, getattr(obj, f.name), f"{prefix}{f.name}", hints.get(f.name))
        if message is not None:
            raise ValueError(message)


# ----------------------------------------------------------------------------------------------
# Shared sections
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
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
class LoraConfig:
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
class QuantizationConfig:
    """bitsandbytes quantisation of the frozen base weights (QLoRA). Needs lora.enabled to train."""

    load_in_4bit: bool = field(default=False, metadata={"help": "Load base weights in 4 bit (NF4/FP4)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load base weights in 8 bit (LLM.int8)."})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(default=True, metadata={"help": "Quantise the quantisation constants too."})
    compute_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="bfloat16", metadata={"help": "Dtype of the matmuls on dequantised weights."}
    )


@dataclass
class DataConfig:
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
class WatchdogConfig:
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

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
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


@dataclass
class PretrainConfig(StageConfig):
    """Domain-adaptive causal-LM training on raw text (perplexity before/after)."""

    block_size: int = field(default=512, metadata={"help": "Tokens per training block (texts are concatenated)."})
    training: TrainingArguments | None = None


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning (TRL SFTTrainer); loss on the completion by default."""

    training: TRLSFTConfig | None = None


@dataclass
class RewardConfig(StageConfig):
    """Reward model: a sequence classifier with one score, trained on preference pairs."""

    training: TRLRewardConfig | None = None


@dataclass
class DPOConfig(StageConfig):
    """Direct preference optimisation (TRL DPOTrainer)."""

    training: TRLDPOConfig | None = None


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (shown by `rlhf-dist fields`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class PPOTrainingConfig:
    """Hyper-parameters of our PPO loop (`rlhf_dist.rl.trainer`); defaults follow the N+ implementation details.

    Batch sizes count rollouts (prompt + sampled response) over ALL processes, so the same recipe
    computes the same thing on 1 or N processes: a step samples `rollout_batch_size` prompts x
    `samples_per_prompt` responses, then runs `ppo_epochs` passes of minibatches of
    `mini_batch_size` rollouts (one optimizer step each), each split into micro-batches of
    `per_device_train_batch_size` per process (gradient accumulation makes up the rest).
    """

    output_dir: str = _f("", "Set by --output (the stage's work directory); not a recipe key.")
    seed: int = _f(42, "Seed for the data order, sampling, minibatch shuffling and new heads.")
    max_steps: int | None = _f(None, "PPO steps (rollout + update). Default: num_train_epochs passes over the prompts.")
    num_train_epochs: int = _f(1, "Passes over the training prompts when max_steps is not set.")
    rollout_batch_size: int = _f(64, "Prompts per PPO step, over all processes (a multiple of the process count).")
    samples_per_prompt: int = _f(1, "Responses sampled per prompt (the group size k of RLOO/GRPO; >= 2 for those).")
    generation_batch_size: int = _f(16, "Rollouts generated and scored per forward pass on each process.")
    mini_batch_size: int = _f(16, "Rollouts per optimizer step, over all processes.")
    per_device_train_batch_size: int = _f(4, "Rollouts per forward/backward on each process (micro-batch).")
    ppo_epochs: int = _f(1, "Passes over each step's rollouts (each pass reshuffles the minibatches).")
    learning_rate: float = _f(3.0e-6, "Adam learning rate of the policy.")
    value_learning_rate: float | None = _f(None, "Learning rate of the value model / head (default: learning_rate).")
    adam_epsilon: float = _f(1.0e-5, "Adam epsilon (1e-5, docs/ppo.md item 17).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm (policy and value together); null = no clipping.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _f("linear", "Learning-rate schedule over all optimizer steps.")
    warmup_steps: int = _f(0, "Optimizer steps of linear warm-up.")
    max_prompt_length: int = _f(512, "Longest prompt in tokens; a longer prompt is an error (before training).")
    max_new_tokens: int = _f(64, "Longest response in tokens.")
    temperature: float = _f(0.7, "Sampling temperature; also divides the logits of every log-probability (docs/ppo.md item 13).")
    top_k: int = _f(0, "Top-k sampling; 0 = off (keep off: the ratio is then exactly 1 at the first minibatch, "
                    "docs/ppo.md item 14).")
    top_p: float = _f(1.0, "Nucleus sampling; 1.0 = off (see top_k).")
    stop_tokens: list[str] = _f([], "Tokens that end a response besides the tokenizer's EOS (e.g. an end-of-turn token).")
    ignore_eos: bool = _f(False, "Do not stop at the tokenizer's EOS: every response runs to max_new_tokens unless it "
                          "meets one of stop_tokens (fixed-length rollouts, e.g. for benchmarks).")
    rollout_logprobs: Literal["forward", "generate"] = _f(
        "forward", "Where the rollout's policy log-probabilities come from. forward: a second policy pass after "
        "generation, the same function as the training forward, so the first ratio is exactly 1. generate: recorded "
        "while sampling, saving that pass (about 1/6 of a step's compute); equal up to float rounding (~1e-6 in fp32, "
        "more in bf16). A value head on the policy reads the sampling pass's hidden states then: no policy pass at all.")
    missing_eos_penalty: float | None = _f(
        None, "Subtracted from the score of a response that never stopped (docs/ppo.md item 5).")
    reward_normalization: bool = _f(False, "Normalise scores with their running mean and std (docs/ppo.md item 8).")
    reward_clip: float | None = _f(None, "Clip (normalised) scores to [-reward_clip, reward_clip].")
    kl_estimator: Literal["k1", "k2", "k3"] = _f(
        "k1", "Per-token KL estimator in the reward: k1 = logp - logp_ref, k3 = (r - 1) - log r.")
    kl_clamp: float | None = _f(10.0, "Clamp each token's KL estimate to [-kl_clamp, kl_clamp].")
    kl_coef: float = _f(0.05, "KL coefficient beta (the initial value when adaptive_kl).")
    adaptive_kl: bool = _f(False, "Adapt beta towards kl_target (Ziegler et al. 2019).")
    kl_target: float = _f(6.0, "Adaptive KL: target KL per response (nats).")
    kl_horizon: float = _f(10000.0, "Adaptive KL: horizon in rollouts.")
    advantage_estimator: Literal["gae", "rloo", "grpo"] = _f(
        "gae", "gae: value model + GAE; rloo / grpo: critic-free group baselines over samples_per_prompt responses.")
    gamma: float = _f(1.0, "GAE discount.")
    lam: float = _f(0.95, "GAE lambda.")
    whiten_advantages: bool | None = _f(
        None, "Whiten advantages over all valid tokens of the step (all processes, docs/ppo.md item 10). Default: on for gae, "
        "off for rloo/grpo (their baselines are already centred; whitening would blow up noise in steps without signal).")
    clip_eps: float = _f(0.2, "Policy ratio clip epsilon.")
    value_clip: float | None = _f(0.2, "Value clip range; null = unclipped value loss.")
    vf_coef: float = _f(0.1, "Value loss coefficient.")
    entropy_coef: float = _f(0.0, "Entropy bonus coefficient (0 = off).")
    loss_aggregation: Literal["token", "sequence"] = _f(
        "token", "token: every valid token of a minibatch weighs the same; sequence: every response does.")
    bf16: bool = _f(False, "bfloat16 mixed precision (GPUs that support it; our default turns it on there).")
    fp16: bool = _f(False, "float16 mixed precision.")
    activation_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, more time).")
    split_backward: bool | None = _f(
        None, "Run the policy's pass and backward, then the value function's, so only one pass's activations are alive "
        "(same gradients; less memory at no cost). Default: on with one process and a separate value model or value "
        "adapter; always off on several processes (DDP and DeepSpeed expect one backward per forward).")
    use_cpu: bool = _f(False, "Run on CPU even if a GPU is present (always the case without one).")
    ddp_timeout: int = _f(DDP_TIMEOUT, "Timeout of every collective (seconds): the process group's, set where it is "
                          "created. Keep it above the watchdog's limits, which report a stall with its phase first.")
    logging_steps: int = _f(1, "Log metrics every N steps (JSONL, TensorBoard, progress bar).")
    num_sample_completions: int = _f(3, "Sample completions written to the log (samples.jsonl) each logged step.")
    report_to: list[str] = _f(["tensorboard"], "Trackers besides the JSONL log: tensorboard, or [] for none.")
    save_steps: int = _f(50, "Write a checkpoint every N steps (0 = only at the end); --resume continues from the last.")
    save_total_limit: int = _f(2, "Checkpoints kept (older ones are deleted).")
    eval_max_prompts: int = _f(64, "Held-out prompts used for the before/after reward and KL.")

    def __post_init__(self):
        check_ranges(self, "training.")  # every numeric field within its range (RANGES)
        if self.advantage_estimator in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"training.advantage_estimator={self.advantage_estimator} compares samples of the same "
                             f"prompt: set training.samples_per_prompt >= 2 (got {self.samples_per_prompt})")
        rollouts = self.rollout_batch_size * self.samples_per_prompt
        if rollouts % self.mini_batch_size:
            raise ValueError(f"training.mini_batch_size={self.mini_batch_size} must divide the rollouts per step "
                             f"(rollout_batch_size x samples_per_prompt = {rollouts})")
        if self.bf16 and self.fp16:
            raise ValueError("training.bf16 and training.fp16 are both true; choose one")
        unknown = [r for r in self.report_to if r != "tensorboard"]
        if unknown:
            raise ValueError(f"training.report_to: unknown tracker(s) {unknown}; the PPO stage logs to JSONL always, and to "
                             "tensorboard if listed (report_to: [tensorboard] or [])")
        if self.whiten_advantages is None:
            self.whiten_advantages = self.advantage_estimator == "gae"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


GuardAction = Literal["warn", "stop", "rollback"]


@dataclass
class GuardRule:
    """A rule on one training metric of the PPO loop (`rlhf_dist.rl.guardrails`); limit null = off."""

    limit: float | None = _f(None, "Threshold of the rule (null: the rule is off).")
    action: GuardAction = _f("warn", "warn: log it; stop: end the run with a diagnosis; rollback: restore the last healthy "
                             "checkpoint and continue with guardrails.rollback's smaller learning rate / larger KL coefficient.")
    patience: int = _f(1, "Consecutive steps the rule must hold before it acts.")

    def __post_init__(self):
        check_ranges(self)  # limit >= 0 (or null: the rule is off), patience >= 1


@dataclass
class KLRule(GuardRule):
    limit: float | None = _f(50.0, "objective/kl (nats per response) above this.")
    patience: int = _f(3, "Consecutive steps the rule must hold before it acts.")


@dataclass
class EntropyRule(GuardRule):
    limit: float | None = _f(0.01, "policy/entropy (nats per token) below this: the policy stopped exploring.")
    patience: int = _f(3, "Consecutive steps the rule must hold before it acts.")


@dataclass
class RatioRule(GuardRule):
    limit: float | None = _f(10.0, "policy/ratio_max (new / old probability of a token) above this.")
    patience: int = _f(3, "Consecutive steps the rule must hold before it acts.")


@dataclass
class ValueLossRule(GuardRule):
    limit: float | None = _f(None, "value/loss above this (off by default: its scale is the reward's).")


@dataclass
class LengthRule(GuardRule):
    limit: float | None = _f(0.95, "rollout/response_length at or above this share of max_new_tokens: responses run to "
                             "the limit (a reward hacked by length). Off with ignore_eos.")
    patience: int = _f(5, "Consecutive steps the rule must hold before it acts.")


@dataclass
class HeldoutRule(GuardRule):
    limit: float | None = _f(None, "Reward hacking: the held-out score (every heldout_every steps) fell more than this "
                             "below its best while the training score rose above its value then.")


@dataclass
class RollbackConfig:
    """What `rollback` changes after restoring the last healthy checkpoint."""

    lr_factor: float = _f(0.5, "The learning rate is multiplied by this (each rollback).")
    kl_factor: float = _f(2.0, "The KL coefficient is multiplied by this (each rollback).")
    max_rollbacks: int = _f(2, "Rollbacks allowed in a run; one more stops it with the diagnosis.")

    def __post_init__(self):
        check_ranges(self)  # lr_factor within (0, 1], kl_factor >= 1, max_rollbacks >= 0


@dataclass
class GuardrailsConfig:
    """Training-health guardrails of the PPO loop (`rlhf_dist.rl.guardrails`): each step's metrics go through the
    rules below; what fires is logged (log.jsonl, TensorBoard, metrics.json) and acted on. The defaults only warn,
    and skip an optimizer step whose gradients are not finite: they never change a healthy run."""

    nonfinite: Literal["skip", "stop"] = _f(
        "skip", "NaN/Inf in a loss or in the gradients: skip that optimizer step on every process (counted), or stop. "
        "Under DeepSpeed, whose engine has stepped by then, it always stops.")
    max_skipped: int = _f(3, "Skipped optimizer steps in a row after which the run stops.")
    kl: KLRule = field(default_factory=KLRule, metadata={"help": "KL to the reference too high."})
    entropy: EntropyRule = field(default_factory=EntropyRule, metadata={"help": "Entropy collapse."})
    ratio: RatioRule = field(default_factory=RatioRule, metadata={"help": "Policy ratios too far from 1."})
    value_loss: ValueLossRule = field(default_factory=ValueLossRule, metadata={"help": "Value loss too high."})
    length: LengthRule = field(default_factory=LengthRule, metadata={"help": "Responses running to max_new_tokens."})
    heldout: HeldoutRule = field(default_factory=HeldoutRule, metadata={"help": "Training score up, held-out score down."})
    heldout_every: int = _f(0, "Evaluate the held-out prompts every N steps for the heldout rule (0: never).")
    rollback: RollbackConfig = field(default_factory=RollbackConfig, metadata={"help": "What a rollback changes."})

    def __post_init__(self):
        check_ranges(self, "guardrails.")  # max_skipped >= 1, heldout_every >= 0
        if self.heldout.limit is not None and self.heldout_every == 0:
            raise ValueError("guardrails.heldout.limit needs guardrails.heldout_every > 0 (how often to evaluate)")

    def rules(self) -> dict[str, GuardRule]:
        return {name: getattr(self, name) for name in ("kl", "entropy", "ratio", "value_loss", "length", "heldout")}


@dataclass
class PPOConfig(StageConfig):
    """RLHF with PPO (or the RLOO/GRPO group baselines): our own sharded rollout-update loop."""

    reward_model: str | None = _f(
        None, "Reward model (a one-label sequence classifier). Default: the run's reward stage output.")
    reward_fn: str | None = _f(
        None, "Instead of a reward model: a Python function module:function(prompts, completions) -> scores.")
    value_model: str | None = _f(
        None, "Model the value model starts from (gae only). Default: the reward model (docs/ppo.md item 18).")
    value_head: bool = _f(False, "Use a value head on the policy instead of a separate value model.")
    value_adapter: bool | None = _f(
        None, "With LoRA: the value function is its own adapter + a value head on the policy's (4-bit) base. "
              "Default: true with lora.enabled unless value_model or value_head is set.")
    reward_adapter: bool | None = _f(
        None, "With LoRA: score with the reward stage's LoRA adapter (reward_model/adapter) on the policy's base, so one "
              "base serves all four models. Default: when that adapter was trained on the same base.")
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig,
                                         metadata={"help": "Training-health rules and what they do."})
    training: PPOTrainingConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.reward_model and self.reward_fn:
            raise ValueError("reward_model and reward_fn are both set; choose one source of rewards")
        estimator = self.training.advantage_estimator if self.training is not None else "gae"
        if estimator != "gae" and (self.value_head or self.value_model or self.value_adapter):
            raise ValueError(f"value_head / value_model / value_adapter are for advantage_estimator=gae; {estimator} uses "
                             "no value function: remove them")
        if self.value_adapter and (self.value_head or self.value_model):
            raise ValueError("value_adapter, value_head and value_model are three kinds of value function; set one")

    @property
    def uses_value_adapter(self) -> bool:
        """value_adapter resolved: explicit, else on with LoRA and GAE when no other value function is set.
        (Not resolved in __post_init__: `models.base_config` turns LoRA off on a copy of this config.)"""
        if self.value_adapter is not None:
            return self.value_adapter
        estimator = self.training.advantage_estimator if self.training is not None else "gae"
        return bool(self.lora.enabled and estimator == "gae" and not self.value_head and not self.value_model)


STAGES: dict[str, type[StageConfig]] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "reward": RewardConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
}
# Where a stage takes its starting model from, most preferred first (the first complete one wins).
# (ppo's reward model comes from the reward stage, see PPOConfig.reward_model.)
UPSTREAM = {"pretrain": [], "sft": ["pretrain"], "reward": ["sft", "pretrain"], "ppo": ["sft", "pretrain"],
            "dpo": ["sft", "pretrain"]}
SHARED_SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "quantization": QuantizationConfig, "data": DataConfig,
                   "watchdog": WatchdogConfig}
RECIPE_KEYS = ["description", "stages", *SHARED_SECTIONS, *STAGES]
# Keys of the resolved config that do not change what a stage computes; ignored when deciding
# whether a run directory holds "the same run" (so such a change neither refuses nor re-runs a stage).
VOLATILE_KEYS = {"run_dir", "data.num_proc"} | {f"watchdog.{f.name}" for f in dataclasses.fields(WatchdogConfig)} | {
    f"training.{k}" for k in (
    "output_dir", "logging_dir", "run_name", "report_to", "disable_tqdm", "logging_steps", "logging_strategy",
    "logging_first_step", "log_level", "log_level_replica", "hub_token", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "save_strategy", "save_steps", "save_total_limit", "save_only_model", "per_device_eval_batch_size",
    "eval_accumulation_steps", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataset_num_proc", "num_sample_completions", "eval_max_prompts", "ddp_timeout",
)}
# Tokenizer-token fields of TRL configs: not secrets, whatever their name ends with.
TOKENIZER_FIELDS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}


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


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _bad(value: Any, tp: Any, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}); fix the value in the recipe "
        f"or override it with {where}=VALUE"
    )


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _bad(value, tp, where)
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise _bad(value, tp, where)
    if origin is Literal:
        if value in args:
            return value
        raise _bad(value, tp, where)
    if tp is type(None):
        if value is None:
            return None
        raise _bad(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise _bad(value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _bad(value, tp, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad(value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(value, tp, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = {m.value for m in tp}
        if isinstance(value, tp) or value in valid:
            return value
        raise _bad(value, tp, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _bad(value, tp, where)
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _bad(value, tp, where)
        vt = args[1] if len(args) == 2 else Any
        return {k: coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    return value


def unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    full = f"{where}.{key}" if where else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else (
        f"valid keys: {', '.join(sorted(valid))}" if len(valid) <= 12 else "run `rlhf-dist fields STAGE` for the list"
    )
    return ConfigError(f"unknown key '{full}'; {hint}")


def _dataclass_type(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key_error(str(key), names, where)
        sub = _dataclass_type(hints[key])
        if sub is not None:
            kwargs[key] = build(sub, value, f"{where}.{key}")
            continue
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
        message = range_error(cls, key, kwargs[key], f"{where}.{key}", hints[key])
        if message is not None:
            raise ConfigError(f"{message}; fix it in the recipe or override {where}.{key}=VALUE")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: {first}") from None


# ----------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------
# RecipeLoader, parse_yaml, shipped_recipes, load_recipe, apply_overrides: rlhf_dist.recipe (light to import).


SECRET_KEY = re.compile(r"(token|secret|password|api_key)$", re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """Field or override names whose values are credentials (hub_token, wandb_api_key, ...)."""
    return name not in TOKENIZER_FIELDS and bool(SECRET_KEY.search(name))


def redact_overrides(overrides: list[str]) -> list[str]:
    """Overrides as they may be shown or saved: values of token/secret/password keys hidden."""
    out = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        out.append(f"{key}=<redacted>" if sep and is_secret_key(key.split(".")[-1]) else item)
    return out


def _substitute(value: Any, output: str) -> Any:
    if isinstance(value, str):
        return value.replace("${output}", output)
    if isinstance(value, dict):
        return {k: _substitute(v, output) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, output) for v in value]
    return value


def validate_recipe(raw: dict, source: str) -> list[str]:
    """Check top-level keys and shared sections; return the recipe's stage list."""
    for key in raw:
        if key not in RECIPE_KEYS:
            raise _with_source(unknown_key_error(str(key), RECIPE_KEYS, ""), source)
    for name, cls in SHARED_SECTIONS.items():
        try:
            build(cls, raw.get(name), name)
        except ConfigError as exc:
            raise _with_source(exc, source) from None
    stages = raw.get("stages", [s for s in STAGE_ORDER if s in raw])
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    if not isinstance(stages, list):
        raise ConfigError(f"{source}: stages: expected a list such as [sft, reward, dpo], got {stages!r}")
    for stage in stages:
        if stage not in STAGES:
            raise _with_source(unknown_key_error(str(stage), list(STAGES), "stages"), source)
    return stages


def _with_source(exc: ConfigError, source: str) -> ConfigError:
    return ConfigError(f"{source}: {exc}")


def stage_dict(raw: dict, stage: str, output: str) -> dict:
    """The stage's section with the shared sections merged under it and `${output}` substituted."""
    section = raw.get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{stage}: expected a mapping of keys, got {section!r}")
    merged = dict(section)
    for name in SHARED_SECTIONS:
        shared, own = raw.get(name) or {}, section.get(name) or {}
        if isinstance(shared, dict) and isinstance(own, dict):
            merged[name] = {**shared, **own}
    training = section.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError(f"{stage}.training: expected a mapping of keys, got {training!r}")
    if "output_dir" in training:
        raise ConfigError(f"{stage}.training.output_dir: set by --output; remove it from the recipe")
    defaults = training_defaults()
    if stage == "ppo":  # our own loop: its dataclass has its own defaults; only the device-dependent one applies
        defaults = {"bf16": defaults["bf16"]}
    merged["training"] = {**defaults, **training}
    return _substitute(merged, output)


def resolve_stage(raw: dict, source: str, stage: str, output: str, work_dir: str) -> StageConfig:
    """Build the typed config of one stage from a raw recipe (after overrides)."""
    validate_recipe(raw, source)
    cls = STAGES[stage]
    try:
        merged = stage_dict(raw, stage, output)
        merged["training"]["output_dir"] = work_dir
        cfg = build(cls, merged, stage)
    except ConfigError as exc:
        raise _with_source(exc, source) from None
    # data.num_proc also drives TRL's own tokenisation unless training.dataset_num_proc says otherwise.
    if cfg.data.num_proc and getattr(cfg.training, "dataset_num_proc", 0) is None:
        cfg.training.dataset_num_proc = cfg.data.num_proc
    return cfg


def to_dict(cfg: StageConfig) -> dict:
    """A plain, YAML-safe dict of a resolved stage config, credentials redacted."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "training":
            # TrainingArguments.to_dict turns enums into strings but masks every `*_token` field,
            # tokenizer tokens included; keep those, and mask only real credentials.
            value = value.to_dict()  # the HF classes' own, or PPOTrainingConfig's
            for key in value:
                if key in TOKENIZER_FIELDS:
                    value[key] = getattr(cfg.training, key)
                elif is_secret_key(key) and value[key] is not None:
                    value[key] = "<redacted>"
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out[f.name] = value
    return json.loads(json.dumps(out, default=str))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _stable(resolved: dict) -> dict[str, str]:
    """Dotted key -> JSON value, volatile keys dropped, the run directory written as ${output}."""
    run_dir = resolved.get("run_dir")
    out = {}
    for key, value in _flatten(resolved).items():
        if key in VOLATILE_KEYS:
            continue
        text = json.dumps(value, sort_keys=True)
        out[key] = text.replace(run_dir, "${output}") if run_dir else text
    return out


def fingerprint(resolved: dict) -> str:
    """Hash of what decides a stage's result; unchanged by volatile keys or by moving the run directory."""
    return hashlib.sha256(json.dumps(_stable(resolved), sort_keys=True).encode()).hexdigest()[:16]


def diff_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (volatile keys ignored)."""
    a, b = _stable(old), _stable(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def field_help(stage: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field of a stage, for `rlhf-dist fields STAGE`."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            sub = _dataclass_type(hints[f.name])
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            rows.append((f"{prefix}{f.name}", repr(default), " ".join(str(f.metadata.get("help", "")).split())))

    walk(STAGES[stage], f"{stage}.")
    return rows
