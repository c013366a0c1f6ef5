"""Where the PPO loop's numbers go: a JSONL log, TensorBoard, and sample completions (main process only).

    WORK/log.jsonl        one JSON object per logged step (every metric; `log_history.json` at the end)
    WORK/samples.jsonl    a few (prompt, completion, score) per logged step
    WORK/tensorboard/     TensorBoard event files: `tensorboard --logdir OUTPUT/ppo/tensorboard`

The PPO loop's TensorBoard files are in the stage's work folder, RUN/ppo.incomplete/tensorboard, and the stage copies
them into its output (RUN/ppo/tensorboard). `tracker_env` points the Hugging Face Trainer's trackers of the other
stages at the same places (TensorBoard at WORK/tensorboard, W&B at the run directory, unless the user chose
otherwise), and `keep_tracker_files` copies WORK/tensorboard into the stage's output before it is made final:
every tracker writes under the run, so a moved run takes its logs along.

On resume from step S, lines of later steps (written after the checkpoint) are dropped first, so
the logs continue exactly where the checkpoint left off. Guardrail events (`rlhf_dist.rl.guardrails`) are rows
with an "event" key in log.jsonl: a rollback keeps them (they happened) while the metric rows after the step it
went back to are dropped; a resume keeps the ones the checkpoint's state counts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from rlhf_dist.rundir import write_text

TENSORBOARD_DIR = "tensorboard"  # in the stage's work folder, then in its output


def tracker_env_vars(work_dir: str | Path, run_dir: str | Path, environ: MutableMapping[str, str] | None = None
                     ) -> dict[str, str]:
    """Where the Hugging Face Trainer's trackers should write, as environment variables the user has not set.

    transformers 5 has no ``TrainingArguments.logging_dir``: its TensorBoardCallback writes to
    ``$TENSORBOARD_LOGGING_DIR``, else ``output_dir/runs/DATE_HOST`` (here the stage's work folder, which the
    stage deletes once it is complete). W&B's WandbCallback calls ``wandb.init()`` without a ``dir``: its files go to
    ``$WANDB_DIR``, else ``./wandb`` under the current directory. Returns {TENSORBOARD_LOGGING_DIR:
    WORK/tensorboard, WANDB_DIR: RUN} minus what `environ` (default os.environ) already sets.
    """
    environ = os.environ if environ is None else environ
    wanted = {"TENSORBOARD_LOGGING_DIR": str(Path(work_dir).absolute() / TENSORBOARD_DIR),
              "WANDB_DIR": str(Path(run_dir).absolute())}
    return {k: v for k, v in wanted.items() if not environ.get(k)}


@contextlib.contextmanager
def tracker_env(work_dir: str | Path, run_dir: str | Path) -> Iterator[dict[str, str]]:
    """Within the block, `tracker_env_vars` are set in os.environ (what the user set is kept); restored after.

    Enter it before the Trainer is built (TensorBoardCallback reads its variable when it is created) and leave it
    after training: a pipeline that runs several stages in one process gives each its own folders.
    """
    added = tracker_env_vars(work_dir, run_dir)
    os.environ.update(added)
    try:
        yield added
    finally:
        for key, value in added.items():
            if os.environ.get(key) == value:
                del os.environ[key]


def keep_tracker_files(work_dir: str | Path, final_dir: str | Path) -> list[Path]:
    """Copy WORK/tensorboard into the stage's output folder (main process, before `rundir.finalize`).

    Returns what was copied. A folder already there (a resumed stage's earlier save) is merged into.
    """
    copied = []
    src = Path(work_dir) / TENSORBOARD_DIR
    if src.is_dir() and any(src.rglob("*")):
        dst = Path(final_dir) / TENSORBOARD_DIR
        shutil.copytree(src, dst, dirs_exist_ok=True)
        copied.append(dst)
    return copied


def _rows(path: Path) -> list[dict]:
    """The complete rows of a JSONL file; a line cut short by a crash while appending is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_jsonl(path: Path, last_step: int, keep_events: int | None = None) -> None:
    """Drop rows of steps after `last_step`; event rows: keep those numbered up to `keep_events` (None: all)."""
    if not path.is_file():
        return

    def kept(row):
        if "event" in row:
            return keep_events is None or row.get("n", 0) <= keep_events
        return row.get("step", 0) <= last_step

    write_text(path, "".join(json.dumps(row) + "\n" for row in _rows(path) if kept(row)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


class Tracker:
    """Writes metrics and samples; a no-op on processes other than the main one."""

    def __init__(self, folder: Path, enabled: bool, report_to: list[str], resume_step: int = 0, events: int = 0):
        self.enabled = enabled
        self.report_to = list(report_to)
        self.folder = Path(folder)
        self.metrics_path = self.folder / "log.jsonl"
        self.samples_path = self.folder / "samples.jsonl"
        self.tensorboard = None
        unknown = [r for r in report_to if r not in ("tensorboard",)]
        if unknown:
            raise ValueError(f"unknown tracker(s) {unknown}; training.report_to takes 'tensorboard' or []")
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(self.metrics_path, resume_step, keep_events=events)
        _truncate_jsonl(self.samples_path, resume_step)
        self._open_tensorboard(resume_step)

    def _open_tensorboard(self, after_step: int) -> None:
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: on resume, TensorBoard hides events logged after the checkpoint
            purge = after_step + 1 if after_step else None
            self.tensorboard = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=purge)

    def event(self, event: dict) -> None:
        """A guardrail event: a row of its own in log.jsonl, text and a scalar in TensorBoard."""
        if not self.enabled:
            return
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps({"event": "guardrail", **{k: _jsonable(v) for k, v in event.items()}}) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.add_text("guardrails", f"**{event['rule']}** ({event['action']}): {event['message']}",
                                      event["step"])
            if isinstance(event.get("value"), (int, float)):
                self.tensorboard.add_scalar(f"guardrails/{event['rule']}", event["value"], event["step"])
            self.tensorboard.flush()

    def rewind(self, step: int) -> None:
        """Back to `step` (a rollback): metric and sample rows after it are dropped, events kept."""
        if not self.enabled:
            return
        self.close()
        _truncate_jsonl(self.metrics_path, step)
        _truncate_jsonl(self.samples_path, step)
        self._open_tensorboard(step)

    def log(self, step: int, metrics: dict[str, float], samples: list[dict] | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if samples:
            with self.samples_path.open("a") as fh:
                for sample in samples:
                    fh.write(json.dumps({"step": step, **sample}) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)
            if samples:
                text = "\n\n".join(f"**prompt** {s['prompt']!r}  \n**completion** {s['completion']!r}  \n"
                                   f"**score** {s['score']:.3f}" for s in samples)
                self.tensorboard.add_text("samples", text, step)
            self.tensorboard.flush()

    def history(self) -> list[dict]:
        """The metric rows (one per logged step)."""
        if not self.enabled or not self.metrics_path.is_file():
            return []
        return [row for row in _rows(self.metrics_path) if "event" not in row]

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
