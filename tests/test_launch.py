"""`rlhf-dist launch`: the command it builds for each strategy, bad input, and real 2-process launches on CPU."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli, tiny_recipe

from rlhf_dist.cli import main


def dry_run(capsys, *args: str) -> list[str]:
    assert main(["launch", *args, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out.strip())


@pytest.mark.parametrize("strategy, deepspeed", [("ddp", None), ("zero2", "zero2.json"), ("zero3", "zero3.json"),
                                                 ("zero3_offload", "zero3_offload.json")])
def test_dry_run_builds_the_accelerate_command(strategy, deepspeed, tmp_path, capsys):
    cmd = dry_run(capsys, "ppo", "--recipe", "demo", "--output", str(tmp_path / "run"), "--strategy", strategy,
                  "--num-processes", "2", "ppo.training.kl_coef=0.1", "model.name_or_path=my model")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    flags = dict(zip(cmd[3:cmd.index("-m", 3):2], cmd[4:cmd.index("-m", 3):2]))
    assert flags["--config_file"] == str(REPO / "launch" / f"{strategy}.yaml")
    assert flags["--num_processes"] == "2" and flags["--num_machines"] == "1" and flags["--machine_rank"] == "0"
    if deepspeed:  # absolute: the YAML's relative path would only work from the repository root
        assert flags["--deepspeed_config_file"] == str(REPO / "ds_configs" / deepspeed)
    else:
        assert "--deepspeed_config_file" not in flags
    assert cmd[cmd.index("-m", 3):] == ["-m", "rlhf_dist", "ppo", "--recipe", "demo", "--output", str(tmp_path / "run"),
                                        "ppo.training.kl_coef=0.1", "model.name_or_path=my model"]
    assert not (tmp_path / "run").exists()  # nothing ran


def test_launch_sh_runs_rlhf_dist_launch(tmp_path, capsys):
    """launch/launch.sh (the script whose header shows the usage) gives exactly `rlhf-dist launch`'s command."""
    script = REPO / "launch" / "launch.sh"
    lint = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    out = str(tmp_path / "my run")
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "NUM_MACHINES": "2", "MACHINE_RANK": "1",
           "MAIN_PROCESS_IP": "10.0.0.1"}
    done = subprocess.run(["bash", str(script), "sft", "zero3", "8", "--", "--recipe", "demo", "--output", out,
                           "sft.training.learning_rate=1e-5"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = dry_run(capsys, "sft", "--recipe", "demo", "--output", out, "--strategy", "zero3", "--num-processes", "8",
                       "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1",
                       "sft.training.learning_rate=1e-5")
    assert shlex.split(done.stdout.strip()) == expected
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "launch/launch.sh STAGE STRATEGY [NUM_PROCESSES]" in usage.stderr


def test_multi_node_dry_run_counts_all_processes(tmp_path, capsys):
    cmd = dry_run(capsys, "sft", "--recipe", "demo", "--output", str(tmp_path), "--strategy", "zero2",
                  "--num-processes", "8", "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1")
    text = " ".join(cmd)
    assert "--num_processes 16 --num_machines 2 --machine_rank 1" in text  # accelerate takes the total
    assert "--main_process_ip 10.0.0.1 --main_process_port 29500" in text
    assert "--deepspeed_multinode_launcher standard" in text  # not DeepSpeed's ssh/pdsh runner
    assert "--rdzv_backend c10d --rdzv_conf is_host=0" in text  # machine 0 hosts the rendezvous store, said outright
    cmd = dry_run(capsys, "sft", "--recipe", "demo", "--output", str(tmp_path), "--strategy", "ddp",
                  "--num-processes", "1", "--num-machines", "2", "--main-process-ip", "n1")
    assert "--rdzv_backend c10d --rdzv_conf is_host=1" in " ".join(cmd)


@pytest.mark.parametrize("args, expected", [
    (["--strategy", "zro3"], "--strategy: unknown strategy 'zro3'; did you mean 'zero3'?"),
    (["--strategy", "ddp", "--num-machines", "2"], "--num-machines > 1 needs --main-process-ip"),
    (["--strategy", "ddp", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h"],
     "--machine-rank 2 is not within 0 .. 1"),
    (["--strategy", "ddp", "--num-processes", "0"], "--num-processes must be >= 1"),
    (["--strategy", "ddp", "--recipe", "no_such_recipe"], "recipe 'no_such_recipe' is neither a file nor a shipped recipe"),
    (["--strategy", "ddp", "--num-processes", "3", "--stage", "ppo"],
     "1 machine(s) x 3 process(es) = 3 processes, but ppo.training: rollout_batch_size=32 is not a multiple of the 3"),
])
def test_bad_launch_input_is_one_line_and_launches_nothing(args, expected, tmp_path, capsys):
    recipe = [] if "--recipe" in args else ["--recipe", "demo"]
    stage = "sft"
    if "--stage" in args:
        i = args.index("--stage")
        stage, args = args[i + 1], args[:i] + args[i + 2:]
    assert main(["launch", stage, *recipe, "--output", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_ddp_launch_on_cpu_really_starts_two_processes(stage, tmp_path, tiny_model, tiny_reward_model, demo_data):
    """No --cpu, no use_cpu override: `--strategy ddp` alone gives a world of 2 on a machine without GPUs."""
    rec, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    extra = {"sft": ["sft.training.max_steps=4", "sft.training.per_device_train_batch_size=8"],
             "ppo": [f"ppo.reward_model={tiny_reward_model}", "ppo.training.max_steps=1", "ppo.training.save_steps=0"]}
    result = cli("launch", stage, "--recipe", str(rec), "--output", str(out), "--strategy", "ddp", "--num-processes", "2",
                 *extra[stage], cwd=tmp_path)  # from any directory
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / stage / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(["logs", "rlhf_dist_run.json", stage])
    for rank in (0, 1):  # each process's stderr and how it ended, in the run directory
        assert (out / "logs" / stage / f"rank{rank}.log").read_text().startswith(f"==== rlhf-dist {stage}: rank {rank} on ")
        assert json.loads((out / "logs" / stage / f"rank{rank}.exit.json").read_text())["status"] == 0


def test_pipeline_with_a_strategy_refuses_a_world_the_batches_do_not_split_over(tmp_path, capsys):
    """The same check as `launch`, for every stage of the pipeline, before any stage starts."""
    assert main(["pipeline", "--recipe", "demo", "--output", str(tmp_path / "run"), "--strategy", "ddp",
                 "--num-processes", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "1 machine(s) x 3 process(es) = 3 processes, but ppo.training: rollout_batch_size=32" in err, err
    assert not (tmp_path / "run").exists()


def test_fallback_flags_reach_the_stage(tmp_path, capsys):
    """--fallback / --gpu-memory are stage flags: the launcher passes them on (the default, auto, is left implicit)."""
    cmd = dry_run(capsys, "sft", "--recipe", "demo", "--output", str(tmp_path / "run"), "--strategy", "single",
                  "--fallback", "off", "--gpu-memory", "24")
    tail = cmd[cmd.index("sft"):]
    assert tail[tail.index("--fallback") + 1] == "off" and tail[tail.index("--gpu-memory") + 1] == "24"
    assert "--fallback" not in dry_run(capsys, "sft", "--recipe", "demo", "--output", str(tmp_path / "run"),
                                       "--strategy", "single")
