"""Typed recipes: shipped recipes resolve, overrides are typed, bad keys/values fail with one clear line."""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest
import trl
from helpers import cli
from transformers import TrainingArguments

from rlhf_dist import registry
from rlhf_dist.config.coerce import coerce, unknown_key_error
from rlhf_dist.config.identity import diff_keys, fingerprint
from rlhf_dist.config.ppo import PPOTrainingConfig
from rlhf_dist.config.resolve import field_help, redact_overrides, resolve_stage, to_dict, validate_recipe
from rlhf_dist.errors import ConfigError, UserError
from rlhf_dist.recipe import apply_overrides, load_recipe, shipped_recipes
from rlhf_dist.stages.eval import EvalTrainingConfig

HF_CLASSES = {
    "pretrain": TrainingArguments,
    "sft": trl.SFTConfig,
    "reward": trl.RewardConfig,
    "ppo": PPOTrainingConfig,  # our own loop's dataclass
    "dpo": trl.DPOConfig,
    "kto": trl.KTOConfig,
    "eval": EvalTrainingConfig,  # the eval stage's own settings
}
DEMO = str(shipped_recipes()["demo"])


def resolve(raw: dict, stage: str, tmp_path: Path, source: str = "recipe.yaml", work: str = "w"):
    return resolve_stage(raw, source, stage, str(tmp_path), str(tmp_path / work))


def demo_raw() -> dict:
    raw, source = load_recipe("demo")
    assert source == DEMO
    return raw


def config_error(raw: dict, stage: str, tmp_path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(apply_overrides(raw, list(overrides)), stage, tmp_path, source=DEMO)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------
# 1. Shipped recipes
# ----------------------------------------------------------------------------------------------
def test_demo_is_shipped():
    recipes = shipped_recipes()
    assert "demo" in recipes
    assert recipes["demo"].name == "demo.yaml" and recipes["demo"].is_file()


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipe_resolves_every_stage(name, tmp_path):
    raw, source = load_recipe(name)
    stages = validate_recipe(raw, source)
    assert stages, f"recipe {name} has no stages"
    assert set(stages) <= set(registry.STAGES)
    for stage in stages:
        cfg = resolve(raw, stage, tmp_path, source=source)
        assert type(cfg) is registry.get(stage).config_class()
        assert isinstance(cfg.training, HF_CLASSES[stage])
        if stage == "pretrain":
            assert type(cfg.training) is TrainingArguments
        assert cfg.training.output_dir == str(tmp_path / "w")
        # `${output}` is substituted everywhere
        assert "${output}" not in repr(to_dict(cfg))


def test_demo_values_arrive(tmp_path):
    raw = demo_raw()
    assert validate_recipe(raw, DEMO) == ["pretrain", "sft", "reward", "ppo", "dpo", "eval"]

    pre = resolve(raw, "pretrain", tmp_path)
    assert pre.block_size == 64
    assert pre.training.learning_rate == pytest.approx(3e-3)
    assert pre.training.num_train_epochs == 2
    assert pre.data.path == f"{tmp_path}/data/pretrain.jsonl"

    ppo = resolve(raw, "ppo", tmp_path)
    assert ppo.training.max_steps == 30 and ppo.training.ppo_epochs == 2 and ppo.training.missing_eos_penalty == 1.0
    assert ppo.training.logging_steps == 1  # our loop's default, not the HF stages' training_defaults
    assert ppo.data.path == f"{tmp_path}/data/prompts.jsonl" and ppo.reward_fn is None

    sft = resolve(raw, "sft", tmp_path)
    assert isinstance(sft.training, trl.SFTConfig)
    assert sft.training.learning_rate == pytest.approx(2e-3)
    assert sft.training.max_length == 128
    assert sft.training.logging_steps == 5  # recipe value wins over our default of 10
    assert sft.training.save_total_limit == 2  # our default (training_defaults)
    assert sft.data.path == f"{tmp_path}/data/sft.jsonl"
    assert sft.model.name_or_path == f"{tmp_path}/base_model"
    assert sft.model.dtype == "float32"
    # the shared `data` section is merged under the stage's own
    assert sft.data.eval_fraction == pytest.approx(0.1) and sft.data.seed == 0
    assert sft.lora.enabled is False

    reward = resolve(raw, "reward", tmp_path)
    assert reward.data.path == f"{tmp_path}/data/preference.jsonl"
    assert reward.training.num_train_epochs == 1

    dpo = resolve(raw, "dpo", tmp_path)
    assert dpo.training.beta == pytest.approx(0.1)
    assert dpo.training.learning_rate == pytest.approx(1e-3)
    assert dpo.training.loss_type == ["sigmoid", "sft"] and dpo.training.loss_weights == [1.0, 1.0]


def test_stage_section_overrides_shared_section(tmp_path):
    raw = {
        "model": {"name_or_path": "base", "dtype": "float32"},
        "data": {"seed": 7, "eval_fraction": 0.2},
        "sft": {"model": {"dtype": "bfloat16"}, "data": {"path": "x.jsonl", "seed": 1}},
    }
    cfg = resolve(raw, "sft", tmp_path)
    assert (cfg.model.name_or_path, cfg.model.dtype) == ("base", "bfloat16")
    assert (cfg.data.path, cfg.data.seed, cfg.data.eval_fraction) == ("x.jsonl", 1, pytest.approx(0.2))


# ----------------------------------------------------------------------------------------------
# 2. Overrides
# ----------------------------------------------------------------------------------------------
def test_overrides_are_typed_and_do_not_mutate(tmp_path):
    raw = demo_raw()
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, ["sft.training.learning_rate=1e-5", "model.dtype=bfloat16", "sft.lora.enabled=true"])
    assert raw == before
    assert raw["sft"]["training"]["learning_rate"] == pytest.approx(2e-3)
    # YAML 1.1 would read `1e-5` (no dot) as a string; our loader reads a float
    assert out["sft"]["training"]["learning_rate"] == 1e-5
    assert out["model"]["dtype"] == "bfloat16"
    assert out["sft"]["lora"] == {"enabled": True}

    sft = resolve(out, "sft", tmp_path)
    assert type(sft.training.learning_rate) is float and sft.training.learning_rate == 1e-5
    assert sft.model.dtype == "bfloat16"
    assert sft.lora.enabled is True
    # the other stages get the shared model change but not sft's lora
    pre = resolve(out, "pretrain", tmp_path)
    assert pre.model.dtype == "bfloat16" and pre.lora.enabled is False
    assert pre.training.learning_rate == pytest.approx(3e-3)


def test_yaml_recipe_float_without_dot_is_coerced(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  data: {path: d.jsonl}\n  training: {learning_rate: 1e-5, weight_decay: 5e-2}\n")
    raw, source = load_recipe(str(path))
    assert raw["sft"]["training"]["learning_rate"] == 1e-5  # a float already (YAML 1.1 would give a string)
    cfg = resolve(raw, "sft", tmp_path, source=source)
    assert cfg.training.learning_rate == 1e-5
    assert cfg.training.weight_decay == pytest.approx(0.05)


def test_override_creates_sections_and_parses_yaml_values(tmp_path):
    out = apply_overrides({}, ["sft.data.path=./d.jsonl", "sft.data.columns={prompt: q}", "stages=[sft]",
                                "sft.training.max_steps=3", "model.revision=", "sft.init_from=null"])
    assert out == {"sft": {"data": {"path": "./d.jsonl", "columns": {"prompt": "q"}}, "training": {"max_steps": 3},
                           "init_from": None},
                   "stages": ["sft"], "model": {"revision": ""}}
    cfg = resolve(out, "sft", tmp_path)
    assert cfg.data.columns == {"prompt": "q"} and cfg.training.max_steps == 3


def test_override_errors():
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["sft.training.learning_rate"])
    assert str(info.value) == ("override 'sft.training.learning_rate' is not KEY=VALUE; "
                               "write e.g. sft.training.learning_rate=1e-5")
    with pytest.raises(ConfigError) as info:
        apply_overrides({"sft": {"training": {"learning_rate": 1.0}}}, ["sft.training.learning_rate.x=1"])
    assert str(info.value) == "override 'sft.training.learning_rate.x': 'sft.training.learning_rate' is not a section"


def test_override_save_strategy_no(tmp_path):
    """YAML 1.1 would read `no` as False; recipes and overrides keep it a string."""
    raw = apply_overrides(demo_raw(), ["sft.training.save_strategy=no", "sft.training.eval_strategy=no",
                                         "sft.data.split=on", "sft.lora.enabled=true"])
    cfg = resolve(raw, "sft", tmp_path)
    assert cfg.training.save_strategy == "no" and cfg.training.eval_strategy == "no"
    assert cfg.data.split == "on" and cfg.lora.enabled is True


def test_recipe_with_unquoted_date_keeps_it_a_string(tmp_path):
    """YAML 1.1 would read 2024-01-01 as a date (not JSON, not a revision); recipes keep it a string."""
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: base, revision: 2024-01-01}\nsft: {data: {path: d.jsonl}}\n")
    raw, source = load_recipe(str(path))
    cfg = resolve(apply_overrides(raw, []), "sft", tmp_path, source=source)
    assert cfg.model.revision == "2024-01-01"


# ----------------------------------------------------------------------------------------------
# 3. Unknown keys
# ----------------------------------------------------------------------------------------------
def test_unknown_training_key_suggests(tmp_path):
    msg = config_error(demo_raw(), "sft", tmp_path, ["sft.training.learnig_rate=1"])
    assert msg == f"{DEMO}: unknown key 'sft.training.learnig_rate'; did you mean 'learning_rate'?"


def test_unknown_top_level_key_suggests():
    raw = demo_raw()
    raw["modle"] = {"name_or_path": "x"}
    with pytest.raises(ConfigError) as info:
        validate_recipe(raw, DEMO)
    assert str(info.value) == f"{DEMO}: unknown key 'modle'; did you mean 'model'?"


def test_unknown_lora_key_lists_valid_keys(tmp_path):
    # 'rank' is not close enough to 'r' for difflib; the section is small so all keys are listed
    msg = config_error(demo_raw(), "sft", tmp_path, ["sft.lora.rank=4"])
    assert msg == f"{DEMO}: unknown key 'sft.lora.rank'; valid keys: alpha, dropout, enabled, merge, r, target_modules"
    assert "did you mean" not in msg


def test_unknown_key_in_big_section_points_to_fields(tmp_path):
    msg = config_error(demo_raw(), "sft", tmp_path, ["sft.training.zzzzqqq=1"])
    assert msg == f"{DEMO}: unknown key 'sft.training.zzzzqqq'; run `rlhf-dist fields STAGE` for the list"


def test_unknown_shared_and_stage_keys(tmp_path):
    assert config_error(demo_raw(), "sft", tmp_path, ["data.pathh=x"]) == (
        f"{DEMO}: unknown key 'data.pathh'; did you mean 'path'?")
    assert config_error(demo_raw(), "sft", tmp_path, ["stages=[sft, ppoo]"]) == (
        f"{DEMO}: unknown key 'stages.ppoo'; did you mean 'ppo'?")


def test_unknown_key_error_helper():
    err = unknown_key_error("lerning_rate", ["learning_rate", "seed"], "sft.training")
    assert isinstance(err, ConfigError) and isinstance(err, UserError)
    assert str(err) == "unknown key 'sft.training.lerning_rate'; did you mean 'learning_rate'?"
    assert str(unknown_key_error("zz", ["b", "a"], "")) == "unknown key 'zz'; valid keys: a, b"


# ----------------------------------------------------------------------------------------------
# 4. Wrong types
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, stage, expected", [
    ("sft.training.learning_rate=fast", "sft",
     "sft.training.learning_rate: expected a number, got 'fast' (str); fix the value in the recipe or override "
     "it with sft.training.learning_rate=VALUE"),
    ("pretrain.block_size=abc", "pretrain",
     "pretrain.block_size: expected an integer, got 'abc' (str); fix the value in the recipe or override it with "
     "pretrain.block_size=VALUE"),
    ("model.dtype=float8", "sft",
     "model.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got 'float8' (str); fix the value "
     "in the recipe or override it with model.dtype=VALUE"),
    ("sft.lora.enabled=maybe", "sft",
     "sft.lora.enabled: expected true/false, got 'maybe' (str); fix the value in the recipe or override it with "
     "sft.lora.enabled=VALUE"),
    ("sft.training.max_steps=2.5", "sft",
     "sft.training.max_steps: expected an integer, got 2.5 (float); fix the value in the recipe or override it "
     "with sft.training.max_steps=VALUE"),
    ("sft.data.columns={prompt: 1}", "sft",
     "sft.data.columns.prompt: expected a string, got 1 (int); fix the value in the recipe or override it with "
     "sft.data.columns.prompt=VALUE"),
])
def test_wrong_type_is_one_line_naming_the_key(override, stage, expected, tmp_path):
    msg = config_error(demo_raw(), stage, tmp_path, [override])
    assert msg == f"{DEMO}: {expected}"
    key = override.split("=")[0]
    assert key.split(".", 1)[-1] in msg and "expected" in msg


def test_hf_class_validation_error_is_one_line(tmp_path):
    msg = config_error(demo_raw(), "sft", tmp_path, ["sft.training.lr_scheduler_type=bogus"])
    assert msg.startswith(f"{DEMO}: sft.training: bogus is not a valid SchedulerType")


@pytest.mark.parametrize("override, expected", [
    ("sft=3", "sft: expected a mapping of keys, got 3"),
    ("sft.training=3", "sft.training: expected a mapping of keys, got 3"),
    ("model=3", "model: expected a mapping of keys, got 3"),
    ("stages=3", "stages: expected a list such as [sft, reward, dpo], got 3"),
])
def test_sections_must_be_mappings(override, expected, tmp_path):
    assert config_error(demo_raw(), "sft", tmp_path, [override]) == f"{DEMO}: {expected}"


def test_stages_may_be_a_comma_separated_string():
    raw = apply_overrides(demo_raw(), ["stages=sft, dpo"])
    assert validate_recipe(raw, DEMO) == ["sft", "dpo"]


# ----------------------------------------------------------------------------------------------
# 5. coerce
# ----------------------------------------------------------------------------------------------
def test_coerce_accepts():
    assert coerce(3.0, int, "k") == 3 and type(coerce(3.0, int, "k")) is int
    assert coerce("7", int, "k") == 7
    assert coerce("yes", bool, "k") is True
    assert coerce("No", bool, "k") is False
    assert coerce("1e-4", float, "k") == 1e-4
    assert type(coerce(2, float, "k")) is float
    assert coerce(None, typing.Optional[int], "k") is None
    assert coerce(None, int | None, "k") is None
    assert coerce("4", int | None, "k") == 4
    assert coerce(["a", "b"], list[str], "k") == ["a", "b"]
    assert coerce("all-linear", list[str] | str, "k") == "all-linear"
    assert coerce({"a": "b"}, dict[str, str], "k") == {"a": "b"}
    assert coerce("bf16", typing.Any, "k") == "bf16"


@pytest.mark.parametrize("value, tp, expected", [
    (3.5, int, "k: expected an integer, got 3.5 (float)"),
    (True, int, "k: expected an integer, got True (bool)"),
    (1, bool, "k: expected true/false, got 1 (int)"),
    ("maybe", bool, "k: expected true/false, got 'maybe' (str)"),
    (None, int, "k: expected an integer, got None (NoneType)"),
    ("x", float | None, "k: expected a number or null, got 'x' (str)"),
    (5, str, "k: expected a string, got 5 (int)"),
    ("nf8", typing.Literal["nf4", "fp4"], "k: expected one of 'nf4', 'fp4', got 'nf8' (str)"),
    ("a", list[str], "k: expected a list, got 'a' (str)"),
    (["a", 2], list[str], "k[1]: expected a string, got 2 (int)"),
    ({"a": 1}, dict[str, str], "k.a: expected a string, got 1 (int)"),
])
def test_coerce_rejects(value, tp, expected):
    with pytest.raises(ConfigError) as info:
        coerce(value, tp, "k")
    where = expected.split(":")[0]
    assert str(info.value) == f"{expected}; fix the value in the recipe or override it with {where}=VALUE"


# ----------------------------------------------------------------------------------------------
# 6. load_recipe
# ----------------------------------------------------------------------------------------------
def test_load_recipe_by_name_and_path(tmp_path):
    by_name, source = load_recipe("demo")
    assert source == DEMO
    assert by_name["stages"] == ["pretrain", "sft", "reward", "ppo", "dpo", "eval"]
    assert by_name["pretrain"]["block_size"] == 64

    by_path, source2 = load_recipe(DEMO)
    assert by_path == by_name and source2 == DEMO

    own = tmp_path / "mine.yaml"
    own.write_text("sft:\n  data: {path: x.jsonl}\n")
    raw, source3 = load_recipe(str(own))
    assert raw == {"sft": {"data": {"path": "x.jsonl"}}} and source3 == str(own)

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_recipe(str(empty)) == ({}, str(empty))


def test_load_recipe_unknown_name_lists_shipped():
    shipped = ", ".join(sorted(shipped_recipes()))
    with pytest.raises(ConfigError) as info:
        load_recipe("no-such-recipe")
    assert str(info.value) == (f"recipe 'no-such-recipe' is neither a file nor a shipped recipe; shipped: {shipped} "
                               "(or pass the path of your own YAML file)")
    with pytest.raises(ConfigError) as info:
        load_recipe("demoo")
    assert "did you mean 'demo'? " in str(info.value) and f"shipped: {shipped}" in str(info.value)


def test_load_recipe_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\nsft:\n  x: 1\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(bad))
    msg = str(info.value)
    assert "\n" not in msg
    # the position of the problem (1-based), and where the unclosed sequence starts
    assert msg == (f"{bad} line 2, column 4: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow "
                   "sequence that starts at line 1, column 8); fix the indentation or quoting there")


def test_load_recipe_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- sft\n- dpo\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(bad))
    assert str(info.value) == f"{bad}: a recipe must be a mapping of sections (model, data, sft, ...)"


# ----------------------------------------------------------------------------------------------
# 7. output_dir belongs to --output
# ----------------------------------------------------------------------------------------------
def test_output_dir_in_recipe_is_rejected(tmp_path):
    raw = demo_raw()
    raw["sft"]["training"]["output_dir"] = "/somewhere"
    msg = config_error(raw, "sft", tmp_path)
    assert msg == f"{DEMO}: sft.training.output_dir: set by --output; remove it from the recipe"
    assert "--output" in msg


# ----------------------------------------------------------------------------------------------
# 8. fingerprint / diff_keys
# ----------------------------------------------------------------------------------------------
def test_fingerprint_and_diff_keys(tmp_path):
    raw = demo_raw()
    a = to_dict(resolve(raw, "sft", tmp_path, work="w1"))
    b = to_dict(resolve(raw, "sft", tmp_path, work="w2"))  # only output_dir differs
    assert a["training"]["output_dir"] != b["training"]["output_dir"]
    fp = fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(copy.deepcopy(a)) == fp
    assert fingerprint(b) == fp and diff_keys(a, b) == []

    lr = copy.deepcopy(a)
    lr["training"]["learning_rate"] = 1e-5
    assert fingerprint(lr) != fp
    assert diff_keys(a, lr) == ["training.learning_rate"]

    logging = copy.deepcopy(a)
    logging["training"]["logging_steps"] = 1
    logging["training"]["output_dir"] = "/elsewhere"
    assert fingerprint(logging) == fp
    assert diff_keys(a, logging) == []

    both = copy.deepcopy(lr)
    both["data"]["seed"] = 123
    assert diff_keys(a, both) == ["data.seed", "training.learning_rate"]


def test_fingerprint_follows_overrides(tmp_path):
    raw = demo_raw()
    base = fingerprint(to_dict(resolve(raw, "sft", tmp_path)))
    same = fingerprint(to_dict(resolve(apply_overrides(raw, ["sft.training.logging_steps=1"]), "sft", tmp_path)))
    other = to_dict(resolve(apply_overrides(raw, ["sft.training.learning_rate=1e-5"]), "sft", tmp_path))
    assert same == base
    assert fingerprint(other) != base


# ----------------------------------------------------------------------------------------------
# 9. field_help
# ----------------------------------------------------------------------------------------------
def test_field_help_sft():
    rows = {key: (default, text) for key, default, text in field_help("sft")}
    assert rows["sft.data.path"] == (
        "None", "Hub dataset id, local dataset folder, or a .jsonl/.json/.parquet/.csv/.txt file (each also "
                ".gz/.bz2/.xz/.zst).")
    assert rows["sft.lora.r"] == ("16", "Adapter rank.")
    assert rows["sft.data.columns"][0] == "{}"
    default, text = rows["sft.training.learning_rate"]
    assert text and "learning rate" in text.lower()
    assert float(default) > 0
    assert all("\n" not in text for _, text in rows.values())
    assert "sft.training.output_dir" in rows  # listed although the recipe may not set it
    assert not any(key.startswith("sft.block_size") for key in rows)
    assert rows.keys() & {"sft.model.dtype", "sft.quantization.load_in_4bit", "sft.init_from"} == {
        "sft.model.dtype", "sft.quantization.load_in_4bit", "sft.init_from"}


def test_field_help_pretrain_has_block_size():
    rows = {key: (default, text) for key, default, text in field_help("pretrain")}
    assert rows["pretrain.block_size"] == ("512", "Tokens per training block (texts are concatenated).")


# ----------------------------------------------------------------------------------------------
# 10. The command line: one line on stderr, exit 2, nothing written
# ----------------------------------------------------------------------------------------------
def test_cli_unknown_key_exits_2_without_writing(tmp_path):
    run = tmp_path / "run"
    proc = cli("sft", "--recipe", "demo", "--output", str(run), "sft.training.learnig_rate=1", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error:")
    assert "did you mean 'learning_rate'" in lines[0]
    assert "sft.training.learnig_rate" in lines[0]
    assert not run.exists()


def test_redact_overrides_hides_secret_values_only():
    assert redact_overrides(["sft.training.hub_token=hf_x", "a.b.api_key=k", "sft.training.learning_rate=1e-5",
                               "x.password=p"]) == ["sft.training.hub_token=<redacted>", "a.b.api_key=<redacted>",
                                                    "sft.training.learning_rate=1e-5", "x.password=<redacted>"]


def test_data_num_proc_feeds_trl_tokenisation(tmp_path):
    raw = apply_overrides(demo_raw(), ["data.num_proc=3", "dpo.training.dataset_num_proc=1"])
    assert resolve(raw, "sft", tmp_path).training.dataset_num_proc == 3
    assert resolve(raw, "dpo", tmp_path).training.dataset_num_proc == 1  # explicit wins
    assert resolve(raw, "pretrain", tmp_path).data.num_proc == 3
