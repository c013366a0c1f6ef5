"""The run directory: where each stage writes, atomically, and what happens when it already exists.

Layout of `--output RUN`::

    RUN/rlhf_dist_run.json    marks the folder as ours (refusing to write into a stranger's folder)
    RUN/sft.incomplete/       a stage at work: trainer checkpoints, and `final/` while it is saved
    RUN/logs/sft/             every process's stderr and how it ended (`rlhf_dist.failures`), stall reports
    RUN/sft/                  a complete stage (renamed from sft.incomplete/final in one step):
                              model (safetensors), tokenizer, config.yaml, metrics.json, README.md

A stage directory exists only once everything in it is written, so "complete" is simply "exists".
Re-running with the same resolved config (see `config.fingerprint`) skips a complete stage and
resumes an incomplete one from its newest complete checkpoint.

Checkpoints (`STAGE.incomplete/checkpoint-N/`, every stage) count only once they are sealed: the
seal file (`SEAL`) is written last, after every process has finished writing and every file is
flushed to disk. A folder without it (a run killed while saving, or PPO's `checkpoint-N.tmp`) is
never resumed from; resuming moves it to `STAGE.incomplete/incomplete/` and says so, so nothing
is deleted silently. A different config is refused unless
`--overwrite` (run the stage again; the old output is replaced only when the new one is complete)
or, for an incomplete stage, `--resume` (continue it under the new config). An incomplete stage
whose earlier attempt wrote no complete checkpoint (it failed before training anything worth
keeping) is not refused: the corrected config simply starts it afresh, its unsealed checkpoints
set aside as above. A non-empty folder without the marker file is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf_dist.atomic import write_json, write_text  # noqa: F401 - part of this module's interface
from rlhf_dist.errors import RunDirError

MARKER = "rlhf_dist_run.json"
CONFIG_FILE = "config.yaml"
SEAL = "rlhf_dist_checkpoint.json"  # written last into a checkpoint: it is complete
SET_ASIDE = "incomplete"  # STAGE.incomplete/incomplete/: checkpoints a killed run left unfinished
UNHEALTHY = "unhealthy"  # STAGE.incomplete/unhealthy/: PPO checkpoints a guardrail condemned (rlhf_dist.rl.guardrails)


def stage_dir(output: str | Path, stage: str) -> Path:
    return Path(output) / stage


def work_dir(output: str | Path, stage: str) -> Path:
    return Path(output) / f"{stage}.incomplete"


def is_complete(output: str | Path, stage: str) -> bool:
    return (stage_dir(output, stage) / "metrics.json").is_file()


@dataclass
class StageAction:
    """What to do with a stage: 'skip' (complete, same config), 'fresh' or 'resume'."""

    action: str
    checkpoint: str | None = None
    reason: str = ""
    set_aside: list[str] = field(default_factory=list)  # unsealed checkpoints that `prepare` moves away


def _read_config(folder: Path) -> dict | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def _explain(old: dict, new: dict) -> str:
    from rlhf_dist.config.identity import diff_keys

    keys = diff_keys(old, new)
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return f"differs in {shown}" if keys else "differs"


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named checkpoint-N, else None (checkpoint-N.tmp, other names)."""
    prefix, _, number = path.name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def is_sealed(path: Path) -> bool:
    """A complete checkpoint: named checkpoint-N and sealed for step N."""
    step = checkpoint_step(path)
    if step is None or not (path / SEAL).is_file():
        return False
    try:
        return json.loads((path / SEAL).read_text()).get("step") == step
    except (OSError, ValueError):
        return False


def checkpoints(folder: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints, oldest first; incomplete ones) in a stage's work directory."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir()]
    complete = sorted((p for p in found if is_sealed(p)), key=checkpoint_step)
    return complete, sorted(p for p in found if p not in complete)


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint in `folder`, or None."""
    complete, _ = checkpoints(folder)
    return str(complete[-1]) if complete else None


def seal_checkpoint(folder: Path, step: int, **info) -> None:
    """Mark a fully written checkpoint complete (main process, after every process has written its part).

    Every file in it is flushed to disk first, so a sealed checkpoint survives a machine crash as well.
    """
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    write_json(Path(folder) / SEAL, {"step": step, **info}, durable=True)


def read_seal(folder: str | Path) -> dict:
    return json.loads((Path(folder) / SEAL).read_text())


def rotate_checkpoints(folder: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep` (at least one is kept). Incomplete ones are left."""
    complete, _ = checkpoints(folder)
    for old in complete[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(folder: Path, names: list[str], into: str = SET_ASIDE) -> list[Path]:
    """Move checkpoints out of the way of resuming (into folder/incomplete/ or another subfolder), never deleting them."""
    moved = []
    target = Path(folder) / into
    for name in names:
        src = Path(folder) / name
        if not src.exists():
            continue
        target.mkdir(exist_ok=True)
        dst, k = target / name, 1
        while dst.exists():
            dst, k = target / f"{name}.{k}", k + 1
        os.replace(src, dst)
        moved.append(dst)
    return moved


def check_output_root(output: str | Path) -> None:
    """Refuse a file, or a non-empty folder that is not an rlhf-dist run (never written into, even with --overwrite)."""
    root = Path(output)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--output {root} is a file; pass a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise RunDirError(
            f"--output {root} is not empty and is not an rlhf-dist run directory; choose a new or empty directory"
        )


def stage_action(output: str | Path, stage: str, resolved: dict, overwrite: bool, resume: bool) -> StageAction:
    """Decide, without touching the disk, what running `stage` into `output` should do."""
    from rlhf_dist.config.identity import fingerprint

    check_output_root(output)
    done, work = stage_dir(output, stage), work_dir(output, stage)
    if done.exists():
        old = _read_config(done) or {}
        if fingerprint(old) == fingerprint(resolved):
            return StageAction("skip", reason=f"{done} is complete with the same config")
        if not overwrite:
            raise RunDirError(
                f"{done} holds a different run ({_explain(old, resolved)}); pass --overwrite to replace it, "
                "or choose another --output"
            )
        return StageAction("fresh", reason=f"--overwrite: {done} will be replaced once the new run is complete")
    if work.exists() and not overwrite:
        old = _read_config(work)
        complete, incomplete = checkpoints(work)
        aside = [p.name for p in incomplete]
        note = (f"; {len(aside)} incomplete checkpoint(s) ({', '.join(aside)}: not sealed, a run stopped while "
                f"writing them) set aside in {work / SET_ASIDE}") if aside else ""
        if old is not None and fingerprint(old) != fingerprint(resolved) and not resume:
            if not complete:  # an attempt that failed before its first checkpoint: nothing worth keeping
                return StageAction("fresh", reason=f"the earlier attempt in {work} (a different config: "
                            f"{_explain(old, resolved)}) wrote no complete checkpoint; starting the stage afresh "
                            f"with the new config{note}", set_aside=aside)
            raise RunDirError(
                f"{work} holds an unfinished different run ({_explain(old, resolved)}) with a complete checkpoint "
                f"({Path(complete[-1]).name}); pass --resume to continue it with the new config, --overwrite to "
                "start the stage again, or choose another --output"
            )
        if complete:
            return StageAction("resume", checkpoint=str(complete[-1]), reason=f"resuming from {complete[-1]}{note}",
                        set_aside=aside)
        if aside:
            return StageAction("fresh", reason=f"no complete checkpoint, starting again{note}", set_aside=aside)
    return StageAction("fresh")


def prepare(output: str | Path, stage: str, resolved: dict, action: StageAction) -> Path:
    """Create the work directory for a 'fresh' or 'resume' action and record the config. Main process only.

    A complete output being replaced (--overwrite) stays where it is until `finalize`.
    """
    root, work = Path(output), work_dir(output, stage)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).exists():
        write_json(root / MARKER, {"created_by": "rlhf-dist", "format": 1})
    set_aside(work, action.set_aside)
    if action.action == "fresh" and work.exists():
        kept = {work / SET_ASIDE, work / UNHEALTHY}
        for child in work.iterdir():  # a fresh start keeps what was set aside, and nothing else
            if child not in kept:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    write_text(work / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
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
