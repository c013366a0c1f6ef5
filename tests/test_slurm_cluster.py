"""The rendered sbatch scripts on a real Slurm (controller + two compute daemons on this machine).

What runs is what a user submits: `rlhf-dist slurm render` writes the scripts, `sbatch` (or the
rendered pipeline.sh) submits them, Slurm starts one task per node, each task runs `rlhf-dist launch`
with its own node rank, and the processes of both "nodes" meet in one c10d rendezvous (gloo, CPU).
The cluster fixture (tests/slurm_cluster.py) stops every daemon it started, by PID file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_recipe
from slurm_cluster import LocalSlurm, _free_port_block, missing_programs

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster():
    missing = missing_programs()
    if missing:
        pytest.fail(f"Slurm is not installed (missing {', '.join(missing)}): run `bash scripts/setup_slurm.sh` as root")
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster runs its daemons as root; run these tests as root (CI does)")
    # Not under pytest's tmp folder: munged insists that every folder above its socket is world-executable.
    root = Path(tempfile.mkdtemp(prefix="rlhf-dist-slurm-"))
    root.chmod(0o755)
    slurm = LocalSlurm(root, nodes=2, cpus_per_node=1)
    # Jobs inherit this environment (sbatch --export=ALL): the venv's rlhf-dist first on PATH, one thread per process.
    slurm.env.update(PATH=f"{Path(sys.executable).parent}:{slurm.env['PATH']}", OMP_NUM_THREADS="1",
                     HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        yield slurm.start()
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


def render(cluster: LocalSlurm, recipe: Path, output: Path, *args: str) -> list[Path]:
    cmd = [sys.executable, "-m", "rlhf_dist", "slurm", "render", "--recipe", str(recipe), "--output", str(output),
           "--strategy", "ddp", "--gpus-per-node", "1", "--partition", "debug", "--time", "20", "--no-gpu-request",
           "--cpus-per-task", "1", "--main-process-port", str(_free_port_block(1)), *args]
    done = cluster.run(*cmd, cwd=REPO, timeout=120)
    return [Path(line) for line in done.stdout.split()]


def node_log(output: Path, job: str, node: int) -> str:
    (path,) = (output / "slurm" / "logs").glob(f"*-{job}-node{node}.log")
    return path.read_text()


def job_err(output: Path, job: str) -> str:
    (path,) = (output / "slurm" / "logs").glob(f"*-{job}.err")
    return path.read_text()


def test_two_node_pipeline_chain(cluster, tmp_path, tiny_model, demo_data):
    """pipeline.sh submits pretrain then sft (afterok); each job runs on 2 nodes x 1 process as one process group."""
    recipe = tiny_recipe(tmp_path, tiny_model, demo_data)
    out = tmp_path / "run"
    scripts = render(cluster, recipe, out, "--stages", "pretrain,sft", "--nodes", "2",
                     "pretrain.training.max_steps=4", "sft.training.max_steps=6")
    pipeline = scripts[-1]
    assert pipeline.name == "pipeline.sh"
    submitted = cluster.run("bash", str(pipeline), timeout=60).stdout.split()
    jobs = dict(zip(submitted[::2], submitted[1::2]))
    assert list(jobs) == ["pretrain", "sft"]
    reason = cluster.run("squeue", "-h", "-j", jobs["sft"], "-o", "%r", check=False).stdout.strip()
    assert reason in ("Dependency", "")  # sft waits for pretrain ("" only if pretrain already finished, ~40 s)
    first = cluster.wait_finished(jobs["pretrain"])
    second = cluster.wait_finished(jobs["sft"])
    assert first["JobState"] == second["JobState"] == "COMPLETED"
    assert first["NodeCnt"] == second["NodeCnt"] == "2"
    assert second["StartTime"] >= first["EndTime"]  # in order (ISO times compare as strings)

    for stage, steps in (("pretrain", 4), ("sft", 6)):
        # Each node's task computed its own rank (not the batch shell's), and both met machine 0 (n1).
        logs = [node_log(out, jobs[stage], 0), node_log(out, jobs[stage], 1)]
        for rank, text in enumerate(logs):
            assert re.search(rf"{stage} with ddp on machine {rank} of 2, 2 process\(es\) in all, rendezvous n1:\d+",
                             text), text[-2000:]
        # The main process writes the output, once; c10d numbers processes by arrival, so it may be on either node.
        assert sum(f"{stage}: done ->" in text for text in logs) == 1
        # One process group of two: the stage reports world size 2, trained and saved.
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["world_size"] == 2
        assert metrics["train"]["global_step"] == steps
        assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
        assert (out / stage / "model.safetensors").is_file()
    sft = json.loads((out / "sft" / "metrics.json").read_text())
    assert sft["init_from"] == "${output}/pretrain"  # the chain passes the model along (stored relative to the run)


def wait_started(out: Path, job: str, timeout: float = 300) -> None:
    """Until training has begun (the signal handlers are installed); the main process logs it, on either node."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any("sft: starting from" in node_log(out, job, node) for node in (0, 1)):
                return
        except ValueError:  # no log yet
            pass
        time.sleep(0.5)
    pytest.fail(f"the stage did not start within {timeout} s")


@pytest.mark.parametrize("how", ["usr1-to-batch", "term-to-steps"])
def test_preemption_checkpoints_requeues_and_resumes(how, cluster, tmp_path, tiny_model, demo_data):
    """USR1 to the batch shell (what `#SBATCH --signal=B:USR1@N` sends before the time limit), or TERM to the job's
    processes (`scancel --signal=TERM`, as a preemption or the time limit sends it): the stage saves a checkpoint at
    the step it is in, the job requeues itself, and the restart resumes and ends at max_steps."""
    max_steps = 300
    recipe = tiny_recipe(tmp_path, tiny_model, demo_data)
    out = tmp_path / "run"
    script, _ = render(cluster, recipe, out, "--stage", "sft", "--nodes", "2", f"sft.training.max_steps={max_steps}",
                       "sft.training.per_device_train_batch_size=4", "--grace-period", "8", "--kill-wait", "10")
    job = cluster.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    wait_started(out, job)
    time.sleep(2)
    signal_name = "USR1" if how.startswith("usr1") else "TERM"
    cluster.run("scancel", *(["-b"] if how == "usr1-to-batch" else []), f"--signal={signal_name}", job)

    record = cluster.wait_finished(job)
    assert record["JobState"] == "COMPLETED"
    err, log0, log1 = job_err(out, job), node_log(out, job, 0), node_log(out, job, 1)
    assert f"job {job} restart 0" in err and f"job {job} restart 1" in err and "requeueing job" in err
    stopped = [int(s) for s in re.findall(r"sft: preempted at step (\d+)", log0)]  # every process says so
    assert len(stopped) == 1 and 1 <= stopped[0] < max_steps, log0[-3000:]
    assert re.findall(r"sft: preempted at step (\d+)", log1) == [str(stopped[0])]  # both stopped at the same step
    assert f"on SIG{signal_name}" in log0 and f"on SIG{signal_name}" in log1
    if how == "usr1-to-batch":
        assert "got SIGUSR1; asking the training processes" in log0 and "got SIGUSR1; asking the training processes" in log1
    assert f"resuming from {out / 'sft.incomplete' / f'checkpoint-{stopped[0]}'}" in log0 + log1
    metrics = json.loads((out / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train"]["global_step"] == max_steps  # where an uninterrupted run ends
    steps = [r["step"] for r in json.loads((out / "sft" / "log_history.json").read_text()) if "loss" in r]
    assert steps and steps[-1] <= max_steps and max(steps) > stopped[0]
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]


def test_bad_input_submits_nothing(cluster, tmp_path, tiny_model, demo_data, monkeypatch, capsys):
    from rlhf_dist.cli import main

    for key in ("SLURM_CONF", "PATH"):  # sbatch would reach this cluster
        monkeypatch.setenv(key, cluster.env[key])
    recipe = tiny_recipe(tmp_path, tiny_model, demo_data)
    before = cluster.run("squeue", "-h", "-o", "%i").stdout
    base = ["slurm", "submit", "--output", str(tmp_path / "run"), "--stage", "ppo", "--gpus-per-node", "1",
            "--time", "10", "--no-gpu-request"]
    cases = {
        "unknown strategy": (["--recipe", str(recipe), "--strategy", "zero5", "--nodes", "2", "--partition", "debug"],
                             "unknown strategy 'zero5'"),
        "nodes do not divide the batch": (["--recipe", str(recipe), "--strategy", "ddp", "--nodes", "3", "--partition",
                                           "debug"], "--nodes 3 x --gpus-per-node 1 = 3 processes"),
        "shell metacharacters": (["--recipe", str(recipe), "--strategy", "ddp", "--nodes", "2", "--partition",
                                  "debug;rm -rf ~"], "--partition 'debug;rm -rf ~' holds characters"),
        "missing recipe": (["--recipe", str(tmp_path / "nope.yaml"), "--strategy", "ddp", "--nodes", "2", "--partition",
                            "debug"], "nope.yaml"),
    }
    for name, (args, message) in cases.items():
        assert main([*base, *args]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (name, err)
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before  # nothing submitted
    assert not (tmp_path / "run").exists()  # nothing written
