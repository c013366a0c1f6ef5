"""TERM and INT, as Slurm (scancel, the time limit), Kubernetes and Ctrl-C send them: the stage finishes the step it
is in, every process agrees, a checkpoint is saved there and the stage exits 75; the same command then resumes
to the uninterrupted run's weights, bit for bit. A second signal exits at once; a step that outlasts the grace
period exits without saving. (USR1, the same path: tests/test_preempt.py; on a real Slurm: test_slurm_cluster.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, bit_identical, checkpointed_args, stage_process, tiny_recipe, without_timings

from rlhf_dist import preempt, rundir

pytestmark = pytest.mark.slow

SFT = ["sft.training.max_steps=8", "sft.training.logging_steps=1"]


@pytest.fixture
def recipe(tmp_path, tiny_model, demo_data):
    return tiny_recipe(tmp_path, tiny_model, demo_data)  # save_strategy "no": any checkpoint comes from the signal


@pytest.mark.parametrize("stage, signame", [("sft", "TERM"), ("sft", "INT"), ("ppo", "TERM")])
def test_one_process_stops_at_the_step_saves_and_resumes_exactly(stage, signame, tmp_path, shared_recipe,
                                                                 tiny_reward_model, uninterrupted):
    args = checkpointed_args(stage, shared_recipe, tiny_reward_model)  # the kill tests' runs: one uninterrupted run
    clean, out = uninterrupted(stage, *args), tmp_path / "stopped"
    # the signal comes inside step 3 (a real signal to the real handler), twice within a moment: one request
    stopped = stage_process(stage, *args, "--output", str(out), fault=f"step@3:{signame.lower()};step@3:{signame.lower()}")
    assert stopped.returncode == preempt.PREEMPTED, stopped.stderr[-3000:]
    assert f"got SIG{signame}: finishing the step in progress" in stopped.stderr
    work = rundir.work_dir(out, stage)
    assert rundir.last_checkpoint(work) == str(work / "checkpoint-3")  # the step it was in, sealed
    note = json.loads((out / "logs" / stage / "rank0.exit.json").read_text())
    assert note["status"] == preempt.PREEMPTED and f"on SIG{signame}" in note["reason"]
    resumed = stage_process(stage, *args, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert bit_identical(clean / stage, out / stage)
    for name in ("metrics.json", "log_history.json"):
        a, b = (json.loads((run / stage / name).read_text()) for run in (clean, out))
        assert without_timings(a) == without_timings(b), name


def test_second_signal_exits_at_once_and_the_grace_period_bounds_a_stop(recipe, tmp_path):
    """A step that never ends (a hang right after the TERM): a second TERM 3 s later exits at once (143); alone, the
    grace period ends it without a checkpoint. Either way the last complete checkpoint is what stays."""
    args = ["--recipe", str(recipe), *SFT, "sft.training.save_strategy=steps", "sft.training.save_steps=2"]
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RLHF_DIST_FAULT"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_dist", "sft", *args, "--output", str(out)],
                            env={**env, "RLHF_DIST_FAULT": "step@3:term;step@3:hang"}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    note = out / "logs" / "sft" / "rank0.log"
    while not (note.is_file() and "got SIGTERM" in note.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the stage ended before its TERM"
        time.sleep(0.1)
    time.sleep(preempt.DUPLICATE_SECONDS + 1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert time.time() - sent < 5 and "a second SIGTERM: exiting at once" in err
    work = rundir.work_dir(out, "sft")
    assert rundir.last_checkpoint(work) == str(work / "checkpoint-2")

    started = time.time()
    alone = stage_process("sft", *args, "--output", str(out), "--grace-period", "3", fault="step@3:term;step@3:hang")
    assert alone.returncode == 128 + signal.SIGTERM, alone.stderr[-3000:]
    assert "did not finish within the grace period of 3 s" in alone.stderr
    assert time.time() - started < 60
    assert rundir.last_checkpoint(work) == str(work / "checkpoint-2")
    reason = json.loads((out / "logs" / "sft" / "rank0.exit.json").read_text())["reason"]
    assert "grace period of 3 s" in reason


def launch(out, recipe, *extra):
    return [sys.executable, "-m", "rlhf_dist", "launch", "sft", "--recipe", str(recipe), "--output", str(out),
            "--strategy", "ddp", "--num-processes", "2", "sft.training.per_device_train_batch_size=8",
            "sft.training.logging_steps=1", *extra]


def test_two_processes_term_to_the_launcher_checkpoints_exits_75_and_resumes_exactly(recipe, tmp_path):
    """TERM to `rlhf-dist launch` (what Slurm and Kubernetes send it): it passes the signal on to both training
    processes once, they agree on the step, save there, and the launcher exits 75; the same command resumes."""
    steps = "sft.training.max_steps=150"  # ~4 s of training: the TERM surely lands inside it
    clean, out = tmp_path / "clean", tmp_path / "stopped"
    env = {k: v for k, v in os.environ.items() if k != "RLHF_DIST_FAULT"}
    done = subprocess.run(launch(clean, recipe, steps), capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(launch(out, recipe, steps), stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    log = out / "logs" / "sft" / "rank0.log"
    deadline = time.time() + 300
    while not (log.is_file() and "2/150" in log.read_text()):  # training is under way
        assert proc.poll() is None and time.time() < deadline, "the run ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == preempt.PREEMPTED, err[-3000:]
    assert "stopped on request (SIGTERM)" in err
    notes = [json.loads((out / "logs" / "sft" / f"rank{r}.exit.json").read_text()) for r in (0, 1)]
    assert [n["status"] for n in notes] == [preempt.PREEMPTED] * 2
    step = int(notes[0]["reason"].split("preempted at step ")[1].split()[0])
    assert notes[1]["reason"] == notes[0]["reason"] and 2 <= step < 150  # both stopped at the same step
    assert rundir.last_checkpoint(rundir.work_dir(out, "sft")).endswith(f"checkpoint-{step}")
    resumed = subprocess.run(launch(out, recipe, steps), capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert bit_identical(clean / "sft", out / "sft")
    a, b = (json.loads((run / "sft" / "metrics.json").read_text()) for run in (clean, out))
    assert without_timings(a) == without_timings(b)


USR1_THEN_TERM = """
import os, signal, time
from rlhf_dist import preempt
preempt.install(1.0)
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.1)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the same request again at once (another sender): not a second one
time.sleep(10)  # a step that never ends
"""


def test_usr1_then_term_starts_the_grace_period_and_a_duplicate_is_one_request():
    """Slurm's USR1 warning, then the time limit's TERM (twice, from two senders) while the stop is still going on."""
    started = time.time()
    done = subprocess.run([sys.executable, "-c", USR1_THEN_TERM], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert 1.0 <= time.time() - started < 8
    assert "got SIGTERM while stopping" in done.stderr and "within the grace period of 1 s" in done.stderr
    assert "second SIGTERM" not in done.stderr
