"""The PPO stage's four models, built from its config alone: policy, reference, reward and value function, as the
stage, the benchmarks and the tests all build them (`build_ppo`); saving the trained ones (`save_ppo`); and what
they hold in memory (`model_memory`). docs/ppo.md items 16-19.

* policy     the starting model (full weights, or a fresh LoRA adapter on them with lora.enabled; an SFT adapter
             as init_from becomes the frozen reference and the policy's adapter starts as a copy of it);
* reference  a frozen copy of the starting model, or, with LoRA, the policy with its adapter disabled;
* reward     a one-label sequence classifier (its own tokenizer allowed: responses are decoded and re-encoded), the
             reward stage's adapter on the policy's base, or a Python function `module:function`;
* value      a sequence classifier initialised from the reward model (default), a value head on the policy
             (`value_head`), or its own adapter + head on the policy's base (LoRA); none for rloo / grpo.

With LoRA the policy, the reference and the value function share one base, loaded once (in 4 bit with QLoRA):
`rlhf_dist.rl.adapters`. Where the models come from is checked first, from configs only: `rlhf_dist.rl.sources`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf_dist import relocate
from rlhf_dist.models import base_config, load_causal_lm, load_frozen_reward_model, load_reward_model, load_tokenizer, peft_config
from rlhf_dist.rl.actor_critic import ActorCritic, ValueHead, hidden_size_of
from rlhf_dist.rl.adapters import (
    POLICY,
    REFERENCE,
    REWARD,
    VALUE,
    AdapterRewardModel,
    adapter_aware_checkpointing,
    copy_adapter,
    load_reward_adapter,
    lora_bytes,
    make_trainable,
    unique_bytes,
)
from rlhf_dist.rl.distributed import replicated_loading, untied
from rlhf_dist.rl.generation import disable_dropout
from rlhf_dist.rl.reward_fn import load_reward_fn
from rlhf_dist.rl.scoring import RewardSource
from rlhf_dist.rl.sources import composite, policy_base, reward_adapter_path, sft_adapter

log = logging.getLogger("rlhf_dist")


@dataclass
class PPOModels:
    """What `build_ppo` returns: the trainable policy + value function, the frozen reference (None: the policy with
    its adapter disabled), the reward source, and the bytes they hold (`model_memory`, kept in metrics.json)."""

    actor_critic: ActorCritic
    reference: nn.Module | None
    reward: RewardSource
    memory: dict


def _frozen(model, accelerator):
    """Eval mode, no grad, dropout off, on the device; under DeepSpeed in its 16-bit dtype (as the policy)."""
    disable_dropout(model)
    model.requires_grad_(False)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None and accelerator.mixed_precision != "no" and not quantized:
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[accelerator.mixed_precision])
    return model.eval().to(accelerator.device)


def build_ppo(cfg, tokenizer, accelerator) -> PPOModels:
    """The four PPO models of a PPO stage config (`config.ppo.PPOStageConfig`, its init_from and reward source
    resolved: `rl.sources.resolve_reward`), on the accelerator's device, with dropout off in all of them.

    With LoRA the policy, the reference (adapters disabled) and, by default, the value function (its own
    adapter + a value head) share one base, loaded once (in 4 bit with QLoRA): `rlhf_dist.rl.adapters`.
    """
    a = cfg.training
    base = policy_base(cfg)
    policy = load_causal_lm(base, cfg)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    reference = shared_reward = None
    lora = peft_config(cfg.lora, "CAUSAL_LM")
    value_adapter = None
    if lora is not None:
        from peft import PeftModel, get_peft_model

        adapter = sft_adapter(cfg)
        if adapter is None:  # reference = this model with the adapters disabled (the SFT weights are the base)
            policy = get_peft_model(policy, lora, adapter_name=POLICY)
        else:  # reference = the SFT adapter, frozen; the policy's adapter starts as a copy of it
            policy = PeftModel.from_pretrained(policy, adapter, adapter_name=REFERENCE)
            policy.add_adapter(POLICY, policy.peft_config[REFERENCE])
            copy_adapter(policy, REFERENCE, POLICY)
            log.info("ppo: %s is a LoRA adapter on %s: it is the frozen reference, and the policy's adapter starts "
                     "as a copy of it", adapter, base)
        if cfg.uses_value_adapter:
            policy.add_adapter(VALUE, peft_config(cfg.lora, "CAUSAL_LM"))
            value_adapter = VALUE
        shared_reward = reward_adapter_path(cfg)
        if shared_reward is not None:
            reward_tok = load_tokenizer(cfg.reward_model, cfg.model)
            if reward_tok.get_vocab() != tokenizer.get_vocab():
                shared_reward = None
        if shared_reward is not None:
            shared_reward = load_reward_adapter(policy, shared_reward)
            log.info("ppo: the reward model is its adapter (%s/adapter) on the policy's base: one base for all four "
                     "models", cfg.reward_model)
        policy.set_adapter(POLICY)
        make_trainable(policy, (POLICY, VALUE))  # PEFT leaves only the active adapter trainable
    else:
        with replicated_loading():
            reference = _frozen(load_causal_lm(base, cfg), accelerator)
    disable_dropout(policy)
    if a.activation_checkpointing:  # recompute activations in the backward pass: less memory, ~30% more time
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if value_adapter is not None:
            adapter_aware_checkpointing(policy)

    rewards = composite(cfg)  # ppo.rewards: functions and/or the reward model, weighted
    if cfg.reward_fn:
        reward = RewardSource(fn=load_reward_fn(cfg.reward_fn), fn_name=cfg.reward_fn)
    elif rewards is not None and not rewards.needs_model:
        reward = RewardSource(composite=rewards)
    elif shared_reward is not None:
        rm = _frozen(shared_reward, accelerator)
        reward = RewardSource(model=rm, tokenizer=None, max_length=rm.config.max_position_embeddings, composite=rewards)
    else:
        reward_tok = load_tokenizer(cfg.reward_model, cfg.model)
        same = reward_tok.get_vocab() == tokenizer.get_vocab() and reward_tok.eos_token == tokenizer.eos_token
        with replicated_loading():
            rm = _frozen(load_frozen_reward_model(cfg.reward_model, cfg, reward_tok), accelerator)
        reward = RewardSource(model=rm, tokenizer=None if same else reward_tok,
                              max_length=getattr(rm.config, "max_position_embeddings", None), composite=rewards)
        if not same:
            log.info("ppo: the reward model's tokenizer differs from the policy's; responses are decoded and re-encoded")

    value_model = value_head = None
    if a.advantage_estimator == "gae":
        if cfg.value_head or value_adapter is not None:
            value_head = ValueHead(hidden_size_of(policy), seed=a.seed)
        else:
            # The value model reads the policy's tokens: it can start from the reward model only if that
            # shares the policy's tokenizer; otherwise it starts from the policy, with a new head.
            shares_tokens = reward.model is not None and reward.tokenizer is None
            source = cfg.value_model or (cfg.reward_model if shares_tokens else base)
            if source == base:
                log.info("ppo: the value model starts from the policy with a new head (no reward model with the "
                         "policy's tokenizer to start from)")
            value_model = load_reward_model(source, cfg, tokenizer)
            value_lora = peft_config(cfg.lora, "SEQ_CLS")
            if value_lora is not None:
                from peft import get_peft_model

                value_model = get_peft_model(value_model, value_lora)
            disable_dropout(value_model)
            if a.activation_checkpointing:
                value_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    actor_critic = ActorCritic(policy, a.temperature, value_model, value_head, value_adapter)
    return PPOModels(actor_critic, reference, reward, model_memory(actor_critic, reference, reward.model))


def model_memory(actor_critic, reference, reward_model) -> dict:
    """Bytes the PPO models hold as loaded (shared tensors counted once) against separate models.

    ``separate_bytes``: each role on its own at the precision it was loaded in (policy = base + its adapter,
    reference = base, value = base + value adapter + head, or the value model; reward); ``separate_16bit_bytes``:
    policy, reference, value and reward as four full 16-bit models (a value adapter counts as a value model the
    size of the base). Logged, and kept in metrics.json.
    """
    ac = actor_critic
    peft = hasattr(ac.policy, "peft_config")
    adapters = {name: lora_bytes(ac.policy, name) for name in (ac.policy.peft_config if peft else ())}
    base_model = ac.policy.get_base_model() if peft else ac.policy
    base = unique_bytes(base_model) - sum(adapters.values())
    n_base = sum(_logical_numel(p) for name, p in base_model.named_parameters() if "lora_" not in name)
    reference_bytes = base + adapters.get(REFERENCE, 0) if reference is None else unique_bytes(reference)
    if isinstance(reward_model, AdapterRewardModel):  # an adapter + head on the policy's base
        reward, n_reward = base + adapters[REWARD] + unique_bytes(reward_model), n_base
    else:
        reward = unique_bytes(reward_model)
        n_reward = sum(_logical_numel(p) for p in reward_model.parameters()) if reward_model is not None else 0
    if ac.value_model is not None:
        value, n_value = unique_bytes(ac.value_model), sum(_logical_numel(p) for p in ac.value_model.parameters())
    elif ac.value_adapter is not None:
        value, n_value = base + adapters[ac.value_adapter] + unique_bytes(ac.value_head), n_base
    elif ac.value_head is not None:  # on the policy's own pass: only the head is extra
        value, n_value = unique_bytes(ac.value_head), 0
    else:
        value, n_value = 0, 0
    held = unique_bytes(ac, reference, reward_model)
    separate = base + adapters.get(POLICY, 0) + reference_bytes + value + reward
    separate_16bit = 2 * (2 * n_base + n_value + n_reward)
    return {"held_bytes": held, "separate_bytes": separate, "separate_16bit_bytes": separate_16bit,
            "saved_vs_separate": round(1 - held / separate, 4), "saved_vs_separate_16bit": round(1 - held / separate_16bit, 4)}


def _logical_numel(p) -> int:
    """Number of weights a parameter stands for (a bitsandbytes 4-bit weight packs two per byte)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def save_ppo(loop, cfg, tokenizer, out: Path) -> None:
    """The trained policy (merged with LoRA, plus adapter/), value model, adapter or head, and the tokenizer into
    `out`, as safetensors (the main process writes; every process takes part under ZeRO-3)."""
    from safetensors.torch import save_file

    acc = loop.accelerator
    state = acc.get_state_dict(loop.model)  # full weights on the main process, also under ZeRO-3
    if not acc.is_main_process:
        return
    model = loop.unwrapped
    part = {name: untied(getattr(model, name), {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
            for name in ("policy", "value_model", "value_head")}
    if hasattr(model.policy, "peft_config"):
        from peft import PeftModel, get_peft_model_state_dict

        model.policy.save_pretrained(str(out / "adapter"), state_dict=part["policy"], selected_adapters=[POLICY],
                                     safe_serialization=True)
        relocate.fix_adapter_config(out / "adapter")  # the base stored relative to the run: a moved run still loads
        if model.value_adapter is not None:  # value_adapter/: the value function's adapter (its head: value_head.safetensors)
            (out / "value_adapter").mkdir(parents=True, exist_ok=True)
            weights = get_peft_model_state_dict(model.policy, state_dict=part["policy"], adapter_name=model.value_adapter)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "value_adapter" / "adapter_model.safetensors"))
            model.policy.peft_config[model.value_adapter].save_pretrained(str(out / "value_adapter"))
            relocate.fix_adapter_config(out / "value_adapter")
        if cfg.lora.merge:  # reload the base unquantised, apply the adapter, merge
            with replicated_loading():  # only this process loads it: no ZeRO-3 collectives
                base = load_causal_lm(policy_base(cfg), base_config(cfg))
            PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload().save_pretrained(
                str(out), safe_serialization=True)
    else:
        model.policy.save_pretrained(str(out), state_dict=part["policy"], safe_serialization=True)
    if model.value_model is not None:
        model.value_model.save_pretrained(str(out / "value_model"), state_dict=part["value_model"], safe_serialization=True)
    if model.value_head is not None:
        save_file({k: v.contiguous() for k, v in part["value_head"].items()}, str(out / "value_head.safetensors"))
    tokenizer.save_pretrained(str(out))
