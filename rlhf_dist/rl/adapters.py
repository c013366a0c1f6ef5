"""Several LoRA adapters on ONE base model: PPO's policy, value function and reference share its weights.

With LoRA (and QLoRA: a 4-bit base) the PPO stage loads the SFT model once and puts on it

* ``default``   the policy's adapter (trainable; PEFT's default name, so ``adapter/`` is an ordinary adapter folder);
* ``value``     the value function's adapter (trainable), read by a linear value head on the last hidden state;
* the reference is the base itself: every adapter disabled (`no_adapter`); or, when PPO starts from an SFT
  adapter that was not merged, ``reference``: that adapter, frozen (the policy's adapter starts as its copy);
* ``reward``    the reward stage's adapter, frozen, with its score head (`AdapterRewardModel`), when the reward
  model was trained with LoRA on the same base.

PEFT's ``set_adapter`` would also switch ``requires_grad`` (only the active adapter trains), and one PPO
forward needs both adapters trainable: `use_adapter` only changes which adapter the LoRA layers apply.
``PeftModel.disable_adapter()`` has the same trap (leaving it calls ``set_adapter``, which froze the value
adapter after the first reference pass): `no_adapter` only flips the layers' switch.
Gradient checkpointing recomputes each layer during the backward pass, when another adapter may be
active; `adapter_aware_checkpointing` makes the recomputation use the adapter the forward used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rlhf_dist.rl.generation import text_config_of

POLICY, VALUE, REFERENCE, REWARD = "default", "value", "reference", "reward"


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Within the block, the LoRA layers of ``model`` apply adapter ``name`` only; trainability is left as it is."""
    layers = _tuner_layers(model)
    saved = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield model
    finally:
        for layer, active in zip(layers, saved):
            layer._active_adapter = active


@contextlib.contextmanager
def no_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the LoRA layers of ``model`` apply no adapter (the base model); trainability is left as it is."""
    layers = _tuner_layers(model)
    saved = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, saved):
            layer._disable_adapters = disabled


def adapter_aware_checkpointing(model: nn.Module) -> None:
    """Make every checkpointed layer recompute with the adapter that was active in its forward.

    Call after ``model.gradient_checkpointing_enable(...)``: it wraps the checkpoint function each layer
    was given (transformers' ``_gradient_checkpointing_func``).
    """
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or getattr(func, "_adapter_aware", False):
            continue
        layers = _tuner_layers(module)
        if not layers:
            continue

        def aware(fn, *args, _func=func, _layers=layers, **kwargs):
            active = [layer._active_adapter for layer in _layers]  # what this forward uses

            def replay(*a, **k):
                saved = [layer._active_adapter for layer in _layers]
                for layer, act in zip(_layers, active):
                    layer._active_adapter = act
                try:
                    return fn(*a, **k)
                finally:
                    for layer, act in zip(_layers, saved):
                        layer._active_adapter = act

            return _func(replay, *args, **kwargs)

        aware._adapter_aware = True
        module._gradient_checkpointing_func = aware


def copy_adapter(model: nn.Module, source: str, target: str) -> None:
    """Copy adapter ``source``'s LoRA weights into adapter ``target`` (same LoRA config)."""
    with torch.no_grad():
        for layer in _tuner_layers(model):
            for attr in layer.adapter_layer_names:
                sub = getattr(layer, attr)
                if source in sub:
                    for dst, src in zip(sub[target].parameters(), sub[source].parameters(), strict=True):
                        dst.copy_(src)


def make_trainable(model: nn.Module, names: tuple[str, ...]) -> None:
    """requires_grad on the LoRA weights of every adapter in ``names`` (PEFT leaves only the active one trainable)."""
    for layer in _tuner_layers(model):
        for attr in layer.adapter_layer_names:
            for key, sub in getattr(layer, attr).items():
                if key in names:
                    sub.requires_grad_(True)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a parameter holds, with the quantisation constants of a bitsandbytes 4-bit weight."""
    n = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    while state is not None and getattr(state, "absmax", None) is not None:
        n += state.absmax.numel() * state.absmax.element_size()
        state = getattr(state, "state2", None)
    return n


def unique_bytes(*modules: nn.Module | None) -> int:
    """Bytes of all parameters and buffers of ``modules``, each tensor counted once however often it is shared."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for t in (*module.parameters(), *module.buffers()):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += tensor_bytes(t)
    return total


def lora_bytes(model: nn.Module, name: str) -> int:
    """Bytes of adapter ``name``'s LoRA weights."""
    total = 0
    for layer in _tuner_layers(model):
        for attr in layer.adapter_layer_names:
            sub = getattr(layer, attr)
            if name in sub:
                total += sum(tensor_bytes(p) for p in sub[name].parameters())
    return total


class _AdapterBackbone(nn.Module):
    """The policy's transformer body run with one adapter. The policy is held by reference, not as a submodule:
    freezing or moving this module must not touch the policy."""

    def __init__(self, policy: nn.Module, adapter: str):
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        self.adapter = adapter

    def forward(self, **kwargs):
        inner = self._policy.get_base_model()
        with use_adapter(self._policy, self.adapter):
            return getattr(inner, inner.base_model_prefix)(**kwargs)


class AdapterRewardModel(nn.Module):
    """A reward model that is an adapter + score head on the policy's base: scored like a one-label
    ``*ForSequenceClassification`` (`rollout.sequence_scores` finds ``backbone`` and ``score``)."""

    base_model_prefix = "backbone"

    def __init__(self, policy: nn.Module, adapter: str, score: nn.Linear):
        super().__init__()
        self.backbone = _AdapterBackbone(policy, adapter)
        self.score = score
        text = text_config_of(policy)
        self.config = type("RewardConfig", (), {"num_labels": 1,
                                                "max_position_embeddings": getattr(text, "max_position_embeddings", None)})()


def load_reward_adapter(policy: nn.Module, path: str) -> AdapterRewardModel:
    """Put the reward stage's LoRA adapter (a sequence-classification adapter: LoRA weights + the score head) on the
    policy's base as the frozen adapter `REWARD`, and return the scorer."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(path)
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    policy.add_adapter(REWARD, config)
    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    heads = {k: weights.pop(k) for k in list(weights) if k.split(".")[-2] in ("score", "classifier")}
    if set(heads) - {"base_model.model.score.weight", "base_model.model.classifier.weight"} or len(heads) != 1:
        raise ValueError(f"{path}: expected one score head weight (score.weight) and no bias, found {sorted(heads)}")
    result = set_peft_model_state_dict(policy, weights, adapter_name=REWARD)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"{path}: the reward adapter does not fit the policy's base ({unexpected[:3]} ...)")
    head_weight = next(iter(heads.values()))
    score = nn.Linear(head_weight.shape[1], 1, bias=False, dtype=torch.float32)
    with torch.no_grad():
        score.weight.copy_(head_weight.float())
    for layer in _tuner_layers(policy):
        for attr in layer.adapter_layer_names:
            if REWARD in getattr(layer, attr):
                getattr(layer, attr)[REWARD].requires_grad_(False)
    score.register_forward_pre_hook(lambda module, args: tuple(a.to(module.weight.dtype) for a in args))  # 16-bit bodies
    return AdapterRewardModel(policy, REWARD, score.requires_grad_(False))
