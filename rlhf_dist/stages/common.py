"""What every stage does around its training: parse, check, plan the run directory, save, report.

A stage is an entry in `rlhf_dist.registry` and a module that supplies `run(ctx) -> metrics` (build model
and trainer, train, save into `ctx.final_dir`) and, optionally, `check(ctx)` (its own input checks, before any
model loads). `stage_main(name, argv)` does the rest, the same for every stage. Everything that can fail on bad
input (config, data, model path, run directory) is checked here before a model is loaded.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_dist import failures, fallback, preempt, registry, relocate, rundir, watchdog
from rlhf_dist.config.resolve import redact_overrides, resolve_stage, to_dict
from rlhf_dist.config.sections import StageConfig
from rlhf_dist.errors import StageStopped, UserError
from rlhf_dist.plots import plot_stage
from rlhf_dist.recipe import add_run_arguments, apply_overrides, check_grace_period, load_recipe

log = logging.getLogger("rlhf_dist")


@dataclass
class StageContext:
    """Everything a stage's `run` needs: resolved config, checked data, tokenizer, where to write."""

    cfg: StageConfig
    train: Any
    eval: Any
    data_source: str
    tokenizer: Any
    final_dir: Path
    checkpoint: str | None
    output: Path | None = None
    report: Any = None  # data.DataReport: rows read, skipped, too long (metrics.json's `data`)


def resolve_init(cfg: StageConfig, stage: str, output: Path) -> str:
    """The model a stage starts from: explicit init_from, else the latest complete upstream stage, else the base."""
    if cfg.init_from:
        return cfg.init_from
    for upstream in registry.get(stage).upstream:
        if rundir.is_complete(output, upstream):
            return str(rundir.stage_dir(output, upstream).resolve())
    if cfg.model.name_or_path:
        return cfg.model.name_or_path
    raise UserError(f"{stage}: no model to start from; set model.name_or_path (or {stage}.init_from)")


def file_digest(path: str | Path, limit: int = 256 << 20) -> str:
    """sha256 of a local data file (size and mtime for files over `limit` bytes)."""
    path = Path(path).expanduser()
    stat = path.stat()
    if stat.st_size > limit:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256=" + digest.hexdigest()


def input_identity(cfg: StageConfig) -> dict:
    """What the stage reads, beyond its config: an rlhf-dist model's own fingerprint, local data contents.

    Every string of the config, at any depth, that names an rlhf-dist stage output (a folder with metrics.json and
    config.yaml: init_from, ppo's reward_model and value_model, eval's models, ...) adds that output's fingerprint, as
    `FIELD_fingerprint` (`init_fingerprint` for init_from; a list item by its folder's name: `models.ppo_fingerprint`).
    Part of the resolved config, so a re-run notices a re-trained upstream stage or an edited data file.
    """
    import dataclasses

    import yaml

    from rlhf_dist.config.identity import fingerprint

    def strings(value: Any, path: str):  # (dotted path, string) at any depth; a list item named by its folder's name
        if isinstance(value, str):
            yield path, value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                yield from strings(getattr(value, f.name, None), f"{path}.{f.name}" if path else f.name)
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from strings(item, f"{path}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from strings(item, f"{path}.{Path(item).name if isinstance(item, str) and Path(item).name else i}")

    legacy = {"init_from": "init"}  # the key of old (init_fingerprint): a run directory stays the same run
    ident = {}
    for key, path in strings(cfg, ""):
        try:
            folder = Path(path).expanduser()
            found = bool(path) and (folder / "metrics.json").is_file() and (folder / rundir.CONFIG_FILE).is_file()
        except (OSError, ValueError, RuntimeError):  # not a path at all (too long, a NUL byte, ~unknown_user)
            found = False
        name = f"{legacy.get(key, key)}_fingerprint"
        if found and name not in ident:
            ident[name] = fingerprint(yaml.safe_load((folder / rundir.CONFIG_FILE).read_text()) or {})
    for key in ("path", "eval_path"):
        value = getattr(cfg.data, key)
        if value and Path(value).expanduser().is_file():
            ident[f"data_{key}"] = file_digest(value)
    return ident


def load_stage_config(stage: str, args: argparse.Namespace) -> tuple[StageConfig, dict]:
    """Resolve the typed config of `stage` (with its starting model) and its plain dict."""
    from rlhf_dist.models import check_lora_targets, check_model_path, check_quantization

    spec = registry.get(stage)
    output = Path(args.output).expanduser().resolve()
    raw, source = load_recipe(args.recipe)
    raw = apply_overrides(raw, args.overrides)
    cfg = resolve_stage(raw, source, stage, str(output), str(rundir.work_dir(output, stage)))
    cfg.init_from = resolve_init(cfg, stage, output)
    explicit = isinstance(raw.get(stage), dict) and raw[stage].get("init_from")
    check_model_path(cfg.init_from, f"{stage}.init_from" if explicit else "model.name_or_path", cfg.model)
    check_quantization(f"{stage}.quantization", cfg)
    check_lora_targets(cfg.init_from, f"{stage}.lora.target_modules", cfg, classifier=spec.classifier)
    if spec.sources:  # the other models the stage reads (ppo: the reward model)
        registry.load(spec.sources)(cfg, output)
    decision = fallback.apply(stage, cfg, args)  # one GPU that the run would not fit: QLoRA, smaller micro-batch
    if decision is not None:
        check_quantization(f"{stage}.quantization", cfg)
        check_lora_targets(cfg.init_from, f"{stage}.lora.target_modules", cfg, classifier=spec.classifier)
    resolved = {**to_dict(cfg), "run_dir": str(output), "inputs": input_identity(cfg)}
    if decision is not None:
        resolved["fallback"] = decision
    return cfg, resolved


def process_state(timeout_seconds: float | None = None):
    """The accelerate process state (world size, rank), created the same way by every stage.

    Without a GPU it must be created with ``cpu=True``: otherwise ``accelerate launch --multi_gpu``
    on a CPU machine gives every process a world of one (docs/cpu.md trap 1), and each would train
    alone. DeepSpeed runs on CPU through its own CPU accelerator instead (``cpu=True`` would quietly
    turn it into plain DDP), with the gloo backend. ``timeout_seconds`` is the process group's
    timeout for every collective (training.ddp_timeout): it only takes effect here, where the group is
    created, before any Trainer or Accelerator would.
    """
    import datetime

    import torch
    from accelerate import PartialState

    from rlhf_dist.rl.distributed import launched_with_deepspeed

    on_cpu = not torch.cuda.is_available()
    extra = {"timeout": datetime.timedelta(seconds=timeout_seconds)} if timeout_seconds else {}
    if launched_with_deepspeed() and on_cpu:  # DeepSpeed's CPU accelerator; without gloo every process would be rank 0 of 1
        return PartialState(backend="gloo", **extra)
    return PartialState(cpu=on_cpu, **extra)


# Known-benign messages of the libraries, dropped where they are logged (logger -> words of the message): a tied
# embedding saved once by accelerate (lm_head = embed_tokens), bitsandbytes' optional CPU kernel from the hub (its own
# CPU code runs instead; offline it can never load).
BENIGN = {"accelerate.utils.other": "Removed shared tensor",
          "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}


def setup_logging() -> None:
    """Readable logs: our INFO lines and the Trainer's progress bar, not every library's chatter."""
    import warnings

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "DeepSpeed", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name, words in BENIGN.items():
        logging.getLogger(name).addFilter(lambda record, words=words: words not in str(record.msg))
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/TRL
    quiet_device_probe()
    import datasets

    datasets.disable_progress_bars()


def quiet_device_probe() -> bool:
    """Without a CUDA device, tell DeepSpeed so (DS_ACCELERATOR=cpu, unless set) before it probes for one: it would
    warn "Setting accelerator to CPU" in every process of every stage. Returns whether the run is on the CPU (the
    stage says so once, in its first log line)."""
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return on_cpu


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    """Parse, check, claim the work directory, run the stage, then write the outputs and complete it.

    The stage's module (`registry.StageSpec.entry`) has ``run(ctx) -> metrics`` and may have ``check(ctx)``, which
    runs on every process after the data and tokenizer are loaded and before anything is written or any model is
    loaded: the place for a stage's own input checks.
    """
    spec = registry.get(stage)
    entry = spec.entry()
    run, check = entry.run, getattr(entry, "check", None)
    parser = argparse.ArgumentParser(prog=f"rlhf-dist {stage}", description=entry.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    check_grace_period(args.grace_period)
    preempt.install(args.grace_period)  # USR1/TERM/INT -> checkpoint at the end of the step and stop, not death
    setup_logging()
    if int(os.environ.get("RANK", "0")) != 0:
        log.setLevel(logging.WARNING)  # one readable log, from the main process
    from rlhf_dist import lengths
    from rlhf_dist.data import DataReport, load_splits
    from rlhf_dist.models import load_tokenizer

    # 1. Everything that can be wrong with the input is checked, on every process, before any model
    #    is loaded or anything is written.
    cfg, resolved = load_stage_config(stage, args)
    timeout = getattr(cfg.training, "ddp_timeout", None)
    if timeout is not None and not timeout > 0:
        raise UserError(f"{stage}.training.ddp_timeout must be a number of seconds > 0, got {timeout}")
    state = process_state(timeout)  # one process, or one of many under accelerate/torchrun/srun
    output = Path(args.output).expanduser().resolve()
    action = rundir.stage_action(output, stage, resolved, args.overwrite, args.resume)
    if action.action == "skip":
        log.info("%s: %s; skipping", stage, action.reason)
        return 0
    report = DataReport()
    with state.main_process_first():  # the main process fills the datasets cache, the others reuse it
        train, evaluation, source = load_splits(cfg.data, spec.data_kind, stage, report)
    if evaluation is None or len(evaluation) == 0:
        raise UserError(f"{stage}: no held-out data for the before/after metrics; set {stage}.data.eval_fraction > 0, "
                        f"{stage}.data.eval_path or {stage}.data.eval_split")
    tokenizer = load_tokenizer(cfg.init_from, cfg.model)
    lengths.check_roles(tokenizer, report.roles, source, cfg.init_from)
    splits = lengths.apply(stage, cfg, {"train": train, "eval": evaluation}, tokenizer, report)
    train, evaluation = splits["train"], splits["eval"]
    final_dir = rundir.work_dir(output, stage) / "final"
    ctx = StageContext(cfg, train, evaluation, source, tokenizer, final_dir, action.checkpoint, output, report=report)
    if check is not None:
        check(ctx)

    # 2. Claim the work directory (main process, once every process has finished checking), then train.
    state.wait_for_everyone()
    if state.is_main_process:
        rundir.prepare(output, stage, resolved, action)
    state.wait_for_everyone()
    if action.reason:
        log.info("%s: %s", stage, action.reason)
    failures.start(output, stage, state.process_index, keep_stderr=failures.keep_stderr_default)
    dog = None
    if cfg.watchdog.enabled:
        dog = watchdog.Watchdog(cfg.watchdog.limits(), failures.log_dir(output, stage), state.process_index, stage).start()
    try:
        code = _train_and_finish(spec, cfg, ctx, args, resolved, state, run)
    except preempt.Preempted as stop:
        preempt.checkpoint_saved()
        log.warning("%s: %s; continue with the same command and --resume", stage, stop)
        failures.note(preempt.PREEMPTED, str(stop), checkpoint=stop.checkpoint)
        with watchdog.phase("finish"):
            state.wait_for_everyone()
        return preempt.exit_status()
    except StageStopped as stop:
        log.error("%s: %s", stage, stop)
        failures.note(stop.status, str(stop), **stop.files)
        return stop.status
    except BaseException as exc:
        failures.note(2 if isinstance(exc, UserError) else 1, failures.one_line(exc))
        raise
    finally:
        if dog is not None:
            dog.stop()
    failures.note(code, "complete")
    return code


def _train_and_finish(spec: registry.StageSpec, cfg, ctx: StageContext, args, resolved: dict, state, run) -> int:
    stage, output, final_dir = spec.name, ctx.output, ctx.final_dir
    log.info("%s: starting from %s; data %s (%d train / %d eval rows); %d process(es)%s", stage, cfg.init_from,
             ctx.data_source, len(ctx.train), len(ctx.eval), state.num_processes,
             " on the CPU (no CUDA device)" if state.device.type == "cpu" else f" on {state.device.type}")
    from transformers import set_seed

    set_seed(cfg.training.seed)  # new heads (a reward model's score, LoRA) start the same on every run
    started = time.time()
    from rlhf_dist.rl.tracking import keep_tracker_files, tracker_env

    with tracker_env(rundir.work_dir(output, stage), output):  # TensorBoard / W&B files under the run, not the cwd
        metrics = run(ctx)
    history = metrics.pop("history", [])
    data = {"source": ctx.data_source, "train_rows": len(ctx.train), "eval_rows": len(ctx.eval)}
    if ctx.report is not None:
        data.update(ctx.report.as_dict())
    used = metrics.pop("rows", {})  # what the trainer kept of the rows it was given (TRL may drop rows on its own)
    for split, given in (("train", len(ctx.train)), ("eval", len(ctx.eval))):
        if split in used:
            data[f"{split}_rows_used"] = used[split]
            if spec.rows_one_for_one and used[split] != given:  # TRL trainers filter on their own
                data[f"{split}_rows_dropped_by_trainer"] = given - used[split]
                log.warning("%s: the trainer used %d of the %d %s rows it was given (it dropped %d on its own)", stage,
                            used[split], given, split, given - used[split])
    if "eval_loss" in metrics.get("before", {}):  # train() starts a fresh log; keep the starting point
        history = [{"step": 0, "eval_loss": metrics["before"]["eval_loss"]}, *history]

    # 3. Write the rest of the stage output and make it visible in one rename.
    metrics = {
        "stage": stage,
        "init_from": cfg.init_from,
        "world_size": state.num_processes,
        "data": data,
        **metrics,
        "wall_seconds": round(time.time() - started, 1),
    }
    with watchdog.phase("finish"):
        if state.is_main_process:
            import yaml

            # Paths inside the run are written as ${output}/...: a copied or moved run means the same (relocate.resolve)
            here = functools.partial(relocate.to_relative, run_dir=output)
            rundir.write_text(final_dir / rundir.CONFIG_FILE, yaml.safe_dump(here(resolved), sort_keys=False))
            rundir.write_json(final_dir / "metrics.json", here(metrics))
            rundir.write_text(final_dir / "README.md", here(model_card(stage, cfg, metrics, args)))
            keep_tracker_files(rundir.work_dir(output, stage), final_dir)
            rundir.write_json(final_dir / "log_history.json", history)
            plot_stage(history, final_dir / "training.png", f"{stage}: {Path(cfg.init_from).name} -> {stage}")
            done = rundir.finalize(output, stage)
            log.info("%s: done -> %s\n%s", stage, done, format_metrics(metrics))
        state.wait_for_everyone()
    return 0


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def format_metrics(metrics: dict) -> str:
    before, after = metrics.get("before", {}), metrics.get("after", {})
    lines = [f"  {k:<24} {before.get(k, float('nan')):>10.4f} -> {after.get(k, float('nan')):>10.4f}" for k in after]
    return "\n".join(lines)


def model_card(stage: str, cfg: StageConfig, metrics: dict, args: argparse.Namespace) -> str:
    before, after = metrics.get("before", {}), metrics.get("after", {})
    rows = "\n".join(f"| {k} | {before.get(k, float('nan')):.4f} | {after.get(k, float('nan')):.4f} |" for k in after)
    what = "LoRA adapter (`adapter/`)" + (" and merged weights" if cfg.lora.merge else "") if cfg.lora.enabled else "full weights"
    overrides = " ".join(shlex.quote(o) for o in redact_overrides(args.overrides))
    return f"""---
library_name: transformers
tags: [rlhf-dist, {stage}]
---
# {stage} model

Trained by rlhf-dist stage `{stage}` from `{cfg.init_from}` on `{metrics['data']['source']}`
({metrics['data']['train_rows']} training rows, {metrics['data']['eval_rows']} held out). Saved: {what}, safetensors.

| metric (held-out) | before | after |
|---|---|---|
{rows}

![training curves](training.png)

Reproduce: `rlhf-dist {stage} --recipe {shlex.quote(args.recipe)} --output {shlex.quote(args.output)} {overrides}`.
The fully resolved configuration is in `config.yaml`; all numbers are in `metrics.json`.
"""
