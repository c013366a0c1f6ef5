"""The run directory: where each stage writes, atomically, and what happens when it already exists.

Layout of `--output RUN`::

    RUN/rlhf_dist_run.json    marks the folder as ours (refusing to write into a stranger's folder)
    RUN/sft.incomplete/       a stage at work: trainer checkpoints, and `final/` while it is saved
    RUN/sft/                  a complete stage (renamed from sft.incomplete/final in one step):
                              model (safetensors), tokenizer, config.yaml, metrics.json, README.md

A stage directory exists only once everything in it is written, so "complete" is simply "exists".
Re-running with the same resolved config (see `config.fingerprint`) skips a complete stage and
resumes an incomplete one from its last checkpoint. A different config is refused unless
`--overwrite` (run the stage again; the old output is replaced only when the new one is complete)
or, for an incomplete stage, `--resume` (continue it under the new config). A non-empty folder
without the marker file is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_dist.errors import RunDirError

MARKER = "rlhf_dist_run.json"
STATE_FILE = "config.yaml"


def stage_dir(output: str | Path, stage: str) -> Path:
    return Path(output) / stage


def work_dir(output: str | Path, stage: str) -> Path:
    return Path(output) / f"{stage}.incomplete"


def is_complete(output: str | Path, stage: str) -> bool:
    return (stage_dir(output, stage) / "metrics.json").is_file()


@dataclass
class Plan:
    """What to do with a stage: 'skip' (complete, same config), 'fresh' or 'resume'."""

    action: str
    checkpoint: str | None = None
    reason: str = ""


def _read_config(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def _explain(old: dict, new: dict) -> str:
    from rlhf_dist.config import diff_keys  # not at the top: importing config imports transformers

    keys = diff_keys(old, new)
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return f"differs in {shown}" if keys else "differs"


def last_checkpoint(folder: Path) -> str | None:
    ckpts = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1]))) if ckpts else None


def check_output_root(output: str | Path) -> None:
    """Refuse a file, or a non-empty folder that is not an rlhf-dist run (never written into, even with --overwrite)."""
    root = Path(output)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--output {root} is a file; pass a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise RunDirError(
            f"--output {root} is not empty and is not an rlhf-dist run directory; choose a new or empty directory"
        )


def plan_stage(output: str | Path, stage: str, resolved: dict, overwrite: bool, resume: bool) -> Plan:
    """Decide, without touching the disk, what running `stage` into `output` should do."""
    from rlhf_dist.config import fingerprint  # not at the top: importing config imports transformers

    check_output_root(output)
    done, work = stage_dir(output, stage), work_dir(output, stage)
    if done.exists():
        old = _read_config(done) or {}
        if fingerprint(old) == fingerprint(resolved):
            return Plan("skip", reason=f"{done} is complete with the same config")
        if not overwrite:
            raise RunDirError(
                f"{done} holds a different run ({_explain(old, resolved)}); pass --overwrite to replace it, "
                "or choose another --output"
            )
        return Plan("fresh", reason=f"--overwrite: {done} will be replaced once the new run is complete")
    if work.exists() and not overwrite:
        old = _read_config(work)
        ckpt = last_checkpoint(work)
        if old is not None and fingerprint(old) != fingerprint(resolved) and not resume:
            raise RunDirError(
                f"{work} holds an unfinished different run ({_explain(old, resolved)}); pass --resume to continue "
                "it with the new config, --overwrite to start the stage again, or choose another --output"
            )
        if ckpt:
            return Plan("resume", checkpoint=ckpt, reason=f"resuming from {ckpt}")
    return Plan("fresh")


def prepare(output: str | Path, stage: str, resolved: dict, plan: Plan) -> Path:
    """Create the work directory for a 'fresh' or 'resume' plan and record the config. Main process only.

    A complete output being replaced (--overwrite) stays where it is until `finalize`.
    """
    root, work = Path(output), work_dir(output, stage)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).exists():
        write_json(root / MARKER, {"created_by": "rlhf-dist", "format": 1})
    if plan.action == "fresh" and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_text(work / STATE_FILE, yaml.safe_dump(resolved, sort_keys=False))
    return work


def finalize(output: str | Path, stage: str) -> Path:
    """Make `STAGE.incomplete/final` the stage output `STAGE` by renames; the old output goes only after."""
    done, work = stage_dir(output, stage), work_dir(output, stage)
    old = done.with_name(f"{stage}.replaced")
    if done.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(done, old)
    os.replace(work / "final", done)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return done


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically: a temporary file in the same folder, renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
