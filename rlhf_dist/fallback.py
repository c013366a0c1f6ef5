"""`--fallback auto`: a stage run as one process on one GPU that would not fit is switched to something that does.

    rlhf-dist sft --recipe my.yaml --output runs/x                      # one 24 GB GPU: may become QLoRA
    rlhf-dist sft --recipe my.yaml --output runs/x --gpu-memory 24      # plan for a 24 GiB device (also without one)
    rlhf-dist sft --recipe my.yaml --output runs/x --fallback off       # run exactly what the recipe says

The configured run is estimated with `rlhf-dist plan`'s model (`rlhf_dist.plan.estimate`: strategy ddp, the
stage's memory profile and sequence length, micro-batch, activation checkpointing and precision). If it does not fit
the device's memory less the planner's 10% headroom:

1. switch to QLoRA: lora.enabled=true, quantization.load_in_4bit=true (NF4; compute dtype bfloat16 on a GPU);
2. if still too big, halve the per-device micro-batch and double the gradient accumulation (the global batch is
   unchanged; where mini_batch_size fixes the accumulation (ppo) it is left alone, and a generation_batch_size is
   halved alongside) until
   it fits or the micro-batch is 1;
3. if nothing fits, fail with one line before anything is written.

The decision is logged and lands in the resolved config (the changed fields, and a `fallback` entry), so
config.yaml and `--resume` see the same run; it depends only on the config and the device memory. Nothing is done
with several processes (`WORLD_SIZE` > 1: plan those with `rlhf-dist plan`), without a GPU unless --gpu-memory is
given, or with --fallback off.
"""

from __future__ import annotations

import logging
import os

from rlhf_dist import plan
from rlhf_dist.errors import UserError

log = logging.getLogger("rlhf_dist")


def device_memory_gib(args) -> float | None:
    """--gpu-memory, else device 0's memory, else None (no GPU)."""
    if getattr(args, "gpu_memory", None) is not None:
        if not args.gpu_memory > 0:
            raise UserError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}")
        return float(args.gpu_memory)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / plan.GIB
    return None


def single_process(args) -> bool:
    """One process: not started by a launcher with several ranks, nor a pipeline that launches several."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    launched = (getattr(args, "num_processes", None) or 1) * (getattr(args, "num_machines", None) or 1)
    return world == 1 and launched == 1


def method_of(cfg) -> str:
    if not cfg.lora.enabled:
        return "full"
    return "qlora" if cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit else "lora"


def _halve(n: int) -> int:
    """The largest proper divisor of n (n // 2 for even n), so micro-batch x accumulation stays the same."""
    return next(d for d in range(n // 2, 0, -1) if n % d == 0)


def estimate_gib(stage: str, cfg, method: str, batch: int, generation_batch: int | None = None) -> float:
    """`rlhf-dist plan`'s per-GPU total (GiB) of this stage's config with `method` and micro-batch `batch`, ddp."""
    from rlhf_dist.rl.sources import policy_base

    base = policy_base(cfg)  # an SFT adapter as init_from: plan the base it was trained on
    model_cfg = plan.load_config(base)
    t = cfg.training
    needs = plan.profile(stage).models
    policy = plan.model_shape(model_cfg, "policy", False, cfg.lora.r) if "policy" in needs else None
    classifier = None
    if "classifier" in needs:  # the stage's own model (a reward model), or the one it scores with (ppo's)
        source = getattr(cfg, "reward_model", None) or base
        classifier = plan.model_shape(plan.load_config(source), "reward", True, cfg.lora.r)
    positions = getattr(plan.text_config(model_cfg), "max_position_embeddings", None) or 2048
    precision = "bf16-mixed" if getattr(t, "bf16", False) or getattr(t, "fp16", False) else "fp32"
    est = plan.estimate(stage, policy, classifier, method, "ddp", gpus_per_node=1, nodes=1,
                        seq=cfg.sequence_length(positions), batch=batch, checkpointing=bool(t.activation_checkpointing),
                        lora_r=cfg.lora.r, double_quant=cfg.quantization.double_quant, precision=precision,
                        generation_batch=generation_batch)
    return est["total"] / plan.GIB


def apply(stage: str, cfg, args) -> dict | None:
    """Change `cfg` in place if the run does not fit one GPU; returns the decision (for the resolved config) or None."""
    if getattr(args, "fallback", "off") != "auto" or not single_process(args):
        return None
    memory = device_memory_gib(args)
    if memory is None:
        return None
    usable = memory * (1 - plan.HEADROOM)
    t = cfg.training
    method, batch = method_of(cfg), t.per_device_train_batch_size
    gen = getattr(t, "generation_batch_size", None)  # sequences generated at once (a KV cache), where the stage has it
    asked = estimate_gib(stage, cfg, method, batch, gen)
    what = f"{stage} {method} with micro-batch {batch}"
    if asked <= usable:
        log.info("fallback: %s needs ~%.2f GiB per GPU (rlhf-dist plan's estimate), the GPU has %.2f GiB (%.2f usable): "
                 "it fits, nothing changed", what, asked, memory, usable)
        return None

    # 1. QLoRA (unless already quantised), then 2. halve the micro-batch until it fits or is 1
    method = "qlora"
    needed = estimate_gib(stage, cfg, method, batch, gen)
    accumulation = 1
    while needed > usable and batch > 1:
        smaller = _halve(batch)
        accumulation *= batch // smaller
        batch, gen = smaller, (_halve(gen) if gen and gen > 1 else gen)
        needed = estimate_gib(stage, cfg, method, batch, gen)
    if needed > usable:
        raise UserError(f"--fallback auto: {what} needs ~{asked:.2f} GiB per GPU, and even QLoRA with micro-batch 1 "
                        f"~{needed:.2f} GiB; the GPU has {memory:.2f} GiB ({usable:.2f} usable after "
                        f"{plan.HEADROOM:.0%} headroom); use a larger GPU or several (see rlhf-dist plan), a shorter "
                        "sequence length, or --fallback off to try anyway")

    import torch

    cfg.lora.enabled = True
    q = cfg.quantization
    if not (q.load_in_4bit or q.load_in_8bit):
        q.load_in_4bit = True
        q.compute_dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    changes = {f"{stage}.lora.enabled": True, f"{stage}.quantization.load_in_4bit": q.load_in_4bit,
               f"{stage}.quantization.compute_dtype": q.compute_dtype}
    if not hasattr(t, "gradient_accumulation_steps"):  # the accumulation follows from mini_batch_size (our PPO loop)
        changes[f"{stage}.training.per_device_train_batch_size"] = t.per_device_train_batch_size = batch
        if gen is not None:
            changes[f"{stage}.training.generation_batch_size"] = t.generation_batch_size = gen
        steps = "; global batch unchanged (mini_batch_size)"
    else:
        t.per_device_train_batch_size = batch
        t.gradient_accumulation_steps *= accumulation
        changes[f"{stage}.training.per_device_train_batch_size"] = batch
        changes[f"{stage}.training.gradient_accumulation_steps"] = t.gradient_accumulation_steps
        steps = f"; micro-batch {batch} x {t.gradient_accumulation_steps} accumulation (global batch unchanged)"
    log.info("fallback: %s needs ~%.2f GiB per GPU (rlhf-dist plan's estimate), the GPU has %.2f GiB (%.2f usable)",
             what, asked, memory, usable)
    log.info("fallback: switching to QLoRA (4-bit base, LoRA r=%d)%s: ~%.2f GiB; --fallback off keeps the recipe's "
             "setting", cfg.lora.r, steps, needed)
    return {"asked": what, "asked_gib": round(asked, 3), "device_gib": round(memory, 3), "chosen_gib": round(needed, 3),
            "changes": changes}
