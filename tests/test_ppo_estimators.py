"""The estimators of issue 16 in the real loop: DAPO's dynamic sampling (drop, refill, top up; 2 processes = 1), the
fixed reward gain/bias (fitted once, kept across a crash), all through the PPO stage on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, ppo_crashes_at_step, run_launched, tiny_recipe

from rlhf_dist.cli import main
from rlhf_dist.rl.batch import RolloutBatch
from rlhf_dist.rl.sampler import RolloutSampler

GROUPS = ["ppo.reward_fn=estimator_rewards:half_constant", "ppo.training.advantage_estimator=grpo",
          "ppo.training.samples_per_prompt=4", "ppo.training.rollout_batch_size=4", "ppo.training.generation_batch_size=4",
          "ppo.training.mini_batch_size=8", "ppo.training.per_device_train_batch_size=4"]


def run_ppo(tmp_path: Path, tiny_model, demo_data, *overrides: str, out: Path | None = None) -> Path:
    out = out or tmp_path / "run"
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    assert main(["ppo", "--recipe", str(rec), "--output", str(out), *overrides]) == 0
    return out / "ppo"


def history(stage: Path) -> list[dict]:
    return json.loads((stage / "log_history.json").read_text())


# ------------------------------------------------------------------------------------------------- dynamic sampling
def fake_batch(scores: list[float], tag: float) -> RolloutBatch:
    """Rollouts with the given scores; every tensor carries `tag` so the test can tell where a group came from."""
    n = len(scores)
    ids, mask = torch.full((n, 2), 7), torch.ones(n, 2, dtype=torch.long)
    tokens = torch.full((n, 3), tag)
    return RolloutBatch(ids, mask, ids[:, :1].clone(), torch.ones(n, 1, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                        tokens[:, :1], tokens[:, :1], tokens[:, :1], None, torch.tensor(scores))


def sampler(rounds: int, refills: list[RolloutBatch]) -> RolloutSampler:
    s = RolloutSampler.__new__(RolloutSampler)
    s.args = SimpleNamespace(samples_per_prompt=2, rollout_batch_size=3, dynamic_sampling_max_rounds=rounds)
    s.accelerator = SimpleNamespace(num_processes=1)
    s.pad_id, s.asked = 0, []
    s.rollout = lambda prompts, seed_parts, step, columns: s.asked.append(seed_parts) or refills[len(s.asked) - 1]
    return s


def test_dynamic_sampling_keeps_informative_groups_refills_and_tops_up():
    """Groups of 2: [1, 2] informative, [5, 5] not, [3, 3] not. Refill round 1 gives [0, 1] and [4, 4]; round 2
    [2, 2] and [6, 9]. The step keeps the informative ones in the order met; refills are seeded per round."""
    first = fake_batch([1, 2, 5, 5, 3, 3], tag=0.0)
    s = sampler(rounds=3, refills=[fake_batch([0, 1, 4, 4], 1.0), fake_batch([2, 2, 6, 9], 2.0)])
    batch, stats = s.dynamic_sampling(first, lambda r: ([[1]] * 4, {}), (42, 7), step=7)
    assert batch.scores.tolist() == [1, 2, 0, 1, 6, 9] and batch.logprobs[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert stats == {"rollout/dynamic_rounds": 2.0, "rollout/groups_dropped": 4.0, "rollout/groups_filled": 0.0}
    assert s.asked == [(42, 7, 1), (42, 7, 2)]  # each round its own seeds, after the step's own (42, 7)

    s = sampler(rounds=1, refills=[fake_batch([4, 4, 8, 8], 1.0)])  # one round, not enough: the dropped top it up
    batch, stats = s.dynamic_sampling(first, lambda r: ([[1]] * 4, {}), (42, 7), step=7)
    assert batch.scores.tolist() == [1, 2, 5, 5, 3, 3] and stats["rollout/groups_filled"] == 2.0
    assert sampler(rounds=3, refills=[]).dynamic_sampling(fake_batch([1, 2, 3, 4, 5, 6], 0.0), None, (0,), 1)[1] == {
        "rollout/dynamic_rounds": 0.0, "rollout/groups_dropped": 0.0, "rollout/groups_filled": 0.0}


@pytest.mark.slow
def test_dynamic_sampling_in_the_loop_and_two_processes_equal_one(tmp_path, tiny_model, demo_data):
    """Half the prompts get one constant score per group (no signal): those groups are dropped and refilled, so the
    step trains on informative groups only; on 2 processes (DDP) every metric equals the 1-process run's."""
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    args = ["-m", "rlhf_dist", "ppo", "--recipe", str(rec), *GROUPS, "ppo.training.dynamic_sampling=true",
            "ppo.training.max_steps=3", "ppo.training.save_steps=0", "ppo.training.eval_max_prompts=8"]
    env_path = f"PYTHONPATH={REPO / 'tests'}"
    one = run_launched(["env", env_path, sys.executable, *args, "--output", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_launched(["env", env_path, sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        "launch/ddp.yaml", "--num_processes", "2", *args, "--output", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = history(tmp_path / "one" / "ppo"), history(tmp_path / "two" / "ppo")
    assert json.loads((tmp_path / "two" / "ppo" / "metrics.json").read_text())["world_size"] == 2
    assert sum(r["rollout/groups_dropped"] for r in a) > 0 and all(r["rollout/dynamic_rounds"] >= 1 for r in a
                                                                   if r["rollout/groups_dropped"] > 0)
    assert all(r["rollout/groups_filled"] == 0 for r in a)  # enough informative groups were found every step
    for x, y in zip(a, b):
        for k in x:
            if not k.startswith(("time/", "rollout/tokens_per_second", "train/samples_per_second")):
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)


# ------------------------------------------------------------------------------------------------- overlong filter
@pytest.mark.slow
def test_overlong_filter_leaves_truncated_responses_out_of_the_loss(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """The random tiny policy never stops within 12 tokens: with DAPO's overlong filtering every response is left out
    of the loss, so nothing is learned: the KL to the reference stays 0 and the weights stay as they were (without the
    filter the same run moves, as the other PPO tests' runs do)."""
    from safetensors.torch import load_file

    common = [f"ppo.reward_model={tiny_reward_model}", "ppo.training.advantage_estimator=reinforce_pp",
              "ppo.training.max_steps=2", "ppo.training.save_steps=0"]
    filtered = history(run_ppo(tmp_path, tiny_model, demo_data, *common, "ppo.training.overlong_filter=true",
                               out=tmp_path / "filtered"))
    assert [r["rollout/eos_rate"] for r in filtered] == [0.0, 0.0]
    assert filtered[1]["objective/kl"] == 0.0
    start, end = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "filtered" / "ppo" / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)


# ------------------------------------------------------------------------------------------------- gain / bias
@pytest.mark.slow
def test_fixed_gain_bias_is_fitted_once_and_survives_a_crash(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """docs/ppo.md item 8: gain and bias fitted on the initial policy's rollouts (their own seeds) make its scores
    mean 0, std 1; every later score is gain * s + bias (at KL 0 the first step's reward shows it exactly); a run
    crashed after its checkpoint resumes with the same gain/bias, to the uninterrupted run's weights."""
    from safetensors.torch import load_file

    common = [f"ppo.reward_model={tiny_reward_model}", "ppo.training.reward_gain_bias=true", "ppo.training.max_steps=4",
              "ppo.training.save_steps=2"]
    clean = run_ppo(tmp_path, tiny_model, demo_data, *common, out=tmp_path / "clean")
    gain, bias = json.loads((clean / "metrics.json").read_text())["train"]["reward_gain_bias"]
    assert gain > 0
    first = history(clean)[0]
    assert first["objective/rlhf_reward"] == pytest.approx(gain * first["objective/scores"] + bias, abs=1e-5)
    assert abs(first["objective/rlhf_reward"]) < 1.5  # near the target mean 0 (another draw of the same policy)

    with ppo_crashes_at_step(3):
        run_ppo(tmp_path, tiny_model, demo_data, *common, out=tmp_path / "crashed")
    state = json.loads((tmp_path / "crashed" / "ppo.incomplete" / "checkpoint-2" / "ppo_state.json").read_text())
    assert state["gain_bias"] == [gain, bias]
    resumed = run_ppo(tmp_path, tiny_model, demo_data, *common, out=tmp_path / "crashed")
    a, b = load_file(clean / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- composite rewards
def answer_prompts(tmp_path: Path, demo_data: dict, column: str = "answer") -> Path:
    """The demo's PPO prompts, each with a reference answer column (the first word of the village's name: checkable)."""
    rows = [json.loads(line) for line in Path(demo_data["prompts"]).read_text().splitlines()]
    out = tmp_path / "with_answers.jsonl"
    out.write_text("".join(json.dumps({"prompt": r["prompt"], column: r["prompt"].split()[-1]}) + "\n" for r in rows))
    return out


@pytest.mark.slow
def test_composite_reward_logs_each_component_and_sums_them(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """ppo.rewards: a verifiable function reading the data's `answer` column, a length penalty and the reward model,
    weighted: every step logs reward/<label> for each, and the score trained on is their weighted sum."""
    rewards = ("[{name: exact_match, weight: 2.0}, {name: length_penalty, weight: 0.5, kwargs: {limit: 3}}, "
               "{name: reward_model, weight: 0.25}]")
    stage = run_ppo(tmp_path, tiny_model, demo_data, f"ppo.reward_model={tiny_reward_model}", f"ppo.rewards={rewards}",
                    f"ppo.data.path={answer_prompts(tmp_path, demo_data)}", "ppo.training.max_steps=2",
                    "ppo.training.save_steps=0")
    for row in history(stage):
        parts = {k: row[k] for k in ("reward/exact_match", "reward/length_penalty", "reward/reward_model")}
        assert -1.0 <= parts["reward/length_penalty"] < 0  # the random policy's responses run past 3 words
        total = 2.0 * parts["reward/exact_match"] + 0.5 * parts["reward/length_penalty"] + 0.25 * parts["reward/reward_model"]
        assert row["objective/scores"] == pytest.approx(total, abs=1e-5)
    metrics = json.loads((stage / "metrics.json").read_text())
    assert "reward/exact_match" in metrics["before"] and "reward/reward_model" in metrics["after"]


@pytest.mark.parametrize("overrides,message", [
    (["ppo.rewards=[{name: exact_match}]"],
     "ppo.rewards[0] (exact_match): needs the column 'answer' of ppo.data (train split), which has input_ids, prompt"),
    (["ppo.rewards=[{name: exact_mach}]"], "ppo.rewards[0]: unknown reward 'exact_mach'; did you mean 'exact_match'?"),
    (["ppo.rewards=[{name: math_answer, weight: .nan}]"], "ppo.rewards[0] (math_answer): weight must be a finite number"),
    (["ppo.rewards=[{name: format}]"], "ppo.rewards[0] (format): missing kwargs.pattern"),
    (["ppo.rewards=[{name: exact_match}]", "ppo.reward_fn=rlhf_dist.demo.rewards:politeness"],
     "rewards and reward_fn are both set"),
])
def test_bad_composite_rewards_fail_in_one_line_before_any_model_loads(overrides, message, tmp_path, tiny_model,
                                                                       tiny_reward_model, demo_data, monkeypatch, capsys):
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    for auto in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", no_loading)
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    model = [] if any(o.startswith("ppo.reward_fn=") for o in overrides) else [f"ppo.reward_model={tiny_reward_model}"]
    code = main(["ppo", "--recipe", str(rec), "--output", str(tmp_path / "run"), *model, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()
