"""`rlhf-dist pipeline`: run a recipe's stages in order, each in its own process, and summarise.

Each stage runs as `python -m rlhf_dist STAGE --recipe R --output OUT ...`, the very command line
that `accelerate launch` and Slurm run, so a stage behaves the same wherever it is started. A stage
whose output is complete (same config) is skipped, so re-running the same command after a crash
picks up where it stopped. When all stages are done, a table of before/after metrics is printed and
written to OUT/summary.json.

    rlhf-dist pipeline --recipe demo --output runs/demo
    rlhf-dist pipeline --recipe my.yaml --output runs/x --stages sft,dpo sft.training.num_train_epochs=2
    rlhf-dist pipeline --recipe my.yaml --output runs/x --strategy zero2 --num-processes 8   (via `rlhf-dist launch`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from rlhf_dist import preempt, registry, rundir
from rlhf_dist.config.resolve import resolve_stage, validate_recipe
from rlhf_dist.errors import UserError
from rlhf_dist.plots import plot_run
from rlhf_dist.recipe import apply_overrides, check_grace_period, load_recipe, run_flags


def parse_stages(text: str | None, recipe_stages: list[str]) -> list[str]:
    if not text:
        return recipe_stages
    stages = [s.strip() for s in text.split(",") if s.strip()]
    order = list(registry.STAGES)
    for s in stages:
        if s not in registry.STAGES:
            raise UserError(f"--stages: unknown stage '{s}'; choose from {', '.join(order)}")
    return sorted(stages, key=order.index)


def validate_stage(raw: dict, source: str, stage: str, output: Path, stages: list[str], checked: set) -> None:
    """The checks that need no earlier stage's output: the typed config, local data files and rows, the models a stage
    reads besides its starting one (its spec's `sources`: ppo's reward), unless a stage of this pipeline makes them.

    ``checked``: the (data section, data kind) pairs already read by earlier stages of this pipeline (reward and dpo
    usually read the same pairs): each is read and checked once here."""
    from rlhf_dist.data import check_local_path, load_splits

    spec = registry.get(stage)
    cfg = resolve_stage(raw, source, stage, str(output), str(rundir.work_dir(output, stage)))
    for key in ("path", "eval_path"):
        if getattr(cfg.data, key):
            check_local_path(getattr(cfg.data, key), f"{stage}.data.{key}")
    key = json.dumps([dataclasses.asdict(cfg.data), spec.data_kind], sort_keys=True, default=str)
    if cfg.data.path and key not in checked:  # every stage's rows, before the first stage starts (it checks again)
        load_splits(cfg.data, spec.data_kind, stage)
        checked.add(key)
    if spec.sources:
        registry.load(spec.sources)(cfg, output, upcoming=stages)


def stage_command(stage: str, args: argparse.Namespace) -> list[str]:
    """`python -m rlhf_dist STAGE ...`, or with --strategy the `rlhf-dist launch` command for it."""
    stage_args = ["--recipe", args.recipe, "--output", args.output, *run_flags(args), *args.overrides]
    if getattr(args, "strategy", None):
        from rlhf_dist import launch

        return launch.command(stage, args, stage_args)
    return [sys.executable, "-m", "rlhf_dist", stage, *stage_args]


def run_pipeline(args: argparse.Namespace) -> int:
    """Validate everything cheap first, then run the stages; returns an exit code."""
    from rlhf_dist.stages.common import load_stage_config, quiet_device_probe

    quiet_device_probe()
    check_grace_period(getattr(args, "grace_period", preempt.GRACE_SECONDS))
    raw, source = load_recipe(args.recipe)
    raw = apply_overrides(raw, args.overrides)
    stages = parse_stages(args.stages, validate_recipe(raw, source))
    if not stages:
        raise UserError(f"{source}: no stages to run; list them under `stages:` or pass --stages")
    output = Path(args.output).expanduser().resolve()
    rundir.check_output_root(output)
    if getattr(args, "strategy", None):
        from rlhf_dist.launch import check_launch_arguments, check_launch_world

        check_launch_arguments(args)
        world = check_launch_world(args, raw, source, stages)
    checked: set = set()
    for stage in stages:  # a typo in the last stage's section fails now, not after hours of the first ones
        validate_stage(raw, source, stage, output, stages, checked)

    for i, stage in enumerate(stages, 1):
        banner = f"[{i}/{len(stages)}] {stage}"
        # The same decision the stage process would make; skipping here saves a process start.
        cfg, resolved = load_stage_config(stage, args)
        action = rundir.stage_action(output, stage, resolved, args.overwrite, args.resume)
        if action.action == "skip":
            print(f"{banner}: complete, skipping ({rundir.stage_dir(output, stage)})", flush=True)
            continue
        print(f"\n{'=' * 20} {banner}: starting from {cfg.init_from} {'=' * 20}", flush=True)
        started = time.time()
        from rlhf_dist.launch import run_and_explain

        code, stop = run_and_explain(stage_command(stage, args), output, stage, "rlhf-dist pipeline")
        if stop or (code == 0 and not rundir.is_complete(output, stage)):  # the job is about to end: start no further stage
            where = "complete" if rundir.is_complete(output, stage) else "checkpointed" if code == 0 else f"exit {code}"
            print(f"{banner}: {where}, stopping on request ({stop or 'a signal to its processes'}); run the same command "
                  "again to continue", file=sys.stderr, flush=True)
            return preempt.PREEMPTED if code == 0 else code
        if code == 0 and getattr(args, "strategy", None) and args.machine_rank == 0:
            from rlhf_dist.launch import check_world_size

            check_world_size(output, stage, world, started)
        if code != 0:
            print(f"error: stage {stage} failed (exit {code}); fix the cause and re-run the same command to "
                  f"continue from {stage}", file=sys.stderr)
            return code
        print(f"{banner}: done in {time.time() - started:.0f}s", flush=True)

    summary = summarize(output, stages)
    print("\n" + format_summary(summary))
    for stage in stages:  # a stage's own table of results (table.txt in its output), after the summary
        table = rundir.stage_dir(output, stage) / "table.txt"
        if table.is_file():
            print("\n" + table.read_text().rstrip())
    rundir.write_json(output / "summary.json", summary)
    histories = {s: json.loads((rundir.stage_dir(output, s) / "log_history.json").read_text()) for s in stages}
    histories = {s: h for s, h in histories.items() if h} or histories  # stages that train nothing log nothing
    tmp = output / ".summary.tmp.png"
    plot_run(histories, tmp)
    tmp.replace(output / "summary.png")
    print(f"\nwrote {output / 'summary.json'} and {output / 'summary.png'} (training curves)")
    return 0


def summarize(output: Path, stages: list[str]) -> dict:
    """One entry per stage: its before/after metrics, training figures and output path."""
    out = {}
    for stage in stages:
        metrics = json.loads((rundir.stage_dir(output, stage) / "metrics.json").read_text())
        out[stage] = {
            "before": metrics.get("before", {}),
            "after": metrics.get("after", {}),
            "train": metrics.get("train", {}),
            "wall_seconds": metrics.get("wall_seconds"),
            "output": str(rundir.stage_dir(output, stage)),
        }
    return out


def format_summary(summary: dict) -> str:
    lines = [f"{'stage':<10}{'metric (held-out)':<20}{'before':>12}{'after':>12}", "-" * 54]
    for stage, entry in summary.items():
        spec = registry.STAGES.get(stage)
        for key in spec.headline if spec is not None and spec.headline else list(entry["after"]):
            if key in entry["after"]:
                b, a = entry["before"].get(key, math.nan), entry["after"][key]
                lines.append(f"{stage:<10}{key:<20}{b:>12.4f}{a:>12.4f}")
    return "\n".join(lines)
