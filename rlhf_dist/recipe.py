"""Recipes on disk and the flags of a run: what the light commands (`launch`, `--help`) need.

Nothing here imports torch, transformers or TRL, so `rlhf-dist launch` starts in a moment on every
node; the typed stage configs built from a recipe are in `rlhf_dist.config` (`config.resolve.resolve_stage`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rlhf_dist.errors import ConfigError
from rlhf_dist.preempt import GRACE_SECONDS


class RecipeLoader(yaml.SafeLoader):
    """YAML as people write configs: `no`/`on` and dates stay strings, `1e-5` is a float.

    PyYAML follows YAML 1.1, where `save_strategy: no` would be False and `revision: 2024-01-01` a date.
    """


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_error(exc: yaml.YAMLError, text: str) -> tuple[tuple[int, int] | None, str]:
    """((line, column) counted from 1, or None; the problem in one line) of a YAML error in `text`."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context or type(exc).__name__).split())
        if exc.context and exc.problem:
            context = " ".join(str(exc.context).split())
            cm = exc.context_mark
            if cm is not None and mark is not None and (cm.line, cm.column) != (mark.line, mark.column):
                context += f" that starts at line {cm.line + 1}, column {cm.column + 1}"
            problem += f" ({context})"
        return ((mark.line + 1, mark.column + 1) if mark is not None else None), problem
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow: an offset, not a mark
        pos = exc.position
        line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return (line, column), f"unacceptable character {char!r}: {exc.reason}"
    lines = str(exc).strip().splitlines()
    return None, (lines[0] if lines else type(exc).__name__)


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship inside the package: name -> path."""
    folder = resources.files("rlhf_dist") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_recipe(name_or_path: str) -> tuple[dict, str]:
    """Read a recipe by shipped name (`demo`) or file path. Returns (raw dict, source for messages)."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        shipped = shipped_recipes()
        if name_or_path in shipped:
            path = shipped[name_or_path]
        else:
            close = difflib.get_close_matches(name_or_path, list(shipped), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"recipe '{name_or_path}' is neither a file nor a shipped recipe; {hint}"
                f"shipped: {', '.join(sorted(shipped))} (or pass the path of your own YAML file)"
            )
    text = path.read_text()
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark, problem = yaml_error(exc, text)
        where = f" line {mark[0]}, column {mark[1]}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}; fix the indentation or quoting there") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (model, data, sft, ...)")
    return raw, str(path)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a copy of the raw recipe."""
    out = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE; write e.g. sft.training.learning_rate=1e-5")
        key, _, text = item.partition("=")
        try:
            value = parse_yaml(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            mark, problem = yaml_error(exc, text)
            where = "" if mark is None else f" column {mark[1]}" if "\n" not in text else f" line {mark[0]}, column {mark[1]}"
            raise ConfigError(
                f"override '{key.strip()}' (value {text!r}){where}: not valid YAML: {problem}; fix the value, or put "
                "it in quotes to pass it as a string"
            ) from None
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def check_grace_period(seconds: float) -> None:
    if not seconds >= 0:
        raise ConfigError(f"--grace-period must be a number of seconds >= 0, got {seconds:g}")


def run_flags(args: argparse.Namespace) -> list[str]:
    """The flags of `add_run_arguments` that `args` sets away from their defaults, to pass on to a stage command."""
    flags = [*(["--overwrite"] if args.overwrite else []), *(["--resume"] if args.resume else [])]
    if getattr(args, "fallback", "auto") != "auto":
        flags += ["--fallback", args.fallback]
    if getattr(args, "gpu_memory", None) is not None:
        flags += ["--gpu-memory", f"{args.gpu_memory:g}"]
    if getattr(args, "grace_period", GRACE_SECONDS) != GRACE_SECONDS:
        flags += ["--grace-period", f"{args.grace_period:g}"]
    return flags


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by every stage command and `pipeline`."""
    parser.add_argument("--recipe", required=True, help="Shipped recipe name (see `rlhf-dist recipes`) or a YAML file.")
    parser.add_argument("--output", required=True, help="Run directory; each stage writes OUTPUT/<stage>.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true",
                       help="Re-run a stage whose output holds a different config (replaced once the new one is complete).")
    group.add_argument("--resume", action="store_true", help="Continue an unfinished stage even if its config changed.")
    parser.add_argument(
        "--fallback", choices=("auto", "off"), default="auto",
        help="auto: on one GPU, if the run would not fit its memory (rlhf-dist plan's estimate), switch to QLoRA and "
             "then halve the micro-batch (global batch kept); the choice is logged and saved in config.yaml.")
    parser.add_argument(
        "--gpu-memory", type=float, metavar="GIB",
        help="GPU memory in GiB for --fallback auto (default: what device 0 reports); also simulates a device.")
    parser.add_argument(
        "--grace-period", type=float, default=GRACE_SECONDS, metavar="SECONDS",
        help=f"After a TERM or INT: how long the step in progress and its checkpoint may take before the stage exits "
             f"without saving (default {GRACE_SECONDS:g}: inside Slurm's default KillWait of 30 s). A second TERM or INT "
             "exits at once.")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="Override recipe fields, e.g. sft.training.learning_rate=1e-5 (`rlhf-dist fields STAGE` lists them all).",
    )
