"""Checkpoints of the PPO loop: weights, optimizer and RNG state (accelerate's `save_state`) plus the loop's own
counters, written under a temporary name, sealed (`rundir.seal_checkpoint`) once every process has written its
part, then renamed; and which checkpoint a guardrail's rollback may go back to.

A crash while writing leaves an unsealed ``checkpoint-STEP.tmp`` that resuming sets aside: the previous checkpoint
stays usable (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlhf_dist import faults, rundir
from rlhf_dist.atomic import write_json

COUNTERS_FILE = "ppo_state.json"  # the loop's counters in a checkpoint (step, KL controller, score moments, ...)


def save(accelerator, work_dir: Path, step: int, counters: dict, keep: int) -> Path:
    """WORK/checkpoint-STEP, sealed; the oldest beyond `keep` complete ones are deleted. Every process calls it."""
    final = work_dir / f"checkpoint-{step}"
    tmp = work_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # this very run's own unfinished attempt at this step (resume set older ones aside)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    faults.point("checkpoint", step)
    if accelerator.is_main_process:
        write_json(tmp / COUNTERS_FILE, counters)
        rundir.seal_checkpoint(tmp, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        rundir.rotate_checkpoints(work_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, folder: Path, partial: bool) -> dict:
    """Weights, optimizer and RNG from `folder` into the prepared objects; returns the loop's counters.

    ``partial``: the checkpoint holds only what trains (a PEFT policy's adapters, not its frozen base)."""
    accelerator.load_state(str(folder), **({"strict": False} if partial else {}))
    return json.loads((Path(folder) / COUNTERS_FILE).read_text())


def healthy(work_dir: Path, since: int) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint whose policy was seen healthy, the newer ones). A rule firing since step
    `since` judges the rollouts of step `since`, sampled by the policy of checkpoint-(since - 1): a healthy one is
    older than that."""
    complete, _ = rundir.checkpoints(work_dir)
    older = [p for p in complete if rundir.checkpoint_step(p) < since - 1]
    return (older[-1] if older else None), [p for p in complete if p not in older]
