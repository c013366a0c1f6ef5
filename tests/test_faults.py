"""Fault injection: every stage is killed (SIGKILL to its whole process group) at three moments -- inside a step,
while a checkpoint is being written, after the last step before the stage completes -- and each time the same
command is run again. The run that survived all three ends with the weights of an uninterrupted run, bit for
bit, and the same metrics and log history (timings apart). The kills are real signals at exact moments
(rlhf_dist.faults); one more test kills sft from outside, the moment a checkpoint folder appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import EVERY, STEPS_CHECKPOINTED, bit_identical, checkpointed_args, stage_process, without_timings

from rlhf_dist import rundir

pytestmark = pytest.mark.slow

def outputs(out, stage):
    folder = rundir.stage_dir(out, stage)
    return (json.loads((folder / "metrics.json").read_text()), json.loads((folder / "log_history.json").read_text()))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "dpo"])
def test_killed_at_three_moments_resumes_to_the_uninterrupted_run(stage, tmp_path, shared_recipe, tiny_reward_model,
                                                                    uninterrupted):
    args = checkpointed_args(stage, shared_recipe, tiny_reward_model)
    clean, out = uninterrupted(stage, *args), tmp_path / "killed"
    work = rundir.work_dir(out, stage)
    last, saving = STEPS_CHECKPOINTED[stage], 2 * EVERY[stage]

    # 1. inside a step (its gradients computed, the weights not yet updated), before any checkpoint exists
    killed = stage_process(stage, *args, "--output", str(out), fault=f"step@{EVERY[stage] - 1}:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not rundir.is_complete(out, stage) and rundir.last_checkpoint(work) is None

    # 2. while checkpoint `saving` is written: its folder is there, unsealed; resume must not take it
    killed = stage_process(stage, *args, "--output", str(out), fault=f"checkpoint@{saving}:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    complete, incomplete = rundir.checkpoints(work)
    assert [p.name for p in complete] == [f"checkpoint-{saving - EVERY[stage]}"]
    assert [p.name for p in incomplete] == [f"checkpoint-{saving}" + (".tmp" if stage == "ppo" else "")]

    # 3. after the last step (for the HF stages a checkpoint at it is complete), before the stage is complete
    killed = stage_process(stage, *args, "--output", str(out), fault="trained:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "set aside" in killed.stderr and (work / rundir.SET_ASIDE / incomplete[0].name).is_dir()  # kept, not deleted
    assert not rundir.is_complete(out, stage)
    if stage != "ppo":
        assert rundir.last_checkpoint(work).endswith(f"checkpoint-{last}")

    # 4. the same command once more: it completes, and it is the uninterrupted run
    done = stage_process(stage, *args, "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert bit_identical(rundir.stage_dir(clean, stage), rundir.stage_dir(out, stage))
    (m_clean, h_clean), (m_out, h_out) = outputs(clean, stage), outputs(out, stage)
    assert m_out["train"]["global_step"] == last  # no step after the last one
    assert without_timings(m_out) == without_timings(m_clean)  # train_loss included: over every step of the run
    assert without_timings(h_out) == without_timings(h_clean)


def test_sft_killed_from_outside_while_a_checkpoint_appears(tmp_path, shared_recipe, tiny_reward_model, uninterrupted):
    """No injection: the run's process group gets SIGKILL the moment checkpoint-8's folder shows up, mid-write."""
    args = checkpointed_args("sft", shared_recipe, tiny_reward_model)
    clean, out = uninterrupted("sft", *args), tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RLHF_DIST_FAULT"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_dist", "sft", *args, "--output", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = rundir.work_dir(out, "sft") / "checkpoint-8"
    deadline = time.time() + 300
    while not target.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before checkpoint-8 appeared"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = stage_process("sft", *args, "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert bit_identical(clean / "sft", out / "sft")
    (m_clean, h_clean), (m_out, h_out) = outputs(clean, "sft"), outputs(out, "sft")
    assert without_timings(m_out) == without_timings(m_clean) and without_timings(h_out) == without_timings(h_clean)
