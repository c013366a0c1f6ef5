"""Training a Hugging Face Trainer stage (pretrain, sft, reward, dpo) so that a kill or a signal at any moment
loses nothing: re-running the same command ends with the weights and metrics an uninterrupted run gives.

What `fit` adds to ``trainer.train()`` (each found missing by killing real runs; docs/reliability.md):

* **Sealed checkpoints.** The Trainer writes ``checkpoint-N/`` in place; a kill while it writes left an empty
  folder or a truncated ``optimizer.pt``, and resuming took it anyway. Here every checkpoint is sealed
  (`rundir.seal_checkpoint`) once every process has written its part, resume takes the newest sealed one, and
  only sealed ones are rotated (the Trainer's own rotation runs before the seal and could delete the last
  complete checkpoint while the new one is unfinished).
* **The losses of the whole run.** The seal keeps the counters the Trainer's checkpoint leaves out (the running
  loss sum, each process's not-yet-logged loss and metrics, the last logged step, TRL's token count), and a
  resumed run starts from them: its log history and its ``train_loss`` are those of an uninterrupted run, not of
  the resumed steps only.
* **No step after the last.** Resumed from a checkpoint at ``max_steps`` in the middle of an epoch, the Trainer
  trains one step more (its loop only stops after a step); here the finished epoch loop does not run.
* **Stop requests** (`rlhf_dist.preempt`): at the end of the step in which USR1, TERM or INT came, every process
  agrees, a sealed checkpoint is written there, and `preempt.Preempted` is raised.
* **The watchdog's phases** (`rlhf_dist.watchdog`): ``train_step`` N (from fetching its batch to the optimizer
  step), ``save``, ``evaluate``.

The "before" evaluation runs inside train(), once the model is wrapped and before the first step. Earlier,
Trainer.evaluate() prepares the bare model for evaluation, and accelerate then never wraps it in DDP: each
process would train alone. Under DeepSpeed the Trainer refuses it (ZeRO-1/2), or builds an inference engine
that train() cannot train (ZeRO-3). It is kept in the work directory: a resumed run reports the starting
model's metrics, not the checkpoint's.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

from rlhf_dist import faults, preempt, rundir, watchdog


def fit(trainer, ctx, evaluate: Callable[[], dict]) -> tuple[dict, dict, dict]:
    """Evaluate, train (resuming from ctx.checkpoint if set), evaluate again: (before, after, extra).

    `extra` holds the training figures and the log history. Raises `preempt.Preempted` once the checkpoint is
    saved if a stop signal ended the training early.
    """
    from transformers import TrainerCallback

    missing = [name for name in ("_save_checkpoint", "_run_epoch") if not hasattr(trainer, name)]
    if missing:
        raise RuntimeError(f"this transformers version's Trainer has no {', '.join(missing)}: rlhf-dist's crash-safe "
                           "checkpoints are built on them (tested with transformers 5.23-5.25)")
    work = Path(trainer.args.output_dir)
    saved = work / "before.json"
    before = json.loads(saved.read_text()) if ctx.checkpoint and saved.is_file() else {}
    seal = rundir.read_seal(ctx.checkpoint) if ctx.checkpoint else None
    watched_evaluate = _in_phase(evaluate, "evaluate")
    trainer.evaluate = _in_phase(trainer.evaluate, "evaluate")  # also the Trainer's evaluations during training
    _seal_checkpoints(trainer)
    _no_step_after_the_last(trainer)

    class Lifecycle(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if seal is not None:
                _restore_counters(trainer, seal)
            if not before:
                logged = len(state.log_history)
                before.update(watched_evaluate())
                del state.log_history[logged:]  # stage_main puts it in the history as step 0
                if trainer.is_world_process_zero():
                    rundir.write_json(saved, before)
            watchdog.set_phase("train_step", state.global_step + 1)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            faults.point("step", state.global_step + 1)  # gradients computed, weights not yet updated

        def on_step_end(self, args, state, control, **kwargs):
            watchdog.set_phase("train_step", state.global_step + 1)

    stop = preempt.trainer_callback()
    trainer.add_callback(stop)  # before Lifecycle: its agreement at a step's end is still that step's phase
    trainer.add_callback(Lifecycle())
    result = trainer.train(resume_from_checkpoint=ctx.checkpoint)
    # train_loss over every step of the run (the Trainer's covers the steps of this call only; equal without a resume)
    train_loss = trainer._total_loss_scalar / max(result.global_step, 1)
    for row in reversed(trainer.state.log_history):
        if "train_loss" in row:
            row["train_loss"] = train_loss
            break
    if stop.stopped_at is not None:
        raise preempt.Preempted(stop.stopped_at, work / f"checkpoint-{stop.stopped_at}")
    faults.point("trained")
    watchdog.set_phase("finish")  # the evaluation below, then the stage saving its model
    after = watched_evaluate()
    m = result.metrics
    plugin = trainer.accelerator.state.deepspeed_plugin
    summary = {"global_step": result.global_step, "train_loss": train_loss, "train_runtime": m.get("train_runtime"),
               "distributed_type": str(trainer.accelerator.distributed_type.value),
               "zero_stage": int(plugin.zero_stage) if plugin is not None else 0}
    rows = {"train": len(trainer.train_dataset)}
    if trainer.eval_dataset is not None and hasattr(trainer.eval_dataset, "__len__"):
        rows["eval"] = len(trainer.eval_dataset)
    return before, after, {"train": summary, "history": trainer.state.log_history, "rows": rows}


def _in_phase(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def watched(*args, **kwargs):
        with watchdog.phase(name):
            return fn(*args, **kwargs)

    return watched


def _seal_checkpoints(trainer) -> None:
    """Each checkpoint the Trainer writes is sealed once every process wrote its part; only sealed ones rotate."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    original = trainer._save_checkpoint
    work = Path(trainer.args.output_dir)

    def save(model, trial):
        step = trainer.state.global_step
        keep = trainer.args.save_total_limit
        with watchdog.phase("save", step):
            trainer.args.save_total_limit = None  # no rotation before the seal (it could delete the last sealed one)
            try:
                original(model, trial)
            finally:
                trainer.args.save_total_limit = keep
            processes = gather_object([_process_counters(trainer)])
            state = PartialState()
            state.wait_for_everyone()  # every process has written its part
            faults.point("checkpoint", step)
            if state.is_main_process:
                rundir.seal_checkpoint(work / f"checkpoint-{step}", step, world_size=state.num_processes,
                                       loss={"total": trainer._total_loss_scalar,
                                             "last_logged_step": trainer._globalstep_last_logged},
                                       processes=processes)
                if keep is not None:
                    rundir.rotate_checkpoints(work, keep)
            state.wait_for_everyone()

    trainer._save_checkpoint = save


def _process_counters(trainer) -> dict:
    """This process's counters that the Trainer's checkpoint leaves out: its loss and (TRL) metrics since the last
    log, and TRL's token count."""
    counters = {"tr_loss": float(trainer._tr_loss.item())}
    if hasattr(trainer, "_total_train_tokens"):
        counters["total_train_tokens"] = trainer._total_train_tokens
    metrics = getattr(trainer, "_metrics", None)
    if isinstance(metrics, dict) and isinstance(metrics.get("train"), dict):
        counters["train_metrics"] = {k: list(v) for k, v in metrics["train"].items()}
    return counters


def _restore_counters(trainer, seal: dict) -> None:
    """The counters as they were when the checkpoint was written (on_train_begin, after the Trainer's reset)."""
    from accelerate import PartialState

    state = PartialState()
    trainer._total_loss_scalar = seal["loss"]["total"]
    trainer._globalstep_last_logged = seal["loss"]["last_logged_step"]
    processes = seal.get("processes") or []
    if len(processes) != state.num_processes:  # resumed on another process count: those steps' part is lost
        return
    mine = processes[state.process_index]
    trainer._tr_loss.fill_(mine["tr_loss"])
    if "total_train_tokens" in mine and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = mine["total_train_tokens"]
    if "train_metrics" in mine and isinstance(getattr(trainer, "_metrics", None), dict):
        trainer._metrics["train"].clear()
        trainer._metrics["train"].update(mine["train_metrics"])


def _no_step_after_the_last(trainer) -> None:
    """Resumed at max_steps mid-epoch, the Trainer's epoch loop would take one more step before it checks."""
    original = trainer._run_epoch

    def run_epoch(*args, **kwargs):
        if trainer.state.max_steps > 0 and trainer.state.global_step >= trainer.state.max_steps:
            trainer.control.should_training_stop = True
            return None
        return original(*args, **kwargs)

    trainer._run_epoch = run_epoch
