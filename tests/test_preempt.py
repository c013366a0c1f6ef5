"""Preemption: USR1 makes a stage save a checkpoint at the step it is in and stop; the same command then
resumes and ends where an uninterrupted run ends, bit for bit. And the launcher passes USR1 on to
training processes that run in their own sessions, without dying of it itself.
(The same on a real Slurm, with requeue, across two nodes: tests/test_slurm_cluster.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe
from safetensors.torch import load_file

from rlhf_dist import preempt
from rlhf_dist.cli import main


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sft_preempted_at_a_step_saves_there_and_resumes_to_the_uninterrupted_result(tmp_path, tiny_model, demo_data,
                                                                                         monkeypatch):
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)  # save_strategy "no": any checkpoint comes from the signal
    steps = ["sft.training.max_steps=8"]
    assert main(["sft", "--recipe", str(rec), "--output", str(tmp_path / "clean"), *steps]) == 0

    real = preempt.trainer_callback

    def signal_during_step_3():
        callback = real()
        on_step_end = callback.on_step_end

        def hook(args, state, control, **kw):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, to the real handler
            return on_step_end(args, state, control, **kw)

        callback.on_step_end = hook
        return callback

    monkeypatch.setattr(preempt, "trainer_callback", signal_during_step_3)
    out = tmp_path / "preempted"
    assert main(["sft", "--recipe", str(rec), "--output", str(out), *steps]) == preempt.PREEMPTED
    assert not (out / "sft").exists()
    assert sorted(p.name for p in (out / "sft.incomplete").glob("checkpoint-*")) == ["checkpoint-3"]

    monkeypatch.setattr(preempt, "trainer_callback", real)
    assert main(["sft", "--recipe", str(rec), "--output", str(out), *steps, "--resume"]) == 0
    metrics = json.loads((out / "sft" / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 8
    assert same_weights(tmp_path / "clean" / "sft" / "model.safetensors", out / "sft" / "model.safetensors")
    clean = json.loads((tmp_path / "clean" / "sft" / "metrics.json").read_text())
    assert metrics["after"] == clean["after"]


def test_ppo_preempted_at_a_step_saves_there_and_resumes_to_the_uninterrupted_result(tmp_path, tiny_model,
                                                                                         tiny_reward_model, demo_data,
                                                                                         monkeypatch):
    from rlhf_dist.rl.trainer import PPOLoop

    rec = tiny_recipe(tmp_path, tiny_model, demo_data)  # 4 steps, save_steps 2
    args = ["--recipe", str(rec), f"ppo.reward_model={tiny_reward_model}"]
    assert main(["ppo", *args, "--output", str(tmp_path / "clean")]) == 0
    real_step = PPOLoop.train_step

    def signal_during_step_3(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(self, step)

    monkeypatch.setattr(PPOLoop, "train_step", signal_during_step_3)
    out = tmp_path / "preempted"
    assert main(["ppo", *args, "--output", str(out)]) == preempt.PREEMPTED
    # checkpoint-2 from save_steps, checkpoint-3 from the signal (not a multiple of save_steps)
    assert sorted(p.name for p in (out / "ppo.incomplete").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "ppo.incomplete" / "checkpoint-3" / "ppo_state.json").read_text())["step"] == 3

    monkeypatch.setattr(PPOLoop, "train_step", real_step)
    assert main(["ppo", *args, "--output", str(out), "--resume"]) == 0
    for name in ("model.safetensors", "value_model/model.safetensors"):
        assert same_weights(tmp_path / "clean" / "ppo" / name, out / "ppo" / name), name
    steps = [row["step"] for row in json.loads((out / "ppo" / "log_history.json").read_text())]
    assert steps == [1, 2, 3, 4]


CHILD = """
import sys, time
from pathlib import Path
from rlhf_dist import preempt
Path(sys.argv[1], "ready").write_text("ready")
time.sleep(float(sys.argv[2]))  # still starting up: USR1 is ignored (inherited SIG_IGN) until install()
preempt.install()
for _ in range(600):
    if preempt.requested_here():
        Path(sys.argv[1], "stopped").write_text("stopped on USR1")
        sys.exit(0)
    time.sleep(0.05)
sys.exit(3)
"""
# Like torch's elastic agent: starts the training process in a new session and waits for it. It installs no
# handler for USR1, so without the launcher's SIG_IGN it would die of the signal and orphan its child.
MIDDLE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], start_new_session=True)
sys.exit(child.wait())
"""
DRIVER = """
import sys
from rlhf_dist import preempt
code, got = preempt.run_forwarding([sys.executable, "-c", *sys.argv[1:]])
print(code, got)
"""


@pytest.mark.parametrize("startup_seconds", [0.0, 3.0])
def test_launcher_forwards_usr1_to_processes_in_other_sessions(startup_seconds, tmp_path):
    """With a 3 s start-up the child ignores USR1 at first (inherited SIG_IGN): the launcher passes it on once the child
    handles it (its SigCgt mask), and only then."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, MIDDLE, CHILD, str(tmp_path), str(startup_seconds)],
                              stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline and driver.poll() is None, "the child did not start"
        time.sleep(0.05)
    below = preempt.descendants(driver.pid)
    assert len(below) == 2  # the middle process and the child, found through /proc
    os.kill(driver.pid, signal.SIGUSR1)
    out, _ = driver.communicate(timeout=60)
    assert out.split() == ["0", "SIGUSR1"]  # the middle process survived and passed on the child's exit status
    assert (tmp_path / "stopped").read_text() == "stopped on USR1"
