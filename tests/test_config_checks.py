"""Config checks complete before anything is claimed: YAML errors keep their position, every numeric field has a
valid range checked when the config is built, and a run directory an attempt claimed without checkpointing anything
does not refuse the corrected re-run. Fast: nothing here loads a model."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import pytest
from trl import SFTConfig as TRLSFTConfig

from rlhf_dist import registry, rundir
from rlhf_dist.config.coerce import RANGES, Range, range_error, range_rule
from rlhf_dist.config.ppo import KLRule, PPOTrainingConfig
from rlhf_dist.config.resolve import SHARED_SECTIONS, resolve_stage, validate_recipe
from rlhf_dist.config.sections import WatchdogSection
from rlhf_dist.errors import ConfigError, RunDirError
from rlhf_dist.recipe import apply_overrides, load_recipe, shipped_recipes

DEMO = str(shipped_recipes()["demo"])


def resolve(raw: dict, stage: str, tmp_path: Path, source: str = DEMO):
    return resolve_stage(raw, source, stage, str(tmp_path), str(tmp_path / "w"))


def config_error(overrides: list[str], stage: str, tmp_path: Path) -> str:
    raw, _ = load_recipe("demo")
    with pytest.raises(ConfigError) as info:
        resolve(apply_overrides(raw, overrides), stage, tmp_path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------
# 1. YAML syntax errors keep file, line and column
# ----------------------------------------------------------------------------------------------
def load_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    message = str(info.value)
    assert "\n" not in message, message
    return path, message


def test_yaml_error_names_line_and_column(tmp_path):
    text = ("model: {name_or_path: base}\n"
            "stages: [sft]\n"
            "sft:\n"
            "  data: {path: d.jsonl}\n"
            "  training:\n"
            "    learning_rate: 1e-5\n"
            "  lora: enabled: true\n")  # line 7: a second `key:` on one line
    path, msg = load_error(tmp_path, text)
    assert msg == (f"{path} line 7, column 16: not valid YAML: mapping values are not allowed here; "
                   "fix the indentation or quoting there")


def test_yaml_error_names_where_the_unclosed_part_starts(tmp_path):
    path, msg = load_error(tmp_path, "sft:\n  data: {path: d.jsonl\n  training: {}\n")
    assert msg.startswith(f"{path} line 3, column 11: not valid YAML: ")
    assert "while parsing a flow mapping that starts at line 2, column 9" in msg
    assert msg.endswith("; fix the indentation or quoting there")


@pytest.mark.parametrize("text, line, column, problem", [
    ("sft:\n  data:\n\tpath: x\n", 3, 1, "found character '\\t' that cannot start any token"),
    ("sft:\n  data:\n    path: 'x.jsonl\n", 4, 1, "found unexpected end of stream"),
    ("sft:\n  data: {path: a\x07b}\n", 2, 17, "unacceptable character '\\x07'"),  # a reader error: no mark, an offset
    ("sft:\n  data:\n    path: x\n   split: y\n", 4, 4, "expected <block end>"),
])
def test_yaml_errors_are_one_line_with_a_1_based_position(tmp_path, text, line, column, problem):
    path, msg = load_error(tmp_path, text)
    assert msg.startswith(f"{path} line {line}, column {column}: not valid YAML: "), msg
    assert problem in msg


def test_override_that_is_not_valid_yaml_is_named():
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["sft.training.learning_rate=1e-5", "sft.data.columns={prompt: q"])
    assert str(info.value) == (
        "override 'sft.data.columns' (value '{prompt: q') column 11: not valid YAML: expected ',' or '}', but got "
        "'<stream end>' (while parsing a flow mapping that starts at line 1, column 1); fix the value, or put it in "
        "quotes to pass it as a string")
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["sft.data.path=a: b: c"])
    assert str(info.value).startswith("override 'sft.data.path' (value 'a: b: c') column 5: not valid YAML: "
                                      "mapping values are not allowed here")
    # quoted, the same text is a string
    assert apply_overrides({}, ["sft.data.path='a: b: c'"]) == {"sft": {"data": {"path": "a: b: c"}}}


# ----------------------------------------------------------------------------------------------
# 2. A valid range for every numeric field
# ----------------------------------------------------------------------------------------------
def _numeric(tp: typing.Any) -> bool:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(a in (int, float) for a in args)


def _ours(tp: typing.Any) -> list[type]:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [a for a in args if dataclasses.is_dataclass(a) and a.__module__.startswith("rlhf_dist.config.")]


def our_numeric_fields() -> dict[str, tuple[type, str, typing.Any]]:
    """'Class.field' -> (class, field, type) for every int/float field of our own dataclasses, found recursively
    from the stage configs and the shared sections (the Hugging Face/TRL training classes are not ours)."""
    found, seen = {}, set()

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for sub in _ours(hints[f.name]):
                walk(sub)
            if _numeric(hints[f.name]):
                found[f"{cls.__name__}.{f.name}"] = (cls, f.name, hints[f.name])

    for cls in [*(s.config_class() for s in registry.STAGES.values()), *SHARED_SECTIONS.values()]:
        walk(cls)
    return found


def test_every_numeric_field_of_our_dataclasses_has_a_range():
    fields = our_numeric_fields()
    # the walk reaches every kind of section (so a new numeric field anywhere is caught)
    assert {"LoraSection.r", "LoraSection.alpha", "LoraSection.dropout", "DataSection.eval_fraction", "DataSection.seed",
            "DataSection.max_samples", "WatchdogSection.train_step", "PretrainStageConfig.block_size",
            "PPOTrainingConfig.learning_rate", "PPOTrainingConfig.max_steps", "KLRule.limit", "HeldoutRule.patience",
            "RollbackConfig.lr_factor", "GuardrailsConfig.max_skipped"} <= set(fields)
    assert len(fields) > 60
    missing = [key for key, (cls, name, _) in fields.items() if range_rule(cls, name) is None]
    assert missing == [], f"numeric fields without a range in config.RANGES: {missing}"


def test_defaults_of_our_dataclasses_are_within_their_ranges():
    for key, (cls, name, tp) in our_numeric_fields().items():
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert range_error(cls, name, default, key, tp) is None, (key, default)


def walk_values(obj: typing.Any, prefix: str):
    """(dotted key, class, field, value, type) for every numeric field of a resolved config, training included."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk_values(value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{f.name}", type(obj), f.name, value, hints.get(f.name)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_resolves_every_stage_within_the_ranges(name, tmp_path):
    raw, source = load_recipe(name)
    checked, stages = 0, validate_recipe(raw, source)
    for stage in stages:
        cfg = resolve(raw, stage, tmp_path, source=source)
        for key, cls, field, value, tp in walk_values(cfg, f"{stage}."):
            assert range_error(cls, field, value, key, tp) is None, (name, key, value)
            checked += range_rule(cls, field) is not None
    # the HF/TRL training sections' common fields are covered too (a PPO-only recipe has our own fields only)
    assert checked > (100 if any(registry.get(s).hf_trainer for s in stages) else 50)


@pytest.mark.parametrize("override, stage, expected", [
    # the example, word for word
    ("sft.training.learning_rate=-1e-5", "sft", "sft.training.learning_rate must be > 0, got -1e-05"),
    ("sft.training.max_length=0", "sft", "sft.training.max_length must be >= 1 or null, got 0"),
    ("pretrain.block_size=0", "pretrain", "pretrain.block_size must be >= 1, got 0"),
    ("sft.training.max_steps=0", "sft", "sft.training.max_steps must be -1 or >= 1, got 0"),
    ("ppo.training.max_steps=-1", "ppo", "ppo.training.max_steps must be >= 1 or null, got -1"),
    ("reward.training.num_train_epochs=0", "reward", "reward.training.num_train_epochs must be > 0, got 0.0"),
    ("sft.training.per_device_train_batch_size=0", "sft",
     "sft.training.per_device_train_batch_size must be >= 1, got 0"),
    ("pretrain.training.gradient_accumulation_steps=0", "pretrain",
     "pretrain.training.gradient_accumulation_steps must be >= 1, got 0"),
    ("sft.training.warmup_steps=-1", "sft", "sft.training.warmup_steps must be >= 0, got -1.0"),
    ("sft.training.adam_beta2=1", "sft", "sft.training.adam_beta2 must be within [0, 1), got 1.0"),
    ("sft.training.adam_epsilon=0", "sft", "sft.training.adam_epsilon must be > 0, got 0.0"),
    ("sft.training.weight_decay=-0.1", "sft", "sft.training.weight_decay must be >= 0, got -0.1"),
    ("sft.training.seed=-1", "sft", "sft.training.seed must be >= 0, got -1"),
    ("dpo.training.beta=-0.1", "dpo", "dpo.training.beta must be > 0, got -0.1"),
    ("dpo.training.label_smoothing=0.5", "dpo", "dpo.training.label_smoothing must be within [0, 0.5), got 0.5"),
    ("sft.lora.r=0", "sft", "sft.lora.r must be >= 1, got 0"),
    ("sft.lora.alpha=0", "sft", "sft.lora.alpha must be > 0, got 0"),
    ("sft.lora.dropout=1", "sft", "sft.lora.dropout must be within [0, 1), got 1.0"),
    ("sft.data.max_samples=0", "sft", "sft.data.max_samples must be >= 1 or null, got 0"),
    ("sft.data.eval_fraction=-0.1", "sft", "sft.data.eval_fraction must be within [0, 1), got -0.1"),
    ("ppo.training.top_p=0", "ppo", "ppo.training.top_p must be within (0, 1], got 0.0"),
    ("ppo.training.top_k=-1", "ppo", "ppo.training.top_k must be >= 0, got -1"),
    ("ppo.training.temperature=0", "ppo", "ppo.training.temperature must be > 0, got 0.0"),
    ("ppo.training.kl_coef=-0.1", "ppo", "ppo.training.kl_coef must be >= 0, got -0.1"),
    ("ppo.training.vf_coef=-1", "ppo", "ppo.training.vf_coef must be >= 0, got -1.0"),
    ("ppo.training.max_grad_norm=0", "ppo", "ppo.training.max_grad_norm must be > 0 or null, got 0.0"),
    ("ppo.training.value_learning_rate=0", "ppo", "ppo.training.value_learning_rate must be > 0 or null, got 0.0"),
    ("ppo.training.learning_rate=.nan", "ppo", "ppo.training.learning_rate must be > 0, got nan"),
    ("ppo.watchdog.update=-5", "ppo", "ppo.watchdog.update must be a number of seconds > 0 or null, got -5.0"),
    ("ppo.guardrails.kl.patience=0", "ppo", "ppo.guardrails.kl.patience must be >= 1, got 0"),
    ("ppo.guardrails.entropy.limit=-1", "ppo", "ppo.guardrails.entropy.limit must be >= 0 or null, got -1.0"),
    ("ppo.guardrails.rollback.lr_factor=2", "ppo", "ppo.guardrails.rollback.lr_factor must be within (0, 1], got 2.0"),
])
def test_value_out_of_range_is_one_line_naming_key_and_bound(override, stage, expected, tmp_path):
    key = override.split("=")[0]
    msg = config_error([override], stage, tmp_path)
    assert msg == f"{DEMO}: {expected}; fix it in the recipe or override {key}=VALUE"


def test_shared_section_out_of_range_names_the_shared_key(tmp_path):
    msg = config_error(["lora.dropout=1.5"], "sft", tmp_path)
    assert msg == f"{DEMO}: lora.dropout must be within [0, 1), got 1.5; fix it in the recipe or override lora.dropout=VALUE"
    assert config_error(["data.max_eval_samples=-3"], "dpo", tmp_path) == (
        f"{DEMO}: data.max_eval_samples must be >= 1 or null, got -3; fix it in the recipe or override "
        "data.max_eval_samples=VALUE")


def test_range_is_checked_in_a_recipe_file_too(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  data: {path: d.jsonl}\n  training: {learning_rate: -1.0e-5}\n")
    raw, source = load_recipe(str(path))
    with pytest.raises(ConfigError) as info:
        resolve(raw, "sft", tmp_path, source=source)
    assert str(info.value) == (f"{path}: sft.training.learning_rate must be > 0, got -1e-05; fix it in the recipe or "
                               "override sft.training.learning_rate=VALUE")


@pytest.mark.parametrize("override, stage, key, value", [
    ("sft.training.max_steps=-1", "sft", "max_steps", -1),  # HF: epochs decide
    ("ppo.training.max_steps=null", "ppo", "max_steps", None),
    ("sft.training.max_length=null", "sft", "max_length", None),
    ("ppo.training.top_p=1", "ppo", "top_p", 1.0),
    ("ppo.training.top_k=0", "ppo", "top_k", 0),
    ("ppo.training.save_steps=0", "ppo", "save_steps", 0),
    ("ppo.training.max_grad_norm=null", "ppo", "max_grad_norm", None),
    ("ppo.training.gamma=1", "ppo", "gamma", 1.0),
    ("sft.training.max_grad_norm=0", "sft", "max_grad_norm", 0.0),  # HF: 0 = no clipping
    ("sft.training.warmup_steps=0.1", "sft", "warmup_steps", 0.1),  # HF: a share of the steps
    ("dpo.training.label_smoothing=0.1", "dpo", "label_smoothing", 0.1),
])
def test_values_on_the_bounds_are_accepted(override, stage, key, value, tmp_path):
    raw, _ = load_recipe("demo")
    cfg = resolve(apply_overrides(raw, [override]), stage, tmp_path)
    assert getattr(cfg.training, key) == value


@pytest.mark.parametrize("override, section, key, value", [
    ("sft.data.eval_fraction=0", "data", "eval_fraction", 0.0),  # no hold-out: a later, clearer error if none else
    ("sft.data.max_samples=null", "data", "max_samples", None),
    ("sft.lora.dropout=0", "lora", "dropout", 0.0),
    ("sft.watchdog.train_step=null", "watchdog", "train_step", None),
])
def test_section_values_on_the_bounds_are_accepted(override, section, key, value, tmp_path):
    raw, _ = load_recipe("demo")
    cfg = resolve(apply_overrides(raw, [override]), "sft", tmp_path)
    assert getattr(getattr(cfg, section), key) == value


def test_our_dataclasses_check_ranges_when_built_directly():
    with pytest.raises(ValueError, match=r"^training\.learning_rate must be > 0, got -1$"):
        PPOTrainingConfig(learning_rate=-1)
    with pytest.raises(ValueError, match=r"^training\.mini_batch_size must be >= 1, got 0$"):
        PPOTrainingConfig(mini_batch_size=0)
    with pytest.raises(ValueError, match=r"^patience must be >= 1, got 0$"):
        KLRule(patience=0)
    with pytest.raises(ValueError, match=r"^watchdog\.save must be a number of seconds > 0 or null, got 0$"):
        WatchdogSection(save=0)
    # the cross-field checks are still there
    with pytest.raises(ValueError, match="must divide the rollouts per step"):
        PPOTrainingConfig(rollout_batch_size=6, mini_batch_size=4)


def test_range_descriptions():
    assert Range(0, low_open=True).describe() == "> 0"
    assert Range(1).describe(nullable=True) == ">= 1 or null"
    assert Range(0, 1, high_open=True).describe() == "within [0, 1)"
    assert Range(0, 1, low_open=True).describe() == "within (0, 1]"
    assert Range(1, also=(-1,)).describe() == "-1 or >= 1"
    rule = Range(0, 1, high_open=True)
    assert rule.ok(0) and rule.ok(0.5) and not rule.ok(1) and not rule.ok(-0.01) and not rule.ok(math.nan)
    # a qualified rule wins over the bare field name, and applies to subclasses
    assert range_rule(PPOTrainingConfig, "max_steps") is RANGES["PPOTrainingConfig.max_steps"]
    assert range_rule(KLRule, "limit") is RANGES["GuardRule.limit"]
    assert range_rule(TRLSFTConfig, "max_steps") is RANGES["max_steps"]


def test_range_error_comes_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    import rlhf_dist.models
    from rlhf_dist.cli import main

    def no_loading(*a, **k):
        raise AssertionError("a tokenizer/model was loaded before the config was checked")

    monkeypatch.setattr(rlhf_dist.models, "load_tokenizer", no_loading)
    out = tmp_path / "run"
    assert main(["sft", "--recipe", "demo", "--output", str(out), "sft.training.learning_rate=-1e-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {DEMO}: sft.training.learning_rate must be > 0, got -1e-05; fix it in the recipe or "
                   "override sft.training.learning_rate=VALUE")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# 3. A run directory claimed by an attempt that checkpointed nothing does not refuse the corrected re-run
# ----------------------------------------------------------------------------------------------
def resolved(out: Path, lr: float) -> dict:
    return {"run_dir": str(out), "model": {"name_or_path": "base"}, "training": {"learning_rate": lr}}


def claimed(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A run directory whose sft stage an earlier attempt (learning rate 1.0) claimed."""
    out = tmp_path / "run"
    old = resolved(out, 1.0)
    work = rundir.prepare(out, "sft", old, rundir.StageAction("fresh"))
    return out, work, old


def checkpoint(work: Path, step: int, sealed: bool, seal_step: int | None = None) -> Path:
    folder = work / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    if sealed:
        rundir.seal_checkpoint(folder, step if seal_step is None else seal_step)
    return folder


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_changed_config_after_an_attempt_without_checkpoints_starts_fresh(tmp_path):
    out, work, _ = claimed(tmp_path)  # failed before its first checkpoint: only config.yaml
    new = resolved(out, 1e-5)
    plan = rundir.stage_action(out, "sft", new, overwrite=False, resume=False)
    assert plan.action == "fresh" and plan.checkpoint is None and plan.set_aside == []
    assert "wrote no complete checkpoint" in plan.reason and "training.learning_rate" in plan.reason
    rundir.prepare(out, "sft", new, plan)
    assert rundir._read_config(work) == new
    # the same config again: the ordinary fresh start
    assert rundir.stage_action(out, "sft", new, overwrite=False, resume=False) == rundir.StageAction("fresh")


def test_changed_config_after_an_attempt_with_only_unsealed_checkpoints_starts_fresh(tmp_path):
    out, work, _ = claimed(tmp_path)
    checkpoint(work, 2, sealed=False)  # killed while writing it
    checkpoint(work, 3, sealed=True, seal_step=2)  # a seal for another step does not make it complete
    (work / "runs").mkdir()
    (work / "runs" / "events").write_text("tensorboard")
    (work / rundir.UNHEALTHY).mkdir()
    (work / rundir.UNHEALTHY / "checkpoint-1").mkdir()  # condemned by a guardrail earlier: kept, never resumed
    new = resolved(out, 1e-5)
    plan = rundir.stage_action(out, "sft", new, overwrite=False, resume=False)
    assert plan.action == "fresh" and plan.checkpoint is None
    assert plan.set_aside == ["checkpoint-2", "checkpoint-3"]
    assert "wrote no complete checkpoint" in plan.reason and "2 incomplete checkpoint(s)" in plan.reason
    rundir.prepare(out, "sft", new, plan)
    # nothing deleted silently: the unsealed checkpoints are set aside, the condemned ones stay; the rest is new
    assert sorted(p.name for p in work.iterdir()) == [rundir.CONFIG_FILE, rundir.SET_ASIDE, rundir.UNHEALTHY]
    assert sorted(p.name for p in (work / rundir.SET_ASIDE).iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (work / rundir.SET_ASIDE / "checkpoint-2" / "model.safetensors").read_bytes() == b"weights"
    assert (work / rundir.UNHEALTHY / "checkpoint-1").is_dir()
    assert rundir._read_config(work) == new


def test_changed_config_after_an_attempt_with_a_sealed_checkpoint_is_refused(tmp_path):
    out, work, old = claimed(tmp_path)
    checkpoint(work, 4, sealed=True)
    checkpoint(work, 6, sealed=False)
    before = files(out)
    new = resolved(out, 1e-5)
    with pytest.raises(RunDirError) as info:
        rundir.stage_action(out, "sft", new, overwrite=False, resume=False)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"{work} holds an unfinished different run (differs in training.learning_rate) with a "
                       "complete checkpoint (checkpoint-4); pass --resume to continue it with the new config, "
                       "--overwrite to start the stage again, or choose another --output")
    assert files(out) == before  # planning touches nothing
    # the ways out still work
    resumed = rundir.stage_action(out, "sft", new, overwrite=False, resume=True)
    assert (resumed.action, resumed.checkpoint, resumed.set_aside) == ("resume", str(work / "checkpoint-4"),
                                                                       ["checkpoint-6"])
    assert rundir.stage_action(out, "sft", new, overwrite=True, resume=False).action == "fresh"
    # and the same config as the attempt resumes it
    same = rundir.stage_action(out, "sft", old, overwrite=False, resume=False)
    assert (same.action, same.checkpoint) == ("resume", str(work / "checkpoint-4"))
    assert json.loads((work / "checkpoint-4" / rundir.SEAL).read_text())["step"] == 4
