"""The optimizer of the PPO loop: AdamW with the policy and the value function as two parameter groups (each its
own learning rate), fused where torch has it, and the learning-rate schedule as one pure function."""

from __future__ import annotations

import math

import torch


def param_groups(model, args) -> list[dict]:
    """The policy's trainable weights at learning_rate; the value function's (model, head, adapter) at
    value_learning_rate. `model` is an `ActorCritic`."""
    policy, value = [], []
    adapter = f".{model.value_adapter}." if model.value_adapter else None
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_value = name.startswith(("value_model.", "value_head.")) or (adapter is not None and adapter in name)
            (value if is_value else policy).append(p)
    groups = [{"params": policy, "lr": args.learning_rate}]
    if value:
        groups.append({"params": value, "lr": args.value_learning_rate or args.learning_rate})
    return groups


def fused_adam_ok(groups: list[dict], deepspeed: bool) -> bool | None:
    """Fused AdamW (one kernel over all tensors, as transformers' default optimizer) where torch has it for every
    parameter: floating point on CPU or CUDA. Not under DeepSpeed, which drives its own optimizer states."""
    if deepspeed:
        return None
    params = [p for group in groups for p in group["params"]]
    ok = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                              for p in params)
    return True if ok else None


def build_optimizer(model, args, deepspeed: bool) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, args)` with the `training` section's betas, epsilon and weight decay."""
    groups = param_groups(model, args)
    return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             weight_decay=args.weight_decay, fused=fused_adam_ok(groups, deepspeed))


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based) of `total`: linear warm-up over `warmup`
    steps from 1/warmup to 1, then constant, linear decay to 0, or half a cosine to 0 (lr_scheduler_type)."""
    total = max(total, 1)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0
