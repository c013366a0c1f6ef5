"""The `rlhf-dist` command.

    rlhf-dist demo --output runs/demo                       tiny end-to-end pipeline on CPU, offline
    rlhf-dist pipeline --recipe NAME_OR_YAML --output DIR   run a recipe's stages in order
    rlhf-dist STAGE --recipe NAME_OR_YAML --output DIR      one stage: {stages}
    rlhf-dist launch STAGE --strategy ddp|zero2|zero3 ...   one stage on several processes/machines (accelerate)
    rlhf-dist slurm render|submit --stage S --nodes N ...   sbatch scripts for a stage or a chain of stages
    rlhf-dist plan --model M --stage S --gpu-memory GB ...  memory per GPU of each strategy, what fits, the command
    rlhf-dist recipes                                       list the recipes shipped with the package
    rlhf-dist fields STAGE                                  every config field of a stage, with help

Errors in the input (config, data, paths, run directory) print one line and exit with status 2
before any model is loaded. Other exit statuses of a stage: 75 stopped on a signal with its checkpoint saved
(run the same command again), 124 a phase ran past its watchdog limit, 3 a guardrail stopped the run,
128 + N ended by signal N without saving (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import sys

from rlhf_dist import registry
from rlhf_dist.errors import UserError


def _run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from rlhf_dist.recipe import add_run_arguments

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    return parser


def cmd_pipeline(argv: list[str]) -> int:
    from rlhf_dist import pipeline
    from rlhf_dist.launch import add_launch_arguments

    parser = _run_parser("rlhf-dist pipeline", pipeline.__doc__)
    parser.add_argument("--stages", help="Comma-separated stages to run (default: the recipe's `stages`).")
    add_launch_arguments(parser)  # with --strategy, each stage runs through `rlhf-dist launch`
    return pipeline.run_pipeline(parser.parse_args(argv))


def cmd_launch(argv: list[str]) -> int:
    from rlhf_dist import launch

    return launch.main(argv)


def cmd_slurm(argv: list[str]) -> int:
    from rlhf_dist import slurm

    return slurm.main(argv)


def cmd_plan(argv: list[str]) -> int:
    from rlhf_dist.plan.cli import main

    return main(argv)


def cmd_demo(argv: list[str]) -> int:
    from rlhf_dist import demo

    parser = argparse.ArgumentParser(prog="rlhf-dist demo", description=demo.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="Run directory (default: runs/demo).")
    parser.add_argument("--stages", help="Comma-separated subset of the demo's stages.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="Re-run stages whose output holds a different config.")
    group.add_argument("--resume", action="store_true", help="Continue unfinished stages even if the config changed.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Override recipe fields.")
    return demo.run_demo(parser.parse_args(argv))


def cmd_recipes(argv: list[str]) -> int:
    import yaml

    from rlhf_dist.recipe import shipped_recipes

    for name, path in sorted(shipped_recipes().items()):
        raw = yaml.safe_load(path.read_text()) or {}
        print(f"{name:<24} {raw.get('description', '')}")
    return 0


def cmd_fields(argv: list[str]) -> int:
    from rlhf_dist.config.resolve import field_help

    if len(argv) != 1 or argv[0] not in registry.STAGES:
        raise UserError(f"usage: rlhf-dist fields STAGE, with STAGE one of {', '.join(registry.STAGES)}")
    for key, default, text in field_help(argv[0]):
        print(f"{key}  (default {default})\n    {text}")
    return 0


COMMANDS = {"pipeline": cmd_pipeline, "launch": cmd_launch, "slurm": cmd_slurm, "plan": cmd_plan, "demo": cmd_demo,
            "recipes": cmd_recipes, "fields": cmd_fields}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a program of its own: a stage keeps its stderr in the run directory (rlhf_dist.failures)
        from rlhf_dist import failures

        failures.keep_stderr_default = True
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.format(stages=", ".join(registry.STAGES)))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in registry.STAGES:
            from rlhf_dist.stages.common import stage_main

            return stage_main(command, rest)
        if command in COMMANDS:
            return COMMANDS[command](rest)
        raise UserError(f"unknown command '{command}'; choose from {', '.join((*registry.STAGES, *COMMANDS))}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
