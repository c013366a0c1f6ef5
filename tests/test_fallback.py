"""`--fallback auto`: a run too big for one (simulated, --gpu-memory) GPU becomes QLoRA, then smaller micro-batches.

Device sizes are placed between the planner's own estimates for the tiny model (fp32 on CPU), so every test
decides on the same numbers the stage uses.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from helpers import tiny_recipe as recipe

from rlhf_dist import fallback, plan
from rlhf_dist.config.resolve import resolve_stage
from rlhf_dist.recipe import load_recipe

GIB = 2**30


def sft_config(rec, tmp_path, *overrides):
    from rlhf_dist.recipe import apply_overrides

    raw, source = load_recipe(str(rec))
    cfg = resolve_stage(apply_overrides(raw, list(overrides)), source, "sft", str(tmp_path / "run"), str(tmp_path / "w"))
    cfg.init_from = cfg.model.name_or_path  # as load_stage_config resolves it without upstream stages
    return cfg


def device_between(low: float, high: float) -> float:
    """A device (GiB) whose usable memory (less the 10% headroom) lies halfway between two estimates."""
    return (low + high) / 2 / (1 - plan.HEADROOM)


def test_small_device_switches_full_sft_to_qlora_and_trains_4bit(tmp_path, tiny_model, demo_data, caplog):
    from rlhf_dist.cli import main

    rec = recipe(tmp_path, tiny_model, demo_data)
    cfg = sft_config(rec, tmp_path)
    full = fallback.estimate_gib("sft", cfg, "full", 16)
    qlora = fallback.estimate_gib("sft", cfg, "qlora", 16)
    assert qlora < full
    gpu = device_between(qlora, full)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="rlhf_dist"):
        code = main(["sft", "--recipe", str(rec), "--output", str(out), "--gpu-memory", f"{gpu:.6f}",
                     "sft.training.max_steps=3"])
    assert code == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fallback:")]
    assert len(lines) == 2 and "sft full with micro-batch 16 needs" in lines[0] and "switching to QLoRA" in lines[1]
    saved = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert saved["lora"]["enabled"] is True and saved["quantization"]["load_in_4bit"] is True
    assert saved["quantization"]["compute_dtype"] == "float32"  # no GPU here; bfloat16 on one
    assert saved["training"]["per_device_train_batch_size"] == 16  # QLoRA alone fits: micro-batch kept
    assert saved["fallback"]["changes"]["sft.lora.enabled"] is True
    assert saved["fallback"]["asked_gib"] == pytest.approx(full, abs=1e-3)
    assert saved["fallback"]["chosen_gib"] <= gpu * (1 - plan.HEADROOM)
    metrics = json.loads((out / "sft" / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 3 and metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_base_really_is_4bit(tmp_path, tiny_model, demo_data):
    """The config the fallback produces loads a 4-bit base (what the stage then trains)."""
    import bitsandbytes as bnb

    from rlhf_dist.models import load_causal_lm

    cfg = sft_config(recipe(tmp_path, tiny_model, demo_data), tmp_path)
    args = type("Args", (), {"fallback": "auto", "gpu_memory": device_between(
        fallback.estimate_gib("sft", cfg, "qlora", 16), fallback.estimate_gib("sft", cfg, "full", 16))})()
    assert fallback.apply("sft", cfg, args) is not None
    model = load_causal_lm(cfg.init_from, cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_device_where_full_fits_changes_nothing(tmp_path, tiny_model, demo_data):
    cfg = sft_config(recipe(tmp_path, tiny_model, demo_data), tmp_path)
    before = json.dumps(dataclasses.asdict(cfg.lora)) + json.dumps(dataclasses.asdict(cfg.quantization))
    args = type("Args", (), {"fallback": "auto", "gpu_memory": 80.0})()
    assert fallback.apply("sft", cfg, args) is None
    assert json.dumps(dataclasses.asdict(cfg.lora)) + json.dumps(dataclasses.asdict(cfg.quantization)) == before
    assert cfg.training.per_device_train_batch_size == 16
    # --fallback off, or several processes: nothing happens even on a tiny device
    for off in ({"fallback": "off", "gpu_memory": 1e-6}, {"fallback": "auto", "gpu_memory": 1e-6, "num_processes": 2}):
        assert fallback.apply("sft", cfg, type("Args", (), off)()) is None
        assert not cfg.lora.enabled


def test_halving_keeps_global_batch(tmp_path, tiny_model, demo_data):
    cfg = sft_config(recipe(tmp_path, tiny_model, demo_data), tmp_path, "sft.training.gradient_accumulation_steps=2")
    at4 = fallback.estimate_gib("sft", cfg, "qlora", 4)
    at8 = fallback.estimate_gib("sft", cfg, "qlora", 8)
    args = type("Args", (), {"fallback": "auto", "gpu_memory": device_between(at4, at8)})()
    decision = fallback.apply("sft", cfg, args)
    t = cfg.training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (4, 8)  # 16 x 2 = 4 x 8
    assert decision["changes"]["sft.training.per_device_train_batch_size"] == 4
    assert cfg.lora.enabled and cfg.quantization.load_in_4bit
    assert decision["chosen_gib"] == pytest.approx(at4, abs=1e-3)
    # deterministic: the same config and device give the same decision (config.yaml and --resume agree)
    again = sft_config(recipe(tmp_path, tiny_model, demo_data), tmp_path, "sft.training.gradient_accumulation_steps=2")
    assert fallback.apply("sft", again, args) == decision


def test_halving_odd_micro_batch_keeps_global_batch():
    assert [fallback._halve(n) for n in (16, 6, 3, 2)] == [8, 3, 1, 1]


def test_nothing_fits_exit_2_one_line_nothing_written(tmp_path, tiny_model, demo_data, capsys):
    from rlhf_dist.cli import main

    out = tmp_path / "run"
    code = main(["sft", "--recipe", str(recipe(tmp_path, tiny_model, demo_data)), "--output", str(out),
                 "--gpu-memory", "0.001"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --fallback auto: sft full with micro-batch 16 needs") and "\n" not in err
    assert "even QLoRA with micro-batch 1" in err and "0.00 GiB" in err and "--fallback off" in err
    assert not out.exists()


def test_ppo_halves_its_per_device_batches(tmp_path, tiny_model, demo_data, tiny_reward_model):
    from rlhf_dist.recipe import apply_overrides

    raw, source = load_recipe(str(recipe(tmp_path, tiny_model, demo_data)))
    raw = apply_overrides(raw, [f"ppo.reward_model={tiny_reward_model}"])
    cfg = resolve_stage(raw, source, "ppo", str(tmp_path / "run"), str(tmp_path / "w"))
    cfg.init_from = str(tiny_model)
    at2 = fallback.estimate_gib("ppo", cfg, "qlora", 2, 2)
    at4 = fallback.estimate_gib("ppo", cfg, "qlora", 4, 4)
    decision = fallback.apply("ppo", cfg, type("Args", (), {"fallback": "auto", "gpu_memory": device_between(at2, at4)})())
    assert decision is not None
    assert (cfg.training.per_device_train_batch_size, cfg.training.generation_batch_size) == (2, 2)
    assert cfg.training.mini_batch_size == 8  # the global batch: accumulation follows from it


@pytest.fixture(scope="module")
def qwen7b_config(tmp_path_factory):
    """Qwen2.5-7B's config, built offline from its published hyperparameters (7.62B parameters)."""
    from transformers import Qwen2Config

    out = tmp_path_factory.mktemp("qwen7b")
    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                tie_word_embeddings=False).save_pretrained(out)
    return out


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_shipped_7b_qlora_recipe_fits_one_24gb_gpu(stage, qwen7b_config, tmp_path):
    """The README's single-GPU recipe: by the planner, each stage fits a 24 GB GPU as shipped (bf16, as on a GPU), so
    --fallback auto leaves it alone; full fine-tuning of the same stage would not fit."""
    raw, source = load_recipe("qwen2.5-7b-qlora")
    cfg = resolve_stage(raw, source, stage, str(tmp_path / "run"), str(tmp_path / "w"))
    cfg.init_from = str(qwen7b_config)
    if stage == "ppo":
        cfg.reward_model = str(qwen7b_config)
    cfg.training.bf16 = True  # training_defaults turns it on on a bf16 GPU; this machine has none
    t = cfg.training
    gen = t.generation_batch_size if stage == "ppo" else None
    qlora = fallback.estimate_gib(stage, cfg, "qlora", t.per_device_train_batch_size, gen)
    assert qlora < 24 * (1 - plan.HEADROOM), qlora
    assert fallback.estimate_gib(stage, cfg, "full", t.per_device_train_batch_size, gen) > 24
    args = type("Args", (), {"fallback": "auto", "gpu_memory": 24.0})()
    assert fallback.apply(stage, cfg, args) is None  # fits: nothing changed
