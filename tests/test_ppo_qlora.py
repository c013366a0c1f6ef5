"""PPO on ONE quantised base (QLoRA): policy adapter, reference = adapters disabled, value = its own adapter + a
value head, reward = a frozen 4-bit reward model. bitsandbytes NF4 runs on CPU (fp32 compute here).

What is asserted: the first step's invariants (ratio 1, KL 0), the loss finite, the value loss falling; only the
two adapters and the value head change and the base stays 4-bit (bytes equal); the reference pass is exactly the
base model; the memory held is reported against separate models; outputs (adapter, value adapter, value head,
merged weights) load back and reproduce the trained model; a checkpoint resumes bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import ppo_crashes_at_step, tiny_recipe
from safetensors.torch import load_file

from rlhf_dist.cli import main

QLORA = ["ppo.lora.enabled=true", "ppo.lora.r=4", "ppo.lora.dropout=0.0", "ppo.quantization.load_in_4bit=true",
         "ppo.quantization.compute_dtype=float32"]


def _run(tmp_path: Path, tiny_model, demo_data, reward, *overrides, out: Path | None = None, resume: bool = False) -> Path:
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    out = out or tmp_path / "run"
    args = ["ppo", "--recipe", str(rec), "--output", str(out), f"ppo.reward_model={reward}", *QLORA, *overrides]
    assert main([*args, *(["--resume"] if resume else [])]) == 0
    return out / "ppo"


def _build(tmp_path, tiny_model, demo_data, reward, *overrides):
    """The stage's models as `rlhf_dist.rl.models.build_ppo` makes them for the stage (no training): (actor_critic,
    reference, reward, config, tokenizer)."""
    import argparse

    from rlhf_dist.models import load_tokenizer
    from rlhf_dist.rl.distributed import make_accelerator
    from rlhf_dist.rl.models import build_ppo
    from rlhf_dist.stages.common import load_stage_config

    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    args = argparse.Namespace(recipe=str(rec), output=str(tmp_path / "built"), overrides=[f"ppo.reward_model={reward}",
                                                                                          *QLORA, *overrides])
    cfg, _ = load_stage_config("ppo", args)
    tokenizer = load_tokenizer(cfg.init_from, cfg.model)
    models = build_ppo(cfg, tokenizer, make_accelerator(cfg.training, 1, 64))
    return models.actor_critic, models.reference, models.reward, cfg, tokenizer


def _lora_and_base(model) -> tuple[dict, dict]:
    lora, base = {}, {}
    for name, p in model.named_parameters():
        (lora if "lora_" in name or name.startswith("value_head") else base)[name] = p.detach().clone()
    return lora, base


def test_one_4bit_base_shared_by_policy_reference_and_value(tmp_path, tiny_model, tiny_reward_model, demo_data):
    import bitsandbytes as bnb

    from rlhf_dist.rl.adapters import POLICY, VALUE, no_adapter, use_adapter
    from rlhf_dist.rl.scoring import forward_logprobs

    actor_critic, reference, reward, cfg, tokenizer = _build(tmp_path, tiny_model, demo_data, tiny_reward_model)
    assert reference is None and actor_critic.value_adapter == VALUE
    policy = actor_critic.policy
    linear4 = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # every linear of the 2 decoder layers is 4-bit, once: one base
    assert all(m.weight.dtype == torch.uint8 for m in linear4)
    assert set(policy.peft_config) == {POLICY, VALUE}
    trainable = {n for n, p in actor_critic.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    assert any(f".{VALUE}." in n for n in trainable) and any(f".{POLICY}." in n for n in trainable)
    rm_linear = [m for m in reward.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(rm_linear) == 2 * 7 and not any(p.requires_grad for p in reward.model.parameters())  # frozen 4-bit reward

    # give both adapters non-zero weights (B starts at 0), then: disabled adapters == the bare 4-bit base, exactly
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    q = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    qm = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    r = torch.tensor([[12, 13, 14], [15, 16, 0]])
    rm = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        with no_adapter(policy):
            ref = forward_logprobs(policy, q, qm, r, rm, 1.0)
        with use_adapter(policy, POLICY):
            pol = forward_logprobs(policy, q, qm, r, rm, 1.0)
        with use_adapter(policy, VALUE):
            val = forward_logprobs(policy, q, qm, r, rm, 1.0)
    assert not torch.equal(ref, pol) and not torch.equal(pol, val) and not torch.equal(ref, val)  # each adapter matters
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".lora_" in n)  # switching froze nothing
    # the reference is the base with no adapter applied: compare with a fresh 4-bit load of the SFT model
    from rlhf_dist.models import load_causal_lm

    fresh = load_causal_lm(cfg.init_from, cfg).eval()
    with torch.no_grad():
        assert torch.equal(ref, forward_logprobs(fresh, q, qm, r, rm, 1.0))
    # the policy pass and the value pass use different adapters, and the policy's log-probs ignore the value adapter
    logprobs, _, values = actor_critic(q, qm, r, rm)
    assert torch.equal(logprobs, pol) and values.shape == r.shape and torch.all(values[rm == 0] == 0)


def test_qlora_updates_lower_the_losses_and_change_only_the_adapters(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """Repeated PPO updates on one fixed rollout batch: the value loss falls, the clipped surrogate falls; the
    4-bit base weights keep their bytes (only LoRA weights of both adapters and the value head move)."""
    from rlhf_dist.lengths import token_ids
    from rlhf_dist.rl.advantages import gae, whiten
    from rlhf_dist.rl.kl import kl_estimate
    from rlhf_dist.rl.rewards import kl_shaped_rewards
    from rlhf_dist.rl.trainer import PPOLoop

    actor_critic, reference, reward, cfg, tokenizer = _build(tmp_path, tiny_model, demo_data, tiny_reward_model,
                                                  "ppo.training.learning_rate=3e-3", "ppo.training.lr_scheduler_type=constant",
                                                  "ppo.training.value_clip=null")
    a = cfg.training
    prompts = [token_ids(tokenizer, f"Question: what is village {i} known for?\nAnswer:", generation_prompt=True)
               for i in range(16)]
    trainer = PPOLoop(a, make_acc(a), actor_critic, reference, reward, tokenizer, prompts, prompts[:4], tmp_path)
    batch = trainer.rollout(trainer.step_prompts(1), (a.seed, 1))
    kl = kl_estimate(batch.logprobs, batch.ref_logprobs, a.kl_estimator, a.kl_clamp, batch.response_mask)
    rewards, _ = kl_shaped_rewards(batch.scores, kl, batch.response_mask, a.kl_coef, a.missing_eos_penalty, batch.ended)
    advantages, returns = gae(rewards, batch.values, batch.response_mask, a.gamma, a.lam)
    advantages = whiten(advantages, batch.response_mask)
    lora_before, base_before = _lora_and_base(trainer.unwrapped)
    stats = [trainer.update(1, batch, advantages, returns, a.kl_coef) for _ in range(8)]
    values, pg = [s["value/loss"] for s in stats], [s["policy/pg_loss"] for s in stats]
    assert all(torch.isfinite(torch.tensor(values + pg)))
    assert values[-1] < 0.6 * values[0], values  # the value adapter + head fit the returns (measured 0.52 -> 0.26)
    assert pg[-1] < pg[0], pg  # the policy adapter raises the surrogate objective
    lora_after, base_after = _lora_and_base(trainer.unwrapped)
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "the base must not move"
    moved = {k for k in lora_before if not torch.equal(lora_before[k], lora_after[k])}
    assert any(".default." in k for k in moved) and any(".value." in k for k in moved)
    assert any(k.startswith("value_head") for k in moved)
    packed = [v for k, v in base_after.items() if v.dtype == torch.uint8]
    assert len(packed) == 14  # the 4-bit weights are still packed bytes


def make_acc(a):
    from rlhf_dist.rl.distributed import make_accelerator

    return make_accelerator(a, 1, 64)


def test_qlora_ppo_stage_outputs_memory_and_resume(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """The stage end to end (activation checkpointing on, so layers recompute with the adapter their forward
    used): first-step invariants, the memory report, the saved adapters and merge; a crash at step 4 resumes from
    checkpoint-2 to the same weights, bit for bit."""

    overrides = ("ppo.training.learning_rate=3e-3", "ppo.training.activation_checkpointing=true")
    stage = _run(tmp_path, tiny_model, demo_data, tiny_reward_model, *overrides, out=tmp_path / "clean")
    h = json.loads((stage / "log_history.json").read_text())
    assert h[0]["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6) and h[0]["objective/kl"] == 0.0
    assert h[-1]["objective/kl"] != 0.0
    assert all(math.isfinite(row["value/loss"]) and math.isfinite(row["policy/pg_loss"]) for row in h)
    mem = json.loads((stage / "metrics.json").read_text())["models"]
    # one 4-bit base for policy, reference and value + a 4-bit reward model. On this tiny model the unquantised
    # embeddings and output head (fp32 after prepare_model_for_kbit_training) are most of the bytes: 46% saved
    # against separate 4-bit models, 57% against four 16-bit ones (a 7B model: ~3/4 and ~90%, see rlhf-dist plan).
    assert mem["held_bytes"] < 0.6 * mem["separate_bytes"] and mem["saved_vs_separate_16bit"] > 0.5
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    assert (stage / "value_adapter" / "adapter_model.safetensors").is_file()
    assert set(load_file(stage / "value_head.safetensors")) == {"summary.weight", "summary.bias"}
    policy_w = load_file(stage / "adapter" / "adapter_model.safetensors")
    value_w = load_file(stage / "value_adapter" / "adapter_model.safetensors")
    assert set(policy_w) == set(value_w) and not all(torch.equal(policy_w[k], value_w[k]) for k in policy_w)
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(stage / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted linears; embeddings, norms untouched

    with ppo_crashes_at_step(4):
        _run(tmp_path, tiny_model, demo_data, tiny_reward_model, *overrides, out=tmp_path / "crashed")
    resumed = _run(tmp_path, tiny_model, demo_data, tiny_reward_model, *overrides, out=tmp_path / "crashed", resume=True)
    for name in ("adapter/adapter_model.safetensors", "value_adapter/adapter_model.safetensors", "value_head.safetensors"):
        x, y = load_file(stage / name), load_file(resumed / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_unmerged_sft_adapter_is_the_frozen_reference(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """PPO from an SFT adapter that was not merged: the adapter is loaded frozen as the named reference, and the
    policy's adapter starts as its copy (so KL is 0 and the ratio 1 at the first step; the reference is base + SFT
    adapter, not the bare base). The merged output is base + the policy adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    out = tmp_path / "run"
    assert main(["sft", "--recipe", str(rec), "--output", str(out), "sft.lora.enabled=true", "sft.lora.r=4",
                 "sft.lora.merge=false", "sft.training.max_steps=10", "sft.training.learning_rate=1e-2"]) == 0
    adapter = out / "sft" / "adapter"
    assert not (out / "sft" / "model.safetensors").exists()
    stage = _run(tmp_path, tiny_model, demo_data, tiny_reward_model, f"ppo.init_from={adapter}", "ppo.training.max_steps=2",
                 "ppo.training.save_steps=0", "ppo.training.learning_rate=3e-3", out=out)
    h = json.loads((stage / "log_history.json").read_text())
    assert h[0]["objective/kl"] == 0.0 and h[0]["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert h[1]["objective/kl"] != 0.0
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["before"]["kl"] == 0.0
    # the reference really is base + SFT adapter: its greedy log-probs differ from the bare base's
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        bare = base(ids).logits
        sft = PeftModel.from_pretrained(base, adapter).eval()
        sft_logits = sft(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(stage).eval()(ids).logits
    assert not torch.allclose(bare, sft_logits, atol=1e-3)
    # merged = base + the policy adapter, which moved away from the SFT adapter in PPO
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), stage / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(policy(ids).logits, merged, atol=1e-4)
    assert not torch.allclose(merged, sft_logits, atol=1e-5)


def test_reward_adapter_on_the_shared_base(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """A reward stage trained with QLoRA on the policy's base is used as a frozen `reward` adapter + score head on
    PPO's one base (no second model): its scores equal the reward model loaded the usual way (4-bit classifier +
    PEFT adapter), it does not train, and the models hold less than with a separate 4-bit reward model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from rlhf_dist.models import _load_kwargs, one_4bit_layout
    from rlhf_dist.rl.adapters import REWARD, AdapterRewardModel
    from rlhf_dist.rl.scoring import sequence_scores

    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    out = tmp_path / "run"
    assert main(["reward", "--recipe", str(rec), "--output", str(out), "reward.lora.enabled=true", "reward.lora.r=4",
                 "reward.quantization.load_in_4bit=true", "reward.quantization.compute_dtype=float32",
                 "reward.training.max_steps=10"]) == 0
    reward_dir = out / "reward"
    actor_critic, _, reward, cfg, tokenizer = _build(tmp_path, tiny_model, demo_data, reward_dir)
    assert isinstance(reward.model, AdapterRewardModel) and REWARD in actor_critic.policy.peft_config
    assert not any(p.requires_grad for n, p in actor_critic.named_parameters() if f".{REWARD}." in n)

    q = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    qm = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    r = torch.tensor([[12, 13, 14], [15, 16, 0]])
    rm = torch.tensor([[1, 1, 1], [1, 1, 0]])
    usual = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, **_load_kwargs(cfg))
    usual.config.pad_token_id = tokenizer.pad_token_id
    one_4bit_layout(usual)  # the same 4-bit kernel as ours (on an AVX512-BF16 CPU bitsandbytes would switch to another)
    usual = PeftModel.from_pretrained(usual, reward_dir / "adapter").eval()
    with torch.no_grad():
        ours, theirs = sequence_scores(reward.model, q, qm, r, rm), sequence_scores(usual, q, qm, r, rm)
        pol_before = actor_critic(q, qm, r, rm)[0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    with torch.no_grad():  # scoring switched adapters back: the policy's pass is unchanged
        assert torch.equal(actor_critic(q, qm, r, rm)[0], pol_before)

    with_adapter = ppo_memory(actor_critic, reward)
    separate_ac, _, separate_reward, *_ = _build(tmp_path, tiny_model, demo_data, reward_dir, "ppo.reward_adapter=false")
    assert not isinstance(separate_reward.model, AdapterRewardModel)
    assert with_adapter["held_bytes"] < ppo_memory(separate_ac, separate_reward)["held_bytes"]

    # the stage end to end with it: trains (KL 0 then not), checkpoints and saves only the policy's adapter as adapter/
    stage = _run(tmp_path, tiny_model, demo_data, reward_dir, "ppo.training.max_steps=2", "ppo.training.save_steps=1",
                 out=out)
    h = json.loads((stage / "log_history.json").read_text())
    assert h[0]["objective/kl"] == 0.0 and h[1]["objective/kl"] != 0.0
    assert json.loads((stage / "metrics.json").read_text())["models"]["held_bytes"] == with_adapter["held_bytes"]
    saved = load_file(stage / "adapter" / "adapter_model.safetensors")
    assert saved and not any(REWARD in k or "score" in k for k in saved)


def ppo_memory(actor_critic, reward) -> dict:
    from rlhf_dist.rl.models import model_memory

    return model_memory(actor_critic, None, reward.model)


def test_qlora_pipeline_sft_reward_ppo_on_one_4bit_base(tmp_path, tiny_model, demo_data):
    """The single-GPU recipe's shape at tiny scale (shared `lora` and `quantization` sections, as in the shipped
    qwen2.5-7b-qlora): sft -> reward -> ppo through `rlhf-dist pipeline`. The reward stage's adapter, trained on the
    sft output, becomes PPO's reward adapter on the same 4-bit base; every stage improves its metric."""
    from helpers import cli

    extra = ("lora: {enabled: true, r: 4, dropout: 0.0}\n"
             "quantization: {load_in_4bit: true, compute_dtype: float32}\n"
             "stages: [sft, reward, ppo]\n")
    rec, out = tiny_recipe(tmp_path, tiny_model, demo_data, extra), tmp_path / "run"
    result = cli("pipeline", "--recipe", str(rec), "--output", str(out), "sft.training.max_steps=20",
                 "reward.training.max_steps=20", "ppo.training.learning_rate=3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["sft", "reward", "ppo"]
    assert summary["sft"]["after"]["eval_loss"] < summary["sft"]["before"]["eval_loss"]
    assert summary["reward"]["after"]["accuracy"] > summary["reward"]["before"]["accuracy"]
    assert "the reward model is its adapter" in result.stderr  # one base for all four models
    ppo = json.loads((out / "ppo" / "metrics.json").read_text())
    assert ppo["init_from"] == "${output}/sft" and ppo["before"]["kl"] == 0.0 and ppo["after"]["kl"] != 0.0
    assert ppo["models"]["saved_vs_separate"] > 0.5
