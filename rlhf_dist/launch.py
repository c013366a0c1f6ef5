"""`rlhf-dist launch`: the exact `accelerate launch` command for a stage and a strategy, built for you.

    rlhf-dist launch ppo --recipe my.yaml --output runs/x --strategy zero3 --num-processes 8
    rlhf-dist launch sft --recipe my.yaml --output runs/x --strategy ddp --num-processes 8 \\
        --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 --dry-run

It runs ``accelerate launch --config_file launch/<strategy>.yaml [--deepspeed_config_file
ds_configs/<strategy>.json] --num_processes <total> ... -m rlhf_dist STAGE --recipe R --output O ...``
with absolute paths (so it works from any directory), or prints it with ``--dry-run``. Afterwards it
checks that the stage really ran on as many processes as asked: on a machine without GPUs a wrong
flag silently starts one process (docs/cpu.md trap 1), and a silently smaller world trains a different
run. ``--num-processes`` counts processes per machine (GPUs per node); accelerate gets the total.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from rlhf_dist import preempt, registry, rundir
from rlhf_dist.errors import UserError
from rlhf_dist.recipe import apply_overrides, check_grace_period, load_recipe, run_flags

STOP_MARKER_ENV = "RLHF_DIST_STOP_MARKER"


def config_root() -> Path:
    """The folder holding launch/ and ds_configs/: $RLHF_DIST_HOME (the container sets it), else the clone
    this package runs from (pip install -e .), else the current directory."""
    candidates = [os.environ.get("RLHF_DIST_HOME"), Path(__file__).resolve().parent.parent, Path.cwd()]
    for folder in (Path(c) for c in candidates if c):
        if (folder / "launch").is_dir() and (folder / "ds_configs").is_dir():
            return folder
    raise UserError("no launch/ and ds_configs/ folders found; run from a clone of rlhf-dist (pip install -e .), "
                    "set RLHF_DIST_HOME to one, or use the container image")


def strategies() -> dict[str, Path]:
    """Strategy name -> accelerate config file (launch/<name>.yaml)."""
    return {p.stem: p for p in sorted((config_root() / "launch").glob("*.yaml"))}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose processes and machines (shared by `launch` and `pipeline`)."""
    parser.add_argument("--strategy", help="ddp, zero2, zero3, ... (a file launch/<strategy>.yaml).")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="Processes per machine (default: the GPUs here, else 1).")
    parser.add_argument("--num-machines", type=int, default=1, help="Machines (nodes) in the job.")
    parser.add_argument("--machine-rank", type=int, default=0, help="This machine's rank, 0 .. num-machines-1.")
    parser.add_argument("--main-process-ip", help="Address of machine 0 (needed with --num-machines > 1).")
    parser.add_argument("--main-process-port", type=int, default=29500, help="Rendezvous port on machine 0.")


def processes_per_machine(args: argparse.Namespace) -> int:
    if args.num_processes is not None:
        return args.num_processes
    import torch

    return max(torch.cuda.device_count(), 1)


def check_launch_arguments(args: argparse.Namespace) -> None:
    known = strategies()
    if args.strategy not in known:
        close = difflib.get_close_matches(str(args.strategy), list(known), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"--strategy: unknown strategy '{args.strategy}'; {hint}choose from {', '.join(known)}")
    if args.num_processes is not None and args.num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_machines < 1:
        raise UserError(f"--num-machines must be >= 1, got {args.num_machines}")
    if not 0 <= args.machine_rank < args.num_machines:
        raise UserError(f"--machine-rank {args.machine_rank} is not within 0 .. {args.num_machines - 1} "
                        f"(--num-machines {args.num_machines})")
    if args.num_machines > 1 and not args.main_process_ip:
        raise UserError("--num-machines > 1 needs --main-process-ip (the address of machine 0)")


def check_world_fits(raw: dict, source: str, stages: list[str], world: int, what: str) -> None:
    """The global batch sizes of a stage that runs our own loop (`hf_trainer: False` in the registry: ppo) must split
    evenly over `world` processes; checked before anything starts."""
    own_loop = [s for s in stages if not registry.get(s).hf_trainer]
    if not own_loop:
        return
    from rlhf_dist.config.resolve import resolve_stage
    from rlhf_dist.rl.batching import check_batch_sizes

    for stage in own_loop:
        cfg = resolve_stage(raw, source, stage, "OUTPUT", f"OUTPUT/{stage}.incomplete")
        try:
            check_batch_sizes(cfg.training, world)
        except ValueError as exc:
            raise UserError(f"{source}: {what} = {world} processes, but {exc}; choose a process/node count that divides "
                            "the batch sizes, or change them") from None


def check_launch_world(args: argparse.Namespace, raw: dict, source: str, stages: list[str]) -> int:
    """`check_world_fits` for the machines and processes that `args` ask for; returns that world size."""
    per_machine = processes_per_machine(args)
    world = per_machine * args.num_machines
    check_world_fits(raw, source, stages, world, f"{args.num_machines} machine(s) x {per_machine} process(es)")
    return world


def command(stage: str, args: argparse.Namespace, stage_args: list[str]) -> list[str]:
    """The accelerate command line for `stage`; `stage_args` follow `-m rlhf_dist STAGE`."""
    config = strategies()[args.strategy]
    total = processes_per_machine(args) * args.num_machines
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(total),
           "--num_machines", str(args.num_machines), "--machine_rank", str(args.machine_rank)]
    if args.num_machines > 1:
        # c10d rendezvous (launch/*.yaml say same_network: false, so accelerate passes an endpoint, not a master
        # address); machine 0 hosts the store, named outright: guessing it from host names fails on hosts with
        # several names, and when all "machines" are one host (a test cluster) every one of them would guess itself.
        cmd += ["--main_process_ip", args.main_process_ip, "--main_process_port", str(args.main_process_port),
                "--rdzv_backend", "c10d", "--rdzv_conf", f"is_host={int(args.machine_rank == 0)}"]
    deepspeed = config_root() / "ds_configs" / f"{args.strategy}.json"
    if deepspeed.is_file():  # absolute, so the launch works from any directory
        cmd += ["--deepspeed_config_file", str(deepspeed)]
        if args.num_machines > 1:  # one torchrun per machine, not DeepSpeed's pdsh runner (ssh + hostfile)
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    return [*cmd, "-m", "rlhf_dist", stage, *stage_args]


def check_world_size(output: Path, stage: str, expected: int, started: float) -> None:
    """After a launch: the stage's metrics must report the world size asked for (machine 0 only)."""
    metrics_file = rundir.stage_dir(output, stage) / "metrics.json"
    if not metrics_file.is_file() or metrics_file.stat().st_mtime < started:
        return  # skipped (already complete) or written by another machine's file system
    got = json.loads(metrics_file.read_text()).get("world_size")
    if got != expected:
        raise UserError(f"{stage} ran on {got} process(es), not the {expected} asked for; check the accelerate set-up "
                        f"(on a machine without GPUs use --strategy ddp, never --cpu) before trusting {metrics_file.parent}")


def main(argv: list[str]) -> int:
    from rlhf_dist.recipe import add_run_arguments

    parser = argparse.ArgumentParser(prog="rlhf-dist launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(registry.STAGES))
    add_run_arguments(parser)
    add_launch_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="Print the command instead of running it.")
    args = parser.parse_intermixed_args(argv)  # the stage first, overrides after the flags
    if args.strategy is None:
        parser.error("--strategy is required")
    check_launch_arguments(args)
    check_grace_period(args.grace_period)
    raw, source = load_recipe(args.recipe)  # a missing recipe fails here, not in N processes
    world = check_launch_world(args, apply_overrides(raw, args.overrides), source, [args.stage])
    stage_args = ["--recipe", args.recipe, "--output", args.output, *run_flags(args), *args.overrides]
    cmd = command(args.stage, args, stage_args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    where = f"machine {args.machine_rank} of {args.num_machines}, {world} process(es) in all"
    if args.num_machines > 1:
        where += f", rendezvous {args.main_process_ip}:{args.main_process_port}"
    print(f"rlhf-dist launch: {args.stage} with {args.strategy} on {where}", file=sys.stderr, flush=True)
    started = time.time()
    output = Path(args.output).expanduser().resolve()
    code, stop = run_and_explain(cmd, output, args.stage, "rlhf-dist launch")
    if code == 0 and not rundir.is_complete(output, args.stage):
        print(f"rlhf-dist launch: {args.stage} stopped on request ({stop or 'a signal to its processes'}) after saving a "
              "checkpoint; run the same command again to continue from it", file=sys.stderr, flush=True)
        marker = os.environ.get(STOP_MARKER_ENV)  # the sbatch script's: requeue even if srun reports another status
        if marker:
            with contextlib.suppress(OSError):
                Path(marker).write_text(f"{args.stage} {stop}\n")
        return preempt.PREEMPTED
    if code == 0 and args.machine_rank == 0:
        check_world_size(output, args.stage, world, started)
    return code


def run_and_explain(cmd: list[str], output: Path, stage: str, who: str) -> tuple[int, str | None]:
    """Run a stage (`python -m rlhf_dist STAGE ...`, or accelerate's launcher, then through `rlhf_dist.agent`),
    passing stop signals on; if it fails, end with one line naming the process, how it ended and the file to read.

    Returns (exit code, the first stop signal that came or None).
    """
    import tempfile

    from rlhf_dist import failures

    started, record = time.time(), None
    if "accelerate.commands.launch" in cmd:  # torch's agent knows every process's rank, exit code or signal, host
        fd, record = tempfile.mkstemp(prefix="rlhf-dist-agent-", suffix=".json")
        os.close(fd)
        at = cmd.index("accelerate.commands.launch")
        cmd = [*cmd[:at - 1], "-m", "rlhf_dist.agent", record, "--", *cmd[at + 1:]]
    try:
        code, stop = preempt.run_forwarding(cmd)
        processes, stopped = None, []
        if record is not None:
            with contextlib.suppress(OSError, ValueError):
                agent = json.loads(Path(record).read_text())
                processes, stopped = agent.get("failures"), agent.get("stopped", [])
    finally:
        if record is not None:
            Path(record).unlink(missing_ok=True)
    if code not in (0, 2):  # 2: bad input, which the stage has said in one line already
        print(f"{who}: error: {failures.explain(output, stage, code, started, processes, stopped)}", file=sys.stderr,
              flush=True)
    return code, stop
