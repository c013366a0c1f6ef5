"""Training-health guardrails of the PPO loop (rlhf_dist.rl.guardrails): the rules by hand, then injected pathologies
on real runs -- a learning rate that blows up the KL (rollback: the run ends healthy; stop: a diagnosis), a NaN in
one micro-batch (that optimizer step is skipped and counted) -- and the defaults leave a healthy run as it was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import bit_identical, ppo_crashes_at_step, tiny_recipe, without_timings

from rlhf_dist import rundir
from rlhf_dist.cli import main
from rlhf_dist.config.ppo import EntropyRule, GuardrailsConfig, HeldoutRule, KLRule, LengthRule
from rlhf_dist.rl.guardrails import GUARD_STOPPED, Guardrails, worst

# KL per response at lr 0.05 on the tiny model (measured): 0, 1.08, 3.84, 5.25, 7.25, ... -- a blow-up in 3 steps.
BLOW_UP = ["ppo.training.learning_rate=0.05", "ppo.training.max_steps=8", "ppo.guardrails.kl.limit=2",
           "ppo.guardrails.kl.patience=1"]


def test_rules_by_hand():
    cfg = GuardrailsConfig(kl=KLRule(limit=5.0, action="rollback", patience=2), length=LengthRule(limit=0.5, patience=1),
                           entropy=EntropyRule(limit=0.01, patience=1))
    g = Guardrails(cfg, max_new_tokens=10)
    ok = {"objective/kl": 1.0, "policy/entropy": 2.0, "policy/ratio_max": 1.5, "rollout/response_length": 3.0}
    assert g.check(1, ok) == [] and g.healthy()
    assert g.check(2, {**ok, "objective/kl": 6.0}) == [] and not g.healthy()  # 1 of 2 steps: not yet, but not healthy
    (event,) = g.check(3, {**ok, "objective/kl": 7.0})
    assert (event.rule, event.step, event.action, event.value, event.limit) == ("kl", 3, "rollback", 7.0, 5.0)
    assert event.message == "objective/kl = 7 > 5 for 2 steps" and g.since["kl"] == 2
    assert g.check(4, {**ok, "objective/kl": 8.0}) == []  # the same streak fires once
    assert g.check(5, ok) == [] and g.healthy()  # a good step ends the streak
    (length,) = g.check(6, {**ok, "rollout/response_length": 5.0})  # 5 >= 0.5 x 10: a warning, still healthy
    assert length.action == "warn" and g.healthy()
    (nan,) = g.check(7, {**ok, "policy/entropy": math.nan})  # not finite breaks every rule
    assert nan.rule == "entropy" and nan.value is None
    assert worst([length, event]) is event
    assert Guardrails(cfg, 10, ignore_eos=True).check(1, {**ok, "rollout/response_length": 10.0}) == []

    held = Guardrails(GuardrailsConfig(heldout=HeldoutRule(limit=0.5, action="stop"), heldout_every=2), 10)
    for step, train, heldout in ((1, 1.0, None), (2, 1.0, 3.0), (3, 2.0, None), (4, 2.0, 2.9)):
        assert held.check(step, {**ok, "objective/scores": train}, heldout) == []  # fell by 0.1 only
    (hacked,) = held.check(6, {**ok, "objective/scores": 3.0}, 2.0)  # training score up, held-out 1.0 below its best
    assert hacked.rule == "heldout" and hacked.action == "stop" and "hacking the reward" in hacked.message

    skip = Guardrails(GuardrailsConfig(max_skipped=2), 10)
    assert skip.skipped(1, 1, math.nan, deepspeed=False).action == "skip"
    skip.stepped()
    assert skip.skipped(2, 3, math.inf, deepspeed=False).action == "skip"
    assert skip.skipped(2, 4, math.nan, deepspeed=False).action == "stop"  # two in a row
    assert skip.skipped_total == 3
    assert Guardrails(GuardrailsConfig(), 10).skipped(1, 1, math.nan, deepspeed=True).action == "stop"


def run(tmp_path, tiny_model, tiny_reward_model, demo_data, out, *overrides) -> int:
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    return main(["ppo", "--recipe", str(rec), "--output", str(out), f"ppo.reward_model={tiny_reward_model}",
                 "ppo.training.logging_steps=1", *overrides])


def log_rows(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (rundir.work_dir(out, "ppo") / "log.jsonl").read_text().splitlines()] \
        if rundir.work_dir(out, "ppo").is_dir() else json.loads((out / "ppo" / "log_history.json").read_text())
    return [r for r in rows if "event" not in r], [r for r in rows if "event" in r]


def test_kl_blow_up_rolls_back_and_the_run_ends_healthy(tmp_path, tiny_model, tiny_reward_model, demo_data):
    out = tmp_path / "run"
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, out, *BLOW_UP, "ppo.guardrails.kl.action=rollback",
               "ppo.guardrails.rollback.lr_factor=0.1") == 0
    metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    guard = metrics["guardrails"]
    assert guard["rollbacks"] == 1 and guard["lr_scale"] == pytest.approx(0.1) and guard["kl_scale"] == 2.0
    (event,) = [e for e in guard["events"] if e["rule"] == "kl"]
    assert event["action"] == "rollback" and event["step"] == 3 and event["value"] > 2  # 3.84: from checkpoint-2's policy
    history = json.loads((out / "ppo" / "log_history.json").read_text())
    assert [row["step"] for row in history] == list(range(1, 9))  # the trajectory from checkpoint-0 on, once
    assert all(row["objective/kl"] <= 2 for row in history)  # healthy to the end
    assert all(row["objective/kl_coef"] == pytest.approx(0.1) for row in history)  # 0.05 x kl_factor 2
    assert metrics["after"]["kl"] < 5
    tb = next((out / "ppo" / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb.parent), size_guidance={"tensors": 0}).Reload()
    assert "guardrails/kl" in acc.Tags()["scalars"] and "guardrails/text_summary" in acc.Tags()["tensors"]

    # A crash after the rollback: the checkpoint's state holds the rollback (its count, learning rate and KL scales,
    # the event), so the resumed run ends where the uninterrupted one did, bit for bit.
    crashed = tmp_path / "crashed"
    with ppo_crashes_at_step(6):
        run(tmp_path, tiny_model, tiny_reward_model, demo_data, crashed, *BLOW_UP, "ppo.guardrails.kl.action=rollback",
            "ppo.guardrails.rollback.lr_factor=0.1")
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, crashed, *BLOW_UP, "ppo.guardrails.kl.action=rollback",
               "ppo.guardrails.rollback.lr_factor=0.1") == 0
    assert bit_identical(out / "ppo", crashed / "ppo")
    resumed = json.loads((crashed / "ppo" / "metrics.json").read_text())
    assert resumed["guardrails"] == guard
    assert without_timings(json.loads((crashed / "ppo" / "log_history.json").read_text())) == without_timings(history)


def test_kl_blow_up_with_stop_ends_with_a_diagnosis(tmp_path, tiny_model, tiny_reward_model, demo_data, caplog):
    out = tmp_path / "run"
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, out, *BLOW_UP,
               "ppo.guardrails.kl.action=stop") == GUARD_STOPPED
    assert not rundir.is_complete(out, "ppo")
    note = json.loads((out / "logs" / "ppo" / "rank0.exit.json").read_text())
    assert note["status"] == GUARD_STOPPED
    # checkpoint-2 holds the policy whose rollouts step 3 judged: set aside, nothing healthy is left to resume from
    assert note["reason"] == ("guardrail 'kl' stopped the run at step 3: objective/kl = 3.843 > 2; no checkpoint from "
                              "before it: change the recipe and run again")
    assert f"ppo: {note['reason']}" in caplog.text  # the log's one line
    work = rundir.work_dir(out, "ppo")
    assert rundir.last_checkpoint(work) is None and (work / rundir.UNHEALTHY / "checkpoint-2" / rundir.SEAL).is_file()
    _, events = log_rows(out)
    assert [(e["rule"], e["action"], e["step"]) for e in events] == [("kl", "stop", 3)]

    # with a checkpoint every step, --resume continues from the last healthy one (checkpoint-1)
    out = tmp_path / "every"
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, out, *BLOW_UP, "ppo.guardrails.kl.action=stop",
               "ppo.training.save_steps=1", "ppo.training.save_total_limit=5") == GUARD_STOPPED
    work = rundir.work_dir(out, "ppo")
    reason = json.loads((out / "logs" / "ppo" / "rank0.exit.json").read_text())["reason"]
    assert reason.endswith(f"--resume continues from {work / 'checkpoint-1'}, saved before it: change the recipe first "
                           "(e.g. a lower ppo.training.learning_rate or a higher ppo.training.kl_coef)")
    assert rundir.last_checkpoint(work) == str(work / "checkpoint-1")
    assert sorted(p.name for p in (work / rundir.UNHEALTHY).iterdir()) == ["checkpoint-2"]


def test_nan_in_one_micro_batch_skips_that_optimizer_step(tmp_path, tiny_model, tiny_reward_model, demo_data,
                                                         monkeypatch):
    from rlhf_dist.rl.trainer import PPOLoop

    real_loss, real_update = PPOLoop.loss, PPOLoop.optimizer_update
    calls, seen = [], {}

    def nan_once(self, mb, *args):
        loss, stats = real_loss(self, mb, *args)
        calls.append(self.step)
        if self.step == 2 and calls.count(2) == 1:  # the first micro-batch of step 2
            loss = loss * torch.tensor(float("nan"))
        return loss, stats

    def watched(self, stats):  # the weights around the optimizer step that holds the NaN
        before = [p.detach().clone() for p in self.model.parameters()]
        real_update(self, stats)
        if self.step == 2 and "skipped" not in seen:
            seen["skipped"] = all(torch.equal(a, b) for a, b in zip(before, self.model.parameters()))

    monkeypatch.setattr(PPOLoop, "loss", nan_once)
    monkeypatch.setattr(PPOLoop, "optimizer_update", watched)
    out = tmp_path / "run"
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, out) == 0
    assert seen["skipped"]  # not applied: the weights did not move
    guard = json.loads((out / "ppo" / "metrics.json").read_text())["guardrails"]
    assert guard["skipped_optimizer_steps"] == 1
    assert [(e["rule"], e["action"], e["step"]) for e in guard["events"] if e["rule"] == "nonfinite"] == [
        ("nonfinite", "skip", 2)]
    from helpers import saved_tensors

    assert all(torch.isfinite(t).all() for t in saved_tensors(out / "ppo").values())
    history = json.loads((out / "ppo" / "log_history.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3, 4] and all(math.isfinite(r["train/grad_norm"]) for r in history)

    # NaN every time from step 2 on: max_skipped (3) in a row stop the run
    def nan_loss(self, mb, *a):
        loss, stats = real_loss(self, mb, *a)
        return (loss * float("nan") if self.step >= 2 else loss), stats

    monkeypatch.setattr(PPOLoop, "loss", nan_loss)
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, tmp_path / "nan") == GUARD_STOPPED
    _, events = log_rows(tmp_path / "nan")
    assert [e["action"] for e in events if e["rule"] == "nonfinite"] == ["skip", "skip", "stop"]


def test_defaults_leave_a_healthy_run_as_it_was(tmp_path, tiny_model, tiny_reward_model, demo_data):
    """Every rule off and nonfinite: stop (nothing is ever skipped) against the defaults: the same bits."""
    off = [f"ppo.guardrails.{rule}.limit=null" for rule in ("kl", "entropy", "ratio", "length")]
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, tmp_path / "off", *off,
               "ppo.guardrails.nonfinite=stop") == 0
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, tmp_path / "defaults") == 0
    assert bit_identical(tmp_path / "off" / "ppo", tmp_path / "defaults" / "ppo")
    a, b = (json.loads((tmp_path / run_ / "ppo" / "log_history.json").read_text()) for run_ in ("off", "defaults"))
    assert without_timings(a) == without_timings(b)


@pytest.mark.parametrize("override, message", [
    ("ppo.guardrails.kll.limit=3", "unknown key 'ppo.guardrails.kll'; did you mean 'kl'?"),
    ("ppo.guardrails.kl.action=explode", "ppo.guardrails.kl.action: expected one of 'warn', 'stop', 'rollback'"),
    ("ppo.guardrails.entropy.limit=-1", "ppo.guardrails.entropy.limit must be >= 0"),
    ("ppo.guardrails.kl.patience=0", "ppo.guardrails.kl.patience must be >= 1"),
    ("ppo.guardrails.rollback.lr_factor=2", "ppo.guardrails.rollback.lr_factor must be within (0, 1]"),
    ("ppo.guardrails.heldout.limit=0.5", "needs guardrails.heldout_every > 0"),
    ("ppo.watchdog.update=-5", "watchdog.update must be a number of seconds > 0"),
    ("ppo.training.ddp_timeout=0", "ddp_timeout must be >= 1"),
])
def test_bad_guardrail_and_watchdog_settings_fail_in_one_line_before_anything(override, message, tmp_path, tiny_model,
                                                                              tiny_reward_model, demo_data, capsys):
    out = tmp_path / "run"
    assert run(tmp_path, tiny_model, tiny_reward_model, demo_data, out, override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_bad_grace_period_fails_in_one_line(tmp_path, tiny_model, demo_data, capsys):
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    for command in (["sft"], ["pipeline"], ["launch", "sft", "--strategy", "ddp"]):
        assert main([*command, "--recipe", str(rec), "--output", str(tmp_path / "run"), "--grace-period", "-1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: --grace-period must be a number of seconds >= 0, got -1"], (command, err)
    assert not (tmp_path / "run").exists()
