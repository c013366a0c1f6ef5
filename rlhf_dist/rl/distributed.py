"""Distributed plumbing of the PPO stage: the Accelerator, DeepSpeed's blanks, loading and saving under ZeRO-3.

The loop (`rlhf_dist.rl.trainer`) only sees the Accelerator built here; these are the details that
make the same code run in one process, under DDP, and under DeepSpeed ZeRO-2/3, on GPUs and on CPU
(gloo), verified by tests/test_ppo_distributed.py.
"""

from __future__ import annotations

import contextlib
import os

import torch

from rlhf_dist.errors import ConfigError


def launched_with_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED for every process)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(a, world: int, hidden_size: int):
    """An Accelerator for our loop: devices, mixed precision, accumulation, DeepSpeed's "auto" values.

    ``hidden_size`` (the policy's) fills ZeRO's size-dependent "auto" keys, which accelerate can only
    take from a ``model.config`` (our ActorCritic has none).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from rlhf_dist.rl.batching import micro_batches_per_process

    deepspeed = launched_with_deepspeed()
    on_cpu = a.use_cpu or not torch.cuda.is_available()
    accumulation = micro_batches_per_process(a, world)
    accelerator = Accelerator(
        cpu=on_cpu and not deepspeed,  # cpu=True would quietly replace DeepSpeed by plain DDP
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and deepspeed else [],
        mixed_precision="bf16" if a.bf16 else "fp16" if a.fp16 else "no",
        gradient_accumulation_steps=accumulation,
        step_scheduler_with_optimizer=False,  # we set the learning rate ourselves, once per optimizer step
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # no DataLoader passes through prepare() to fill these in
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = a.per_device_train_batch_size
        ds["gradient_accumulation_steps"] = accumulation
        ds["train_batch_size"] = a.per_device_train_batch_size * accumulation * world
        if plugin.is_auto("gradient_clipping"):
            ds["gradient_clipping"] = a.max_grad_norm or 0.0
        h = hidden_size
        zero = ds.setdefault("zero_optimization", {})
        if plugin.zero_stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise ConfigError("the DeepSpeed config has ZeRO-3 without zero_optimization."
                              "stage3_gather_16bit_weights_on_model_save: true, so the trained model could not be "
                              "saved; set it (ds_configs/zero3.json does)")
        for key, value in {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                           "stage3_param_persistence_threshold": 10 * h}.items():
            if zero.get(key) == "auto":
                zero[key] = value
    return accelerator


@contextlib.contextmanager
def replicated_loading():
    """Load models whole on every process, even under ZeRO-3 (whose zero.Init would partition them).

    For the frozen reference and reward models: they are never passed to DeepSpeed, so partitioned
    weights would be unusable; each process keeps a full copy instead (no communication in their
    forwards). The QLoRA issue shrinks them (4-bit) where memory matters.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved is not None:
            hf_ds.set_hf_deepspeed_config(saved)


def untied(module, state: dict) -> dict:
    """Drop the second name of tied weights (lm_head = embeddings): a gathered ZeRO-3 state dict holds
    them as separate tensors, so save_pretrained could not tell, and would save both."""
    if module is None:
        return state
    every = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    tied = every - {name for name, _ in module.named_parameters()}
    return {k: v for k, v in state.items() if k not in tied}
