"""Plain values (YAML, overrides) turned into typed dataclasses: type checks, valid ranges, did-you-mean errors.

`build(cls, data, where)` instantiates a config dataclass from a dict, rejecting unknown keys (with a suggestion),
values of the wrong type and numbers outside their field's range (`RANGES`), each in one line that names the key.
Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from rlhf_dist.errors import ConfigError


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
    "desirable_weight": POSITIVE,  # KTO: the weights of the desirable and undesirable losses
    "undesirable_weight": POSITIVE,
    "kl_coef": NON_NEGATIVE,
    "kl_target": POSITIVE,
    "kl_horizon": POSITIVE,
    "kl_clamp": POSITIVE,
    "missing_eos_penalty": NON_NEGATIVE,
    "reward_clip": POSITIVE,
    "gamma": UNIT_CLOSED,
    "lam": UNIT_CLOSED,
    "clip_eps": POSITIVE,
    "clip_eps_low": NON_NEGATIVE,
    "clip_eps_high": NON_NEGATIVE,
    "overlong_buffer": AT_LEAST_1,
    "overlong_penalty_factor": NON_NEGATIVE,
    "dynamic_sampling_max_rounds": AT_LEAST_1,
    "reward_target_mean": Range(),  # any number
    "reward_target_std": POSITIVE,
    "value_clip": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "entropy_coef": NON_NEGATIVE,
    # our classes, where the bare name means something else there
    "LoraSection.r": AT_LEAST_1,
    "LoraSection.alpha": POSITIVE,
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
    **{f"WatchdogSection.{phase}": SECONDS  # null = not watched
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
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string; an override gives every value as text
            try:
                return tp(value)
            except ValueError:
                raise _bad(value, tp, where) from None
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (tp is float or whole):
            return tp(value)
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


def dataclass_type(tp: Any) -> type | None:
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
        sub = dataclass_type(hints[key])
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
