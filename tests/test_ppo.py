"""The PPO stage end to end on the tiny model: first-step invariants, every model option, logs, resume, bad input.

Runs the real stage (`rlhf_dist.cli.main(["ppo", ...])`) in this process with a few steps.
Multi-process equality (DDP, ZeRO-2, ZeRO-3) is in test_ppo_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ppo_crashes_at_step, tiny_recipe
from safetensors.torch import load_file

from rlhf_dist.cli import main

# (policy/approx_kl: the k2 value under its old name, logged for one more release beside approx_kl_k2 / _k3)
CHECKLIST_23 = ["objective/scores", "objective/kl", "policy/entropy", "policy/approx_kl_k2", "policy/approx_kl_k3",
                "policy/approx_kl", "policy/clipfrac",
                "policy/ratio_mean", "policy/ratio_max", "value/loss", "value/explained_variance",
                "rollout/response_length", "rollout/eos_rate", "rollout/tokens_per_second"]


def run_ppo(tmp_path: Path, tiny_model, demo_data, *overrides: str, reward: Path | None = None, out: Path | None = None,
            extra: str = "") -> Path:
    rec = tiny_recipe(tmp_path, tiny_model, demo_data, extra)
    out = out or tmp_path / "run"
    args = [*([f"ppo.reward_model={reward}"] if reward else []), *overrides]
    assert main(["ppo", "--recipe", str(rec), "--output", str(out), *args]) == 0
    return out / "ppo"


def history(stage_dir: Path) -> list[dict]:
    return json.loads((stage_dir / "log_history.json").read_text())


# ---------------------------------------------------------------------------------------------
# At the first minibatch the ratio is 1, and with policy == reference the KL is 0 (items 13, 14, 16, 19)
# ---------------------------------------------------------------------------------------------
OPTIONS = {
    "value model from the reward model, missing-EOS penalty": ["ppo.training.missing_eos_penalty=2.0"],
    "value head on the policy, adaptive KL": ["ppo.value_head=true", "ppo.training.adaptive_kl=true"],
    "lora (reference = adapter disabled), activation checkpointing": ["ppo.lora.enabled=true", "ppo.lora.r=4",
                                                                       "ppo.training.activation_checkpointing=true"],
    "rloo": ["ppo.training.advantage_estimator=rloo", "ppo.training.samples_per_prompt=2",
             "ppo.training.rollout_batch_size=4"],
    "grpo, k3 KL, normalised scores": ["ppo.training.advantage_estimator=grpo", "ppo.training.samples_per_prompt=4",
                                       "ppo.training.rollout_batch_size=2", "ppo.training.kl_estimator=k3",
                                       "ppo.training.reward_normalization=true", "ppo.training.reward_clip=3"],
    "dr_grpo, constant normaliser, clip-higher": ["ppo.training.advantage_estimator=dr_grpo",
                                                  "ppo.training.samples_per_prompt=4", "ppo.training.rollout_batch_size=2",
                                                  "ppo.training.loss_aggregation=constant", "ppo.training.clip_eps_high=0.28"],
    "reinforce_pp_baseline": ["ppo.training.advantage_estimator=reinforce_pp_baseline",
                              "ppo.training.samples_per_prompt=2", "ppo.training.rollout_batch_size=4"],
    "reinforce_pp, gspo, overlong shaping": ["ppo.training.advantage_estimator=reinforce_pp", "ppo.training.policy_loss=gspo",
                                             "ppo.training.clip_eps_low=3e-4", "ppo.training.clip_eps_high=4e-4",
                                             "ppo.training.overlong_buffer=4"],
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_first_step_ratio_is_one_and_kl_is_zero(option, tmp_path, tiny_model, tiny_reward_model, demo_data):
    stage = run_ppo(tmp_path, tiny_model, demo_data, "ppo.training.max_steps=2", "ppo.training.save_steps=0",
                    *OPTIONS[option], reward=tiny_reward_model)
    h = history(stage)
    assert [row["step"] for row in h] == [1, 2]
    first = h[0]
    assert first["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)  # rollout forward == training forward
    assert first["objective/kl"] == 0.0  # the policy IS the reference before its first update
    assert first["objective/non_score_reward"] == 0.0
    assert h[1]["objective/kl"] != 0.0  # ...and no longer after it
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["before"]["kl"] == 0.0 and metrics["after"]["kl"] != 0.0
    assert metrics["train"]["optimizer_steps"] == 2 * 2 * (8 // 8)  # steps x ppo_epochs x minibatches
    if "missing-EOS" in option:  # score - penalty on responses that never stopped, at KL 0
        expected = first["objective/scores"] - 2.0 * (1.0 - first["rollout/eos_rate"])
        assert first["objective/rlhf_reward"] == pytest.approx(expected, abs=1e-5)
        assert first["rollout/eos_rate"] < 1.0  # (a random tiny model rarely stops: the penalty is exercised)
    elif "normalised" in option:  # (s - running mean) / running std, over this first batch only: mean 0
        assert first["objective/rlhf_reward"] == pytest.approx(0.0, abs=1e-5)
    elif "overlong shaping" in option:  # DAPO: the score less a penalty ramping over the last 4 of the 12 tokens
        assert first["objective/overlong_penalty"] < 0
        assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"] + first["objective/overlong_penalty"],
                                                               abs=1e-5)
    else:
        assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"], abs=1e-6)
    if "adaptive KL" in option:  # Ziegler's controller moves beta towards the target KL (6 nats; here KL is 0: down)
        assert h[1]["objective/kl_coef"] < h[0]["objective/kl_coef"] == 0.05
    else:
        assert h[1]["objective/kl_coef"] == h[0]["objective/kl_coef"] == 0.05
    if option.startswith(("grpo", "dr_grpo")):  # the KL is a loss term, not part of the reward
        assert h[1]["objective/non_score_reward"] == 0.0 and h[1]["objective/kl"] != 0.0
    if "gspo" in option:  # the sequence-level ratio, its own clip share
        assert "policy/seq_clipfrac" in first and "policy/approx_kl" not in first
    critic_free = option.startswith(("rloo", "grpo", "dr_grpo", "reinforce_pp"))
    assert ("value/loss" in first) == ("value/explained_variance" in first) == (not critic_free)
    if option.startswith("value model"):
        assert (stage / "value_model" / "model.safetensors").is_file()
    if option.startswith("value head"):
        assert set(load_file(stage / "value_head.safetensors")) == {"summary.weight", "summary.bias"}


# ---------------------------------------------------------------------------------------------
# Rollout log-probabilities recorded while sampling (no second policy pass); fixed-length rollouts
# ---------------------------------------------------------------------------------------------
RECORDED = {
    "value model": [],
    "lora: value adapter on the shared base": ["ppo.lora.enabled=true", "ppo.lora.r=4"],
    "value head on the policy: its values from the sampling pass too": ["ppo.value_head=true"],
    "grpo": ["ppo.training.advantage_estimator=grpo", "ppo.training.samples_per_prompt=4",
             "ppo.training.rollout_batch_size=2"],
}


@pytest.mark.parametrize("option", list(RECORDED))
def test_logprobs_recorded_while_sampling_match_the_forward(option, tmp_path, tiny_model, tiny_reward_model, demo_data):
    """rollout_logprobs=generate samples the same tokens and gives the same step as the second forward, up to float
    rounding: ratio and KL ~1e-6 from 1 and 0 at the first step instead of exact."""
    common = ["ppo.training.max_steps=2", "ppo.training.save_steps=0", "ppo.training.ignore_eos=true", *RECORDED[option]]
    forward = history(run_ppo(tmp_path, tiny_model, demo_data, *common, reward=tiny_reward_model, out=tmp_path / "fwd"))
    recorded = history(run_ppo(tmp_path, tiny_model, demo_data, *common, "ppo.training.rollout_logprobs=generate",
                               reward=tiny_reward_model, out=tmp_path / "gen"))
    for row in forward + recorded:  # ignore_eos: every response runs to max_new_tokens (12 in the tiny recipe)
        assert row["rollout/response_length"] == 12 and row["rollout/eos_rate"] == 0.0
    first = recorded[0]
    assert first["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-5)
    assert abs(first["objective/kl"]) < 1e-5 and forward[0]["objective/kl"] == 0.0
    assert first["objective/scores"] == forward[0]["objective/scores"]  # the same sampled tokens, scored alike
    for a, b in zip(forward, recorded):  # the same training, to rounding
        for key in ("objective/scores", "policy/entropy", "policy/pg_loss", "value/loss", "objective/kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), key


@pytest.mark.parametrize("option", ["value model", "lora: value adapter on the shared base"])
def test_split_backward_gives_the_same_training(option, tmp_path, tiny_model, tiny_reward_model, demo_data,
                                                monkeypatch):
    """The policy's and the value function's passes backwarded one after the other (the one-process default) train
    bit for bit as one joint backward: they share no trainable weight."""
    common = ["ppo.training.max_steps=2", "ppo.training.save_steps=0", *RECORDED[option]]
    joint = run_ppo(tmp_path, tiny_model, demo_data, *common, "ppo.training.split_backward=false",
                    reward=tiny_reward_model, out=tmp_path / "joint")
    from rlhf_dist.rl import trainer as loop

    values = []  # the value function's own pass, with grad: only the split update calls it
    original = loop.PPOLoop.value_loss
    monkeypatch.setattr(loop.PPOLoop, "value_loss", lambda self, *a: values.append(1) or original(self, *a))
    split = run_ppo(tmp_path, tiny_model, demo_data, *common, reward=tiny_reward_model, out=tmp_path / "split")
    assert len(values) == 8  # 2 steps x 2 epochs x 2 micro-batches: split by default
    assert _without_timings(history(joint)) == _without_timings(history(split))
    files = sorted(p.relative_to(joint) for p in joint.rglob("*.safetensors"))
    assert len(files) >= 2  # policy (or its adapter) and the value function
    for name in files:
        a, b = load_file(joint / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_micro_batches_sorted_by_length_give_the_same_gradients(tmp_path, tiny_model, tiny_reward_model, demo_data,
                                                                 monkeypatch):
    """sort_micro_batches (the default) runs a minibatch's rows in micro-batches of similar length, each cut to its
    longest row: fewer padded tokens, and the gradient of every optimizer step equal to the unsorted one within fp32
    rounding (every micro-batch loss is normalised by the whole minibatch). Responses stop at EOS: ragged lengths."""
    from rlhf_dist.rl import trainer as loop

    update, backward = loop.PPOLoop.optimizer_update, loop.PPOLoop.backward

    def run(sort: bool) -> tuple[list[dict], int]:
        grads, slots = [], []

        def record_grads(self, stats):
            grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})
            return update(self, stats)

        def count_slots(self, micro, *args):
            slots.append(micro.query_ids.numel() + micro.response_ids.numel())
            return backward(self, micro, *args)

        monkeypatch.setattr(loop.PPOLoop, "optimizer_update", record_grads)
        monkeypatch.setattr(loop.PPOLoop, "backward", count_slots)
        run_ppo(tmp_path, tiny_model, demo_data, "ppo.training.max_steps=1", "ppo.training.save_steps=0",
                "ppo.training.rollout_batch_size=16", "ppo.training.mini_batch_size=16",
                "ppo.training.per_device_train_batch_size=4", "ppo.training.max_new_tokens=24",
                f"ppo.training.sort_micro_batches={str(sort).lower()}", reward=tiny_reward_model,
                out=tmp_path / f"sort-{sort}")
        return grads, sum(slots)

    (unsorted, unsorted_slots), (sorted_, sorted_slots) = run(False), run(True)
    assert len(unsorted) == len(sorted_) == 2  # 2 epochs x 1 minibatch
    assert sorted_slots < unsorted_slots, (sorted_slots, unsorted_slots)
    for a, b in zip(unsorted, sorted_):
        assert a.keys() == b.keys() and len(a) > 10
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
        assert max(float(g.abs().max()) for g in a.values()) > 1e-3  # gradients worth comparing


def _without_timings(rows: list[dict]) -> list[dict]:
    timing = ("time/", "rollout/tokens_per_second", "train/samples_per_second")
    return [{k: v for k, v in row.items() if not k.startswith(timing)} for row in rows]


def test_fused_adam_where_torch_has_it():
    from rlhf_dist.rl.optim import fused_adam_ok

    weights = [{"params": [torch.nn.Parameter(torch.zeros(3))]}, {"params": [torch.nn.Parameter(torch.zeros(2, 2))]}]
    assert fused_adam_ok(weights, deepspeed=False) is True
    assert fused_adam_ok(weights, deepspeed=True) is None  # DeepSpeed steps its own partitions
    assert fused_adam_ok([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}], deepspeed=False) is None
    assert fused_adam_ok([{"params": []}], deepspeed=False) is None


def test_lora_policy_trains_only_the_adapter_and_saves_it_merged(tmp_path, tiny_model, tiny_reward_model, demo_data):
    stage = run_ppo(tmp_path, tiny_model, demo_data, "ppo.training.max_steps=2", "ppo.training.save_steps=0",
                    "ppo.lora.enabled=true", "ppo.lora.r=4", "ppo.training.learning_rate=1e-2", reward=tiny_reward_model)
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(stage / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA targets the linear layers only
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------
# Logs: JSONL with docs/ppo.md item 23's metrics, TensorBoard, samples, curves
# ---------------------------------------------------------------------------------------------
def test_logs_jsonl_tensorboard_and_samples(tmp_path, tiny_model, tiny_reward_model, demo_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage = run_ppo(tmp_path, tiny_model, demo_data, "ppo.training.num_sample_completions=2",
                    "ppo.training.save_steps=0", reward=tiny_reward_model)
    h = history(stage)
    assert len(h) == 4
    for row in h:
        missing = [k for k in CHECKLIST_23 if k not in row]
        assert not missing, missing
        assert 0.0 <= row["rollout/eos_rate"] <= 1.0 and 1 <= row["rollout/response_length"] <= 12
        assert row["policy/ratio_max"] >= row["policy/ratio_mean"] > 0
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert all(s["prompt"].startswith("Question:") and isinstance(s["score"], float) for s in samples)
    events = EventAccumulator(str(stage / "tensorboard")).Reload()
    scores = events.Scalars("objective/scores")
    assert [e.step for e in scores] == [1, 2, 3, 4]
    assert [e.value for e in scores] == pytest.approx([row["objective/scores"] for row in h], rel=1e-6)
    assert (stage / "training.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# A reward model with another tokenizer: responses are decoded and re-encoded
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_tokenizer_reward_model(tmp_path_factory) -> Path:
    from transformers import AutoModelForSequenceClassification

    from rlhf_dist.demo import synthetic, tiny

    out = tmp_path_factory.mktemp("rm_other_tok")
    tok = tiny.build_tokenizer(synthetic.corpus(1)[:3000], vocab_size=600)
    torch.manual_seed(1)
    lm = tiny.build_model(tok, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    lm.save_pretrained(out / "lm")
    model = AutoModelForSequenceClassification.from_pretrained(out / "lm", num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")
    return out / "rm"


def test_reward_model_with_another_tokenizer(tmp_path, tiny_model, demo_data, other_tokenizer_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    stage = run_ppo(tmp_path, tiny_model, demo_data, "ppo.training.max_steps=1", "ppo.training.save_steps=0",
                    "ppo.training.num_sample_completions=4", reward=other_tokenizer_reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(other_tokenizer_reward_model).eval()
    tok = AutoTokenizer.from_pretrained(other_tokenizer_reward_model)
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for sample in samples:
        # what the reward stage trained on: prompt + response text, EOS appended when the response stopped
        text = sample["prompt"] + sample["completion"] + (tok.eos_token if sample["ended"] else "")
        with torch.no_grad():
            expected = rm(**tok(text, return_tensors="pt")).logits[0, 0].item()
        assert sample["score"] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Resume: a crash mid-run, then the same command, gives the uninterrupted run's result
# ---------------------------------------------------------------------------------------------
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, tiny_model, tiny_reward_model, demo_data):
    clean = run_ppo(tmp_path, tiny_model, demo_data, reward=tiny_reward_model, out=tmp_path / "clean")
    crashed_out = tmp_path / "crashed"
    with ppo_crashes_at_step(4):
        run_ppo(tmp_path, tiny_model, demo_data, reward=tiny_reward_model, out=crashed_out)
    work = crashed_out / "ppo.incomplete"
    assert not (crashed_out / "ppo").exists()
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]
    # A crash while writing the next checkpoint leaves only a .tmp folder, which resume ignores.
    (work / "checkpoint-3.tmp").mkdir()
    (work / "checkpoint-3.tmp" / "model.safetensors").write_bytes(b"half a file")
    resumed = run_ppo(tmp_path, tiny_model, demo_data, reward=tiny_reward_model, out=crashed_out)

    for name in ("model.safetensors", "value_model/model.safetensors"):
        a, b = load_file(clean / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    timing = ("time/", "rollout/tokens_per_second", "train/samples_per_second")
    strip = [{k: v for k, v in row.items() if not k.startswith(timing)} for row in history(clean)]
    assert strip == [{k: v for k, v in row.items() if not k.startswith(timing)} for row in history(resumed)]
    after = [json.loads((d / "metrics.json").read_text())["after"] for d in (clean, resumed)]
    assert after[0] == after[1]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before any model is loaded, nothing written
# ---------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def three_label_model(tiny_model, tmp_path_factory) -> Path:
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("three_labels")
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3).save_pretrained(out)
    return out


def ppo_bad_cases(tmp_path: Path, tiny_reward_model: Path, three_label_model: Path, tiny_model: Path,
                  other_rm: Path) -> dict:
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": "Question: " + "word " * n + "?\nAnswer:"}) + "\n"
                                    for n in (3, 4, 300, 5, 6, 7)))
    adapter = tmp_path / "sft_adapter"  # what sft with lora.merge: false leaves (tokenizer files + adapter)
    adapter.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (adapter / f.name).write_bytes(f.read_bytes())
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny_model)}))
    return {
        "value adapter without LoRA": ([f"ppo.reward_model={tiny_reward_model}", "ppo.value_adapter=true"],
                                       "ppo.value_adapter: the value adapter sits on the policy's LoRA base"),
        "an SFT adapter to start from, without LoRA": ([f"ppo.reward_model={tiny_reward_model}", f"ppo.init_from={adapter}"],
                                                       f"ppo: {adapter} is a LoRA adapter; set ppo.lora.enabled: true"),
        "reward adapter without LoRA": ([f"ppo.reward_model={tiny_reward_model}", "ppo.reward_adapter=true"],
                                        "ppo.reward_adapter: the reward adapter sits on the policy's LoRA base"),
        "reward adapter asked for, none there": ([f"ppo.reward_model={tiny_reward_model}", "ppo.reward_adapter=true",
                                                  "ppo.lora.enabled=true"],
                                                 f"ppo.reward_adapter: {tiny_reward_model} has no adapter/"),
        "reward function that cannot be imported": (["ppo.reward_fn=no_such_module.rewards:score"],
                                                    "ppo.reward_fn: cannot import module 'no_such_module.rewards'"),
        "reward function name not in the module": (["ppo.reward_fn=rlhf_dist.demo.rewards:kindness"],
                                                   "has no 'kindness'"),
        "reward model with a 3-label head": ([f"ppo.reward_model={three_label_model}"], "head with 3 labels"),
        "reward model that is a causal LM": ([f"ppo.reward_model={tiny_model}"], "not a sequence classifier"),
        "no reward at all": ([], "ppo: no reward; set ppo.reward_model"),
        "prompts longer than the maximum": ([f"ppo.reward_model={tiny_reward_model}", f"ppo.data.path={long_prompts}",
                                             "ppo.data.eval_fraction=0.3", "ppo.training.rollout_batch_size=2",
                                             "ppo.training.generation_batch_size=2", "ppo.training.mini_batch_size=2",
                                             "ppo.training.per_device_train_batch_size=2",
                                             "ppo.training.max_prompt_length=64", "ppo.data.on_long_row=error"],
                                            "rows are longer than ppo.training.max_prompt_length=64 tokens"),
        "batch that does not split into generation chunks": (
            [f"ppo.reward_model={tiny_reward_model}", "ppo.training.generation_batch_size=3"],
            "generation_batch_size=3 does not divide the 8 rollouts per process"),
        "value model with another vocabulary": ([f"ppo.reward_model={tiny_reward_model}", f"ppo.value_model={other_rm}"],
                                                f"ppo.value_model: {other_rm} has a vocabulary of 600 tokens"),
        "unknown tracker": (["ppo.reward_fn=rlhf_dist.demo.rewards:politeness", "ppo.training.report_to=[wandb]"],
                            "training.report_to: unknown tracker(s) ['wandb']"),
        "value head with a critic-free estimator": (["ppo.reward_fn=rlhf_dist.demo.rewards:politeness", "ppo.value_head=true",
                                                     "ppo.training.advantage_estimator=rloo",
                                                     "ppo.training.samples_per_prompt=2"],
                                                    "value_head / value_model / value_adapter are for"),
        "prompt + response longer than the model's positions": (
            ["ppo.reward_fn=rlhf_dist.demo.rewards:politeness", "ppo.training.max_new_tokens=250"],
            "+ max_new_tokens (250) exceeds the policy's 256 positions"),
        "group baseline with one sample per prompt": (["ppo.reward_fn=rlhf_dist.demo.rewards:politeness",
                                                       "ppo.training.advantage_estimator=grpo"],
                                                      "set training.samples_per_prompt >= 2"),
        "REINFORCE++-baseline with one sample per prompt": (
            ["ppo.reward_fn=rlhf_dist.demo.rewards:politeness", "ppo.training.advantage_estimator=reinforce_pp_baseline"],
            "training.advantage_estimator=reinforce_pp_baseline compares samples of the same prompt"),
        "dynamic sampling without groups": (["ppo.reward_fn=rlhf_dist.demo.rewards:politeness",
                                             "ppo.training.dynamic_sampling=true"],
                                            "training.dynamic_sampling drops groups of samples whose scores are all equal, "
                                            "but advantage_estimator=gae has no groups"),
        "an overlong buffer longer than the budget": (["ppo.reward_fn=rlhf_dist.demo.rewards:politeness",
                                                       "ppo.training.overlong_buffer=20"],
                                                      "training.overlong_buffer=20 is longer than max_new_tokens=12"),
        "an unknown estimator": (["ppo.reward_fn=rlhf_dist.demo.rewards:politeness",
                                  "ppo.training.advantage_estimator=dapo"],
                                 "ppo.training.advantage_estimator: expected one of 'gae', 'rloo', 'grpo', 'dr_grpo'"),
    }


CASES = ["value adapter without LoRA", "an SFT adapter to start from, without LoRA", "reward adapter without LoRA",
         "reward adapter asked for, none there",
         "reward function that cannot be imported", "reward function name not in the module",
         "reward model with a 3-label head", "reward model that is a causal LM", "no reward at all",
         "prompts longer than the maximum", "batch that does not split into generation chunks",
         "value model with another vocabulary", "unknown tracker", "value head with a critic-free estimator",
         "prompt + response longer than the model's positions", "group baseline with one sample per prompt",
         "REINFORCE++-baseline with one sample per prompt", "dynamic sampling without groups",
         "an overlong buffer longer than the budget", "an unknown estimator"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_any_model_loads(case, tmp_path, tiny_model, tiny_reward_model, three_label_model,
                                                other_tokenizer_reward_model, demo_data, monkeypatch, capsys):
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    for auto in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", no_loading)
    rec, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    overrides, expected = ppo_bad_cases(tmp_path, tiny_reward_model, three_label_model, tiny_model,
                                        other_tokenizer_reward_model)[case]
    before = snapshot(tmp_path)
    assert main(["ppo", "--recipe", str(rec), "--output", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert snapshot(tmp_path) == before and not out.exists()


def test_a_log_line_cut_short_by_a_crash_does_not_block_resume(tmp_path):
    from rlhf_dist.rl.tracking import Tracker

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x": 2.0}\n{"step": 3, "x": 3.0}\n{"step": 4, "x"')
    tracker = Tracker(tmp_path, enabled=True, report_to=[], resume_step=2)  # resuming from checkpoint-2
    tracker.log(3, {"x": 30.0})
    assert tracker.history() == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 3, "x": 30.0}]
