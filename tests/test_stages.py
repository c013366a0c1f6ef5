"""Each stage runs a few steps on the tiny model and its metric moves the right way; outputs are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import STEPS
from helpers import tiny_recipe as recipe
from safetensors.torch import load_file


def run_stage(stage: str, rec: Path, out: Path, *overrides: str) -> dict:
    from rlhf_dist.cli import main

    assert main([stage, "--recipe", str(rec), "--output", str(out), *overrides]) == 0
    return json.loads((out / stage / "metrics.json").read_text())


def assert_complete(out: Path, stage: str, weights: bool = True) -> None:
    folder = out / stage
    for name in ("config.yaml", "metrics.json", "README.md", "tokenizer.json"):
        assert (folder / name).is_file(), name
    if weights:
        assert (folder / "model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")), "no pickled files in a stage output"
    history = json.loads((folder / "log_history.json").read_text())
    assert any("loss" in entry for entry in history), "the training curve has points"
    assert (folder / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / f"{stage}.incomplete").exists()


def test_pretrain_perplexity_falls(tmp_path, tiny_model, demo_data):
    m = run_stage("pretrain", recipe(tmp_path, tiny_model, demo_data), tmp_path / "run")
    assert m["after"]["perplexity"] < 0.5 * m["before"]["perplexity"]
    assert m["train"]["global_step"] == STEPS["pretrain"]
    assert m["blocks"]["block_size"] == 32 and m["blocks"]["train"] > 0
    assert_complete(tmp_path / "run", "pretrain")


def test_sft_eval_loss_falls_and_weights_change(tmp_path, tiny_model, demo_data):
    out = tmp_path / "run"
    m = run_stage("sft", recipe(tmp_path, tiny_model, demo_data), out)
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"] - 0.5
    assert m["init_from"] == str(tiny_model)
    assert_complete(out, "sft")
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "sft" / "model.safetensors")
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sft_lora_saves_adapter_and_exact_merge(tmp_path, tiny_model, demo_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    m = run_stage("sft", recipe(tmp_path, tiny_model, demo_data), out,
                  "sft.lora.enabled=true", "sft.lora.r=8", "sft.lora.dropout=0.0", "sft.training.learning_rate=1e-2")
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"]
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert_complete(out, "sft")
    # The merged weights compute what base + adapter computes.
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    merged = AutoModelForCausalLM.from_pretrained(out / "sft").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "sft" / "adapter").eval()
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the adapter did something


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad!=eos", "pad==eos"])
def test_sft_labels_keep_eos_and_mask_prompt_and_padding(tmp_path, tiny_model, demo_data, pad_is_eos):
    """docs/ppo.md item 1: the model must learn to stop, so the EOS label is never masked, even when
    the tokenizer pads with EOS (Qwen2.5 base, Llama 3)."""
    from trl import SFTTrainer

    from rlhf_dist.config.resolve import resolve_stage
    from rlhf_dist.data import load_splits
    from rlhf_dist.models import load_causal_lm, load_tokenizer
    from rlhf_dist.recipe import load_recipe

    raw, source = load_recipe(str(recipe(tmp_path, tiny_model, demo_data)))
    cfg = resolve_stage(raw, source, "sft", str(tmp_path), str(tmp_path / "work"))  # the stage's real config
    tok = load_tokenizer(str(tiny_model), cfg.model)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    assert (tok.pad_token_id == tok.eos_token_id) == pad_is_eos
    train, _, _ = load_splits(cfg.data, "sft", "sft")
    cfg.training.per_device_train_batch_size = 8
    trainer = SFTTrainer(model=load_causal_lm(str(tiny_model), cfg), args=cfg.training,
                         train_dataset=train.select(range(8)), processing_class=tok)
    completions = set(train.select(range(8))["completion"])
    batch = next(iter(trainer.get_train_dataloader()))
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (mask.sum(1) < mask.shape[1]).any(), "the batch has padding to check"
    for row in range(len(labels)):
        n = int(mask[row].sum())
        real = labels[row][:n]
        assert labels[row][n - 1] == tok.eos_token_id, "last real token is EOS and carries a label"
        assert (labels[row][n:] == -100).all(), "padding is masked"
        assert real[0] == -100, "prompt tokens are masked"
        # What carries a label is exactly one of the completions, followed by EOS.
        labelled = real[real != -100].tolist()
        assert tok.decode(labelled[:-1]) in completions


def test_reward_accuracy_rises(tmp_path, tiny_model, demo_data):
    out = tmp_path / "run"
    m = run_stage("reward", recipe(tmp_path, tiny_model, demo_data), out)
    assert m["after"]["accuracy"] >= 0.9
    assert m["after"]["accuracy"] > m["before"]["accuracy"]
    assert m["after"]["margin"] > m["before"]["margin"]
    assert m["after"]["pairs"] == m["data"]["eval_rows"]
    assert_complete(out, "reward")
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_accuracy_and_margin_rise(tmp_path, tiny_model, demo_data, lora):
    out = tmp_path / "run"
    extra = ["dpo.lora.enabled=true", "dpo.lora.dropout=0.0", "dpo.training.learning_rate=1e-2"] if lora else []
    m = run_stage("dpo", recipe(tmp_path, tiny_model, demo_data), out, *extra)
    assert m["before"]["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert m["after"]["margin"] > 0.1
    assert m["after"]["accuracy"] > m["before"]["accuracy"]
    assert m["after"]["logp_chosen"] - m["after"]["logp_rejected"] > m["before"]["logp_chosen"] - m["before"]["logp_rejected"]
    assert_complete(out, "dpo")
    assert (out / "dpo" / "adapter").is_dir() == lora


def test_same_recipe_gives_bit_identical_reward_model(tmp_path, tiny_model, demo_data):
    """The new score head is seeded: two runs of one recipe give the same metrics and weights."""
    rec = recipe(tmp_path, tiny_model, demo_data)
    a = run_stage("reward", rec, tmp_path / "a", "reward.training.max_steps=3")
    b = run_stage("reward", rec, tmp_path / "b", "reward.training.max_steps=3")
    assert a["before"] == b["before"] and a["after"] == b["after"]
    wa = load_file(tmp_path / "a" / "reward" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "reward" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _convert(src: Path, dst: Path, fn) -> Path:
    rows = [fn(json.loads(line)) for line in src.read_text().splitlines()]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_sft_on_chat_messages(tmp_path, tiny_model, demo_data):
    """`messages` data goes through the tokenizer's chat template; the answer turn carries the loss."""
    chats = _convert(demo_data["sft"], tmp_path / "chats.jsonl", lambda r: {"messages": [
        {"role": "system", "content": "Answer about the villages."},
        {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": r["completion"].strip()}]})
    m = run_stage("sft", recipe(tmp_path, tiny_model, demo_data), tmp_path / "run", f"sft.data.path={chats}")
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"] - 0.5


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_preference_stages_on_anthropic_hh_strings(tmp_path, tiny_model, demo_data, stage):
    """HH format: no prompt column; both texts repeat the dialogue up to the last 'Assistant:'."""
    def hh(r):
        q = r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
        head = f"\n\nHuman: {q}\n\nAssistant:"
        return {"chosen": head + r["chosen"], "rejected": head + r["rejected"]}

    pairs = _convert(demo_data["preference"], tmp_path / "hh.jsonl", hh)
    m = run_stage(stage, recipe(tmp_path, tiny_model, demo_data), tmp_path / "run", f"{stage}.data.path={pairs}")
    assert m["after"]["accuracy"] > m["before"]["accuracy"]
    assert m["after"]["margin"] > m["before"]["margin"]


def test_secrets_never_reach_the_saved_config(tmp_path, tiny_model, demo_data):
    m = run_stage("reward", recipe(tmp_path, tiny_model, demo_data), tmp_path / "run", "reward.training.max_steps=1",
                  "reward.training.hub_token=hf_SECRETSECRET")
    assert m["train"]["global_step"] == 1
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"hf_SECRETSECRET" not in path.read_bytes(), path


def test_qlora_sft_on_a_4bit_base(tmp_path, tiny_model, demo_data):
    """bitsandbytes NF4 runs on CPU: a 4-bit base with a LoRA adapter trains, and the adapter is merged
    into an unquantised reload of the base (what the next stage loads)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    m = run_stage("sft", recipe(tmp_path, tiny_model, demo_data), out, "sft.quantization.load_in_4bit=true",
                  "sft.quantization.compute_dtype=float32", "sft.lora.enabled=true", "sft.lora.dropout=0.0",
                  "sft.training.learning_rate=1e-2")
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"] - 0.3
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "sft")
    assert getattr(merged.config, "quantization_config", None) is None, "merged weights are plain, not 4-bit"
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_quantization_without_lora_is_refused(tmp_path, tiny_model, demo_data, capsys):
    from rlhf_dist.cli import main

    rec = recipe(tmp_path, tiny_model, demo_data)
    assert main(["sft", "--recipe", str(rec), "--output", str(tmp_path / "run"), "sft.quantization.load_in_4bit=true"]) == 2
    err = capsys.readouterr().err
    assert "sft: quantization needs lora.enabled: true" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_dpo_on_conversational_pairs(tmp_path, tiny_model, demo_data):
    """Message-list pairs with an implicit prompt go through the chat template."""
    def chat(r):
        user = {"role": "user", "content": r["prompt"]}
        return {"chosen": [user, {"role": "assistant", "content": r["chosen"].strip()}],
                "rejected": [user, {"role": "assistant", "content": r["rejected"].strip()}]}

    pairs = _convert(demo_data["preference"], tmp_path / "chat_pairs.jsonl", chat)
    m = run_stage("dpo", recipe(tmp_path, tiny_model, demo_data), tmp_path / "run", f"dpo.data.path={pairs}")
    assert m["after"]["margin"] > m["before"]["margin"] + 0.1
