"""A recipe resolved into one stage's typed config: shared sections merged under the stage's own, our `training`
defaults under the user's values, `${output}` substituted, every key and value checked; and the way back (a plain,
redacted dict for config.yaml), and the field list of `rlhf-dist fields STAGE`."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any

from rlhf_dist import registry
from rlhf_dist.config.coerce import build, dataclass_type, unknown_key_error
from rlhf_dist.config.sections import (
    DataSection,
    LoraSection,
    ModelSection,
    QuantizationSection,
    StageConfig,
    WatchdogSection,
)
from rlhf_dist.errors import ConfigError

SHARED_SECTIONS = {"model": ModelSection, "lora": LoraSection, "quantization": QuantizationSection, "data": DataSection,
                   "watchdog": WatchdogSection}
RECIPE_KEYS = ["description", "stages", *SHARED_SECTIONS, *registry.STAGES]
# Tokenizer-token fields of TRL configs: not secrets, whatever their name ends with.
TOKENIZER_FIELDS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}


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
    stages = raw.get("stages", [s for s in registry.STAGES if s in raw])
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    if not isinstance(stages, list):
        raise ConfigError(f"{source}: stages: expected a list such as [sft, reward, dpo], got {stages!r}")
    for stage in stages:
        if stage not in registry.STAGES:
            raise _with_source(unknown_key_error(str(stage), list(registry.STAGES), "stages"), source)
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
    from rlhf_dist.config.stages import training_defaults

    defaults = training_defaults()
    if not registry.get(stage).hf_trainer:  # our own loop: its dataclass has its own defaults; only bf16 depends on the device
        defaults = {"bf16": defaults["bf16"]}
    merged["training"] = {**defaults, **training}
    return _substitute(merged, output)


def resolve_stage(raw: dict, source: str, stage: str, output: str, work_dir: str) -> StageConfig:
    """Build the typed config of one stage from a raw recipe (after overrides)."""
    validate_recipe(raw, source)
    cls = registry.get(stage).config_class()
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


def field_help(stage: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field of a stage, for `rlhf-dist fields STAGE`."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            sub = dataclass_type(hints[f.name])
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            rows.append((f"{prefix}{f.name}", repr(default), " ".join(str(f.metadata.get("help", "")).split())))

    walk(registry.get(stage).config_class(), f"{stage}.")
    return rows
