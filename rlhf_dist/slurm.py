"""`rlhf-dist slurm render|submit`: sbatch scripts for a stage (or a chain of stages), filled from validated flags.

    rlhf-dist slurm render --recipe my.yaml --output /scratch/runs/x --stage sft --strategy zero3 \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 1-00:00:00 [--account A] [--container IMAGE]
    rlhf-dist slurm submit --recipe my.yaml --output /scratch/runs/x --stages sft,reward,ppo ...

`render` writes OUT_DIR/<stage>.sbatch (one job: N nodes, one `srun` task per node running
`rlhf-dist launch STAGE ... --machine-rank $SLURM_NODEID`, the rank expanded inside each task) and
OUT_DIR/pipeline.sh (submits the stages in order, each with --dependency=afterok on the one before),
and prints their paths. OUT_DIR defaults to OUTPUT/slurm; job logs go to OUT_DIR/logs.
`submit` renders, then submits the chain with `sbatch --parsable` and prints `STAGE JOBID` lines.
Every value is checked before anything is written, and shell-quoted in the scripts.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from pathlib import Path

from rlhf_dist import registry, rundir
from rlhf_dist.config.resolve import validate_recipe
from rlhf_dist.errors import UserError
from rlhf_dist.recipe import apply_overrides, check_grace_period, load_recipe, run_flags

TEMPLATE_DIR_NAME = "slurm"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

# What may appear in #SBATCH lines (sbatch parses those itself, not the shell) and job names.
SAFE = {
    "--partition": (re.compile(r"[A-Za-z0-9_.,-]+"), "letters, digits, '_', '.', '-' (',' between partitions)"),
    "--account": (re.compile(r"[A-Za-z0-9_.-]+"), "letters, digits, '_', '.', '-'"),
    "--job-name-prefix": (re.compile(r"[A-Za-z0-9_.-]*"), "letters, digits, '_', '.', '-'"),
    "--container": (re.compile(r"[A-Za-z0-9_./:@+#-]+"), "an image such as nvcr.io#nvidia/pytorch:24.05-py3 or a .sqsh path"),
    "--out-dir": (re.compile(r"[A-Za-z0-9_./+=,@-]+"), "a path of letters, digits and '_./+=,@-' (no spaces, no '%')"),
}
# Slurm's --time forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2}")


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); `text` matches TIME."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:  # MM
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def template_dir() -> Path:
    from rlhf_dist.launch import config_root

    return config_root() / TEMPLATE_DIR_NAME


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every {{name}}; a placeholder without a value is a bug in the renderer, not user input."""
    missing = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise KeyError(f"template placeholders without a value: {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def check_safe(flag: str, value: str | None) -> None:
    if value is None:
        return
    pattern, allowed = SAFE[flag]
    if not pattern.fullmatch(value):
        raise UserError(f"{flag} {value!r} holds characters that are not allowed; use {allowed}")


def build_parser() -> argparse.ArgumentParser:
    from rlhf_dist.recipe import add_run_arguments

    parser = argparse.ArgumentParser(prog="rlhf-dist slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["render", "submit"])
    add_run_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stage", help="One stage: " + ", ".join(registry.STAGES) + ".")
    which.add_argument("--stages", help="Comma-separated stages, submitted as a chain (default: the recipe's `stages`).")
    parser.add_argument("--strategy", required=True, help="ddp, zero2, zero3, ... (a file launch/<strategy>.yaml).")
    parser.add_argument("--nodes", type=int, required=True, help="Nodes per job (one srun task per node).")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (processes) per node.")
    parser.add_argument("--partition", required=True, help="Slurm partition.")
    parser.add_argument("--time", required=True, help="Time limit per job: MM, HH:MM:SS or D-HH:MM:SS.")
    parser.add_argument("--account", help="Slurm account to charge.")
    parser.add_argument("--container", help="Container image for pyxis (srun --container-image).")
    parser.add_argument("--no-gpu-request", action="store_true",
                        help="Leave out #SBATCH --gpus-per-node (CPU processes; clusters without GPU GRES, tests).")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPUs for the task on each node (default 8).")
    parser.add_argument("--preempt-signal-seconds", type=int, default=120,
                        help="Send USR1 this many seconds before the time limit, to requeue (default 120).")
    parser.add_argument("--kill-wait", type=int, default=30,
                        help="The cluster's KillWait (`scontrol show config | grep KillWait`): seconds between the TERM "
                             "that ends a job and SIGKILL (default 30, Slurm's). --grace-period must be shorter.")
    parser.add_argument("--main-process-port", type=int, default=None,
                        help="Rendezvous port on the head node (default: 20000 + job id mod 40000, so jobs sharing a "
                             "node do not collide).")
    parser.add_argument("--job-name-prefix", default="rlhf-", help="Job names are PREFIX + stage (default rlhf-).")
    parser.add_argument("--out-dir", help="Where the scripts go (default OUTPUT/slurm); logs go to OUT_DIR/logs.")
    return parser


def check(args: argparse.Namespace) -> tuple[list[str], Path]:
    """Validate everything; return the stages and the absolute output folder for the scripts."""
    from rlhf_dist.launch import check_launch_arguments, check_world_fits
    from rlhf_dist.pipeline import parse_stages

    if args.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if args.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be >= 1, got {args.cpus_per_task}")
    if not 1 <= args.preempt_signal_seconds <= 65535:
        raise UserError(f"--preempt-signal-seconds must be within 1 .. 65535, got {args.preempt_signal_seconds}")
    check_grace_period(args.grace_period)
    if args.kill_wait < 1:
        raise UserError(f"--kill-wait must be >= 1 (seconds), got {args.kill_wait}")
    if args.grace_period >= args.kill_wait:
        raise UserError(f"--grace-period {args.grace_period:g} is not shorter than the cluster's KillWait of "
                        f"{args.kill_wait} s (--kill-wait): Slurm would kill the stage while it saves; lower "
                        "--grace-period, or pass your cluster's KillWait with --kill-wait")
    if args.main_process_port is not None and not 1 <= args.main_process_port <= 65535:
        raise UserError(f"--main-process-port must be within 1 .. 65535, got {args.main_process_port}")
    ns = argparse.Namespace(strategy=args.strategy, num_processes=args.gpus_per_node, num_machines=args.nodes,
                            machine_rank=0, main_process_ip="head-node")
    check_launch_arguments(ns)  # the same checks `rlhf-dist launch` makes on every node, done before submitting
    for flag in ("--partition", "--account", "--container", "--job-name-prefix"):
        check_safe(flag, getattr(args, flag[2:].replace("-", "_")))
    if not TIME.fullmatch(args.time):
        raise UserError(f"--time {args.time!r} is not a Slurm time limit; write MM, HH:MM:SS or D-HH:MM:SS (e.g. 1-00:00:00)")
    if args.preempt_signal_seconds >= time_limit_seconds(args.time):
        raise UserError(f"--preempt-signal-seconds {args.preempt_signal_seconds} is not shorter than --time {args.time}: "
                        "the warning would come at once and every restart would stop after one step; lower it")
    raw, source = load_recipe(args.recipe)
    raw = apply_overrides(raw, args.overrides)  # a malformed KEY=VALUE fails now, not on the cluster
    recipe_stages = validate_recipe(raw, source)
    if args.stage is not None and args.stage not in registry.STAGES:
        raise UserError(f"--stage: unknown stage '{args.stage}'; choose from {', '.join(registry.STAGES)}")
    stages = [args.stage] if args.stage else parse_stages(args.stages, recipe_stages)
    if not stages:
        raise UserError("no stages to run: pass --stage STAGE or --stages a,b,c (the recipe lists none)")
    check_world_fits(raw, source, stages, args.nodes * args.gpus_per_node,
                     f"--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node}")
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else Path(args.output).expanduser() / "slurm"
    out_dir = Path(os.path.abspath(out_dir))
    check_safe("--out-dir", str(out_dir))
    rundir.check_output_root(Path(args.output).expanduser().resolve())  # never write into a stranger's folder
    return stages, out_dir


def _recipe_arg(recipe: str) -> str:
    """A recipe file as an absolute path (jobs may start elsewhere); a shipped recipe by name."""
    path = Path(recipe).expanduser()
    return os.path.abspath(path) if path.is_file() else recipe


def render_stage(args: argparse.Namespace, stage: str, out_dir: Path) -> str:
    output = os.path.abspath(Path(args.output).expanduser())
    recipe = _recipe_arg(args.recipe)
    job_name = args.job_name_prefix + stage
    flags = run_flags(argparse.Namespace(overwrite=False, resume=False, fallback=args.fallback, gpu_memory=args.gpu_memory,
                                         grace_period=args.grace_period))
    groups = [[stage], ["--recipe", recipe], ["--output", output], ["--strategy", args.strategy],
              ["--num-processes", str(args.gpus_per_node)], ["--num-machines", str(args.nodes)],
              *([flags] if flags else []), *([o] for o in args.overrides)]
    container = ""
    if args.container:
        mounts = sorted({output, *([os.path.dirname(recipe)] if os.path.isabs(recipe) else []), str(out_dir)})
        bad = [m for m in mounts if "," in m or ":" in m]
        if bad:
            raise UserError(f"--container: cannot mount {bad[0]} (pyxis mounts cannot hold ',' or ':'); choose another --output")
        container = (f"--container-image={shlex.quote(args.container)} "
                     f"--container-mounts={shlex.quote(','.join(f'{m}:{m}' for m in mounts))} ")
    log_dir = str(out_dir / "logs")
    values = {
        "stage": stage,
        "job_name": job_name,
        "nodes": str(args.nodes),
        "gpus_per_node": str(args.gpus_per_node),
        "cpus_per_task": str(args.cpus_per_task),
        "partition": args.partition,
        "time": args.time,
        "gpus_line": "" if args.no_gpu_request else f"#SBATCH --gpus-per-node={args.gpus_per_node}\n",
        "account_line": f"#SBATCH --account={args.account}\n" if args.account else "",
        "log_dir": log_dir,
        "log_dir_q": shlex.quote(log_dir),
        "preempt_seconds": str(args.preempt_signal_seconds),
        "grace_seconds": f"{args.grace_period:g}",
        "launch_args": "\n    ".join(shlex.join(g) for g in groups),
        "container_args": container,
        "port": str(args.main_process_port) if args.main_process_port else "$((20000 + SLURM_JOB_ID % 40000))",
    }
    return fill((template_dir() / "stage.sbatch.tmpl").read_text(), values)


def render_pipeline(stages: list[str], scripts: dict[str, Path]) -> str:
    lines = []
    for i, stage in enumerate(stages):
        dep = f'--dependency=afterok:"$job_{i - 1}" --kill-on-invalid-dep=yes ' if i else ""
        lines.append(f"job_{i}=$(submit {dep}{shlex.quote(str(scripts[stage]))})")
        lines.append(f'echo "{stage} $job_{i}"')
    return fill((template_dir() / "pipeline.sh.tmpl").read_text(), {"stages": ", ".join(stages),
                                                                      "submit_lines": "\n".join(lines)})


def render(args: argparse.Namespace) -> tuple[list[str], dict[str, Path], Path]:
    """Validate, then write the scripts. Returns the stages, stage -> script, and pipeline.sh."""
    stages, out_dir = check(args)
    texts = {stage: render_stage(args, stage, out_dir) for stage in stages}  # all rendered before any is written
    scripts = {stage: out_dir / f"{stage}.sbatch" for stage in stages}
    pipeline_text = render_pipeline(stages, scripts)
    output = Path(args.output).expanduser().resolve()
    if out_dir.is_relative_to(output):  # scripts inside the run directory: mark it as ours, or no stage would use it
        output.mkdir(parents=True, exist_ok=True)
        if not (output / rundir.MARKER).exists():
            rundir.write_json(output / rundir.MARKER, {"created_by": "rlhf-dist", "format": 1})
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    for stage in stages:
        rundir.write_text(scripts[stage], texts[stage])
        scripts[stage].chmod(0o755)
    pipeline = out_dir / "pipeline.sh"
    rundir.write_text(pipeline, pipeline_text)
    pipeline.chmod(0o755)
    return stages, scripts, pipeline


def submit(stages: list[str], scripts: dict[str, Path]) -> list[tuple[str, str]]:
    """sbatch --parsable each script, each after the previous one succeeded; returns (stage, job id)."""
    jobs: list[tuple[str, str]] = []
    for stage in stages:
        cmd = ["sbatch", "--parsable"]
        if jobs:
            cmd += [f"--dependency=afterok:{jobs[-1][1]}", "--kill-on-invalid-dep=yes"]
        try:
            done = subprocess.run([*cmd, str(scripts[stage])], capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError("sbatch not found; run `rlhf-dist slurm submit` on a Slurm login node "
                            "(or `render` here and submit the scripts there)") from None
        job_id = done.stdout.strip().split(";")[0]
        if done.returncode != 0 or not job_id.isdigit():
            submitted = ", ".join(f"{s} {j}" for s, j in jobs) or "none"
            raise UserError(f"sbatch failed for {stage} ({done.stderr.strip() or done.stdout.strip()}); "
                            f"submitted before it: {submitted}")
        jobs.append((stage, job_id))
        print(f"{stage} {job_id}", flush=True)
    return jobs


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    stages, scripts, pipeline = render(args)
    if args.action == "render":
        for stage in stages:
            print(scripts[stage])
        print(pipeline)
        return 0
    submit(stages, scripts)
    return 0
