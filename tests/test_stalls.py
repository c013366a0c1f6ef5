"""A stalled or dead process ends the job with a diagnosis instead of hanging it: the watchdog of the process that
waits (or of the one stuck) writes every thread's stack with its rank, phase and step into the run directory and
exits; the launcher ends the other processes and says, in one line, which process, where, how, and which files
to read. Also: the process group's timeout (training.ddp_timeout) is set where the group is created.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO, tiny_recipe

from rlhf_dist import failures, watchdog

WATCHED = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from rlhf_dist import watchdog
    dog = watchdog.Watchdog({"score": 0.5, "update": None}, Path(sys.argv[1]), rank=3, stage="ppo", poll=0.05).start()
    with watchdog.phase("update", 7):   # not watched (None)
        time.sleep(0.8)
        with watchdog.phase("score", 7):
            threading.Event().wait()    # a reward function that never returns
""")


def test_watchdog_writes_every_stack_and_exits_when_a_phase_overruns(tmp_path):
    script = tmp_path / "watched.py"
    script.write_text(WATCHED)
    started = time.time()
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == watchdog.STALLED, done.stderr
    assert time.time() - started < 15
    (stack,) = tmp_path.glob("stall-*.txt")
    assert stack.name == "stall-rank3-score-step7.txt"
    text = stack.read_text()
    assert re.match(r"rlhf-dist watchdog: ppo rank 3 on \S+ \(pid \d+\): phase 'score' at step 7 has run \d+ s, over its "
                    r"limit of 0.5 s \(watchdog.score\)", text), text[:300]
    main = text.split("--- MainThread (main thread) ---")[1]
    assert "threading.Event().wait()" in main and "in wait" in main  # the blocking frame, innermost last
    assert "phase 'score' at step 7" in done.stderr and str(stack) in done.stderr


def test_explain_names_the_first_failure_and_its_files(tmp_path):
    folder = failures.log_dir(tmp_path, "sft")
    folder.mkdir(parents=True)
    (folder / "rank1.log").write_text("Traceback ...\n")
    since = time.time() - 10
    note = {"stage": "sft", "rank": 0, "node": 0, "host": "h0", "pid": 11, "status": 1, "time": time.time(),
            "reason": "RuntimeError: Connection reset by peer", "stderr": str(folder / "rank0.log")}
    (folder / "rank0.exit.json").write_text(json.dumps(note))
    (folder / "rank1.exit.json").write_text(json.dumps({**note, "rank": 1, "pid": 12, "status": None, "reason": "running",
                                                        "stderr": str(folder / "rank1.log")}))
    # the agent saw the killed rank a second after its peer's collective failed (its poll interval): it is still the cause
    agent = [{"rank": 0, "exitcode": 1, "pid": 11, "host": "h0", "time": int(time.time())},
             {"rank": 1, "exitcode": -9, "pid": 12, "host": "h0", "time": int(time.time()) + 1}]
    line = failures.explain(tmp_path, "sft", 1, since, agent)
    # the killed rank is the cause (its peer's connection error came after), with its stderr file
    assert line.startswith("sft failed: rank 1 on node 0 (h0, pid 12): killed by SIGKILL; it wrote no reason"), line
    assert f"its stderr: {folder / 'rank1.log'}" in line and "1 more process(es) failed after it" in line
    # a single process (pipeline): its exit code, its own reason
    (folder / "rank1.exit.json").unlink()
    assert failures.explain(tmp_path, "sft", 1, since).startswith(
        "sft failed: rank 0 on node 0 (h0, pid 11): exit 1; RuntimeError: Connection reset by peer")


def launch(out, stage, recipe, *extra, env=None, timeout=300):
    cmd = [sys.executable, "-m", "rlhf_dist", "launch", stage, "--recipe", str(recipe), "--output", str(out),
           "--strategy", "ddp", "--num-processes", "2", *extra]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**{k: v for k, v in os.environ.items() if k != "RLHF_DIST_FAULT"}, **(env or {})})
    return done, time.time() - started


@pytest.mark.slow
def test_dead_rank_ends_the_job_with_one_line(tmp_path, tiny_model, demo_data):
    recipe, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    done, _ = launch(out, "sft", recipe, "sft.training.max_steps=8", "sft.training.per_device_train_batch_size=8",
                     env={"RLHF_DIST_FAULT": "step@3:kill@rank1"})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"rlhf-dist launch: error: sft failed: rank 1 on node 0 \(\S+, pid \d+\): killed by SIGKILL; ", last), last
    assert f"its stderr: {out / 'logs' / 'sft' / 'rank1.log'}" in last
    for rank in (0, 1):  # every rank's stderr is kept, the dead one's up to its last line
        assert (out / "logs" / "sft" / f"rank{rank}.log").is_file()
    assert "rlhf-dist fault injection: kill" in (out / "logs" / "sft" / "rank1.log").read_text()
    # its peer failed in a collective; gloo words it "Connection reset by peer" or "Connection closed by peer"
    reason = json.loads((out / "logs" / "sft" / "rank0.exit.json").read_text())["reason"]
    assert reason.startswith("RuntimeError: ") and re.search(r"Connection (reset|closed) by peer", reason), reason


@pytest.mark.slow
def test_stopped_worker_ends_the_job_within_its_limit(tmp_path, tiny_model, demo_data):
    """SIGSTOP on rank 1 inside step 3 (a process that does nothing, as a blocked filesystem looks): rank 0 waits in a
    collective, its watchdog fires after 10 s, the launcher kills the stopped rank at once."""
    recipe, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    limit = 10
    done, took = launch(out, "sft", recipe, "sft.training.max_steps=8", "sft.training.per_device_train_batch_size=8",
                        f"sft.watchdog.train_step={limit}", env={"RLHF_DIST_FAULT": "step@3:stop@rank1"})
    assert done.returncode != 0
    stopped_at = float(re.search(r"fault injection: stop \(pid \d+, time ([\d.]+)\)",
                                 (out / "logs" / "sft" / "rank1.log").read_text()).group(1))
    ended = time.time()
    assert stopped_at + limit < ended < stopped_at + limit + 15  # the job ended within the limit plus a small margin
    (stack,) = (out / "logs" / "sft").glob("stall-rank0-*.txt")
    text = stack.read_text()
    assert text.startswith("rlhf-dist watchdog: sft rank 0 on ") and "phase 'train_step' at step 3" in text
    assert "in all_reduce" in text.split("--- MainThread (main thread) ---")[1]  # the collective it waits in
    last = done.stderr.strip().splitlines()[-1]
    assert "sft failed: rank 0 on node 0" in last and "exit 124; watchdog: phase 'train_step' at step 3" in last
    assert f"every thread's stack: {stack}" in last and "rank(s) 1 had been stopped (SIGSTOP" in last


@pytest.mark.slow
def test_reward_function_blocking_on_one_rank_names_rank_phase_and_frame(tmp_path, tiny_model, demo_data):
    recipe, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    done, took = launch(out, "ppo", recipe, "ppo.reward_fn=stall_rewards:block_on_rank1", "ppo.training.max_steps=2",
                        "ppo.watchdog.score=8", "ppo.watchdog.gather=60", env={"PYTHONPATH": str(REPO / "tests")})
    assert done.returncode != 0
    (stack,) = (out / "logs" / "ppo").glob("stall-*.txt")
    assert stack.name.startswith("stall-rank1-score")
    main = stack.read_text().split("--- MainThread (main thread) ---")[1]
    assert "stall_rewards.py" in main and "in block_on_rank1" in main  # the user's frame that blocks
    last = done.stderr.strip().splitlines()[-1]
    assert "ppo failed: rank 1 on node 0" in last and "watchdog: phase 'score'" in last and str(stack) in last
    fired = time.mktime(time.strptime(re.search(r"^time: (.+)$", stack.read_text(), re.M).group(1), "%Y-%m-%d %H:%M:%S"))
    assert time.time() - fired < 15  # the job ended soon after the watchdog fired


@pytest.mark.slow
def test_pipeline_names_the_failed_stage_process_and_its_traceback(tmp_path, tiny_model, demo_data):
    recipe, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rlhf_dist", "pipeline", "--recipe", str(recipe), "--output", str(out),
                           "--stages", "ppo", "ppo.reward_fn=stall_rewards:fail", "ppo.training.max_steps=2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert done.returncode == 1
    line = next(x for x in done.stderr.splitlines() if x.startswith("rlhf-dist pipeline: error:"))
    stderr = out / "logs" / "ppo" / "rank0.log"
    assert re.fullmatch(r"rlhf-dist pipeline: error: ppo failed: rank 0 on node 0 \(\S+, pid \d+\): exit 1; ValueError: the "
                        rf"reward server answered 503; its stderr: {re.escape(str(stderr))}", line), line
    assert "Traceback (most recent call last)" in stderr.read_text() and "stall_rewards.py" in stderr.read_text()


def test_process_group_timeout_is_set_where_the_group_is_created(tmp_path, tiny_model, tiny_reward_model, demo_data,
                                                                 monkeypatch):
    """training.ddp_timeout (every stage; ppo too) reaches the process group accelerate creates, and a bad value is
    an error before anything is written."""
    from rlhf_dist.cli import main
    from rlhf_dist.stages import common

    asked = []
    real = common.process_state
    monkeypatch.setattr(common, "process_state", lambda timeout=None: asked.append(timeout) or real(timeout))
    rec = tiny_recipe(tmp_path, tiny_model, demo_data)
    for stage, extra in (("sft", []), ("ppo", [f"ppo.reward_model={tiny_reward_model}", "ppo.training.save_steps=0"])):
        assert main([stage, "--recipe", str(rec), "--output", str(tmp_path / "t"), f"{stage}.training.max_steps=1",
                     f"{stage}.training.ddp_timeout=123", *extra]) == 0
        assert asked[0] == 123, (stage, asked)
        asked.clear()

    script = textwrap.dedent("""
        import sys, torch
        import torch.distributed as dist
        from rlhf_dist.stages.common import process_state
        process_state(int(sys.argv[1]))
        print(dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    """)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29000 + os.getpid() % 500), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", script, "77"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == 77.0, done.stdout
    assert main(["sft", "--recipe", str(rec), "--output", str(tmp_path / "run"), "sft.training.ddp_timeout=0"]) == 2
    assert not (tmp_path / "run").exists()
