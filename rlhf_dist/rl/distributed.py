"""Distributed plumbing of the PPO stage: the Accelerator, DeepSpeed's blanks, loading and saving under ZeRO-3, and
statistics reduced over processes with one collective.

The loop (`rlhf_dist.rl.trainer`) only sees the Accelerator built here; these are the details that
make the same code run in one process, under DDP, and under DeepSpeed ZeRO-2/3, on GPUs and on CPU
(gloo), verified by tests/test_ppo_distributed.py.
"""

from __future__ import annotations

import contextlib
import math
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


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage the accelerator runs (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


# ---------------------------------------------------------------------------------------------
# Statistics summed over micro-batches and processes
# ---------------------------------------------------------------------------------------------

class WeightedMeans:
    """Weighted means of named statistics, reduced over processes with ONE collective at the end. A key ending in
    ``_max`` keeps its maximum instead."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.maxima: dict[str, float] = {}

    def add(self, stats: dict[str, float], weight: float) -> None:
        for key, value in stats.items():
            if key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, -math.inf), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value * weight
                self.weights[key] = self.weights.get(key, 0.0) + weight

    def reduce(self, accelerator) -> dict[str, float]:
        keys, max_keys = sorted(self.sums), sorted(self.maxima)
        device = accelerator.device
        sums = torch.tensor([self.sums[k] for k in keys] + [self.weights[k] for k in keys], dtype=torch.float64,
                            device=device)
        maxima = torch.tensor([self.maxima[k] for k in max_keys], dtype=torch.float64, device=device)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, "sum")
            if len(max_keys):
                maxima = accelerator.gather(maxima[None]).max(dim=0).values
        n = len(keys)
        out = {k: (sums[i] / sums[n + i]).item() if sums[n + i] > 0 else math.nan for i, k in enumerate(keys)}
        out.update({k: maxima[i].item() for i, k in enumerate(max_keys)})
        return out


def max_over_processes(accelerator, value: float) -> float:
    """The largest of each process's `value` (one gather; the value itself on one process)."""
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device)).max())
