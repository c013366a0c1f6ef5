"""Stage `ppo`: RLHF with our own PPO loop (or the critic-free RLOO / GRPO baselines) on prompts.

Four models (docs/ppo.md items 16-19; dropout off in all of them):

* policy     the SFT output (full weights, or a fresh LoRA adapter on them with lora.enabled);
* reference  a frozen copy of the SFT model, or, with LoRA, the policy with its adapter disabled
             (the SFT weights are the base, so that IS the SFT model);
* reward     a one-label sequence classifier (default: this run's reward stage; it may use another
             tokenizer: responses are decoded and re-encoded), or a Python function `module:function`;
* value      a sequence classifier initialised from the reward model (default), or a value head on
             the policy (`ppo.value_head: true`); none with advantage_estimator rloo / grpo.

The loop itself is `rlhf_dist.rl.trainer.PPOTrainer`. Reported on held-out prompts, before and after:
the mean score, the KL to the reference, the response length and the EOS rate.

    rlhf-dist ppo --recipe demo --output runs/demo
    accelerate launch --multi_gpu --num_processes 8 -m rlhf_dist ppo --recipe my.yaml --output runs/x
    accelerate launch --config_file launch/zero3.yaml -m rlhf_dist ppo --recipe my.yaml --output runs/x
    rlhf-dist ppo --recipe my.yaml --output runs/x ppo.reward_fn=my_pkg.rewards:score ppo.training.kl_coef=0.02

On Slurm, the same command runs inside the sbatch templates of slurm/.
Writes OUTPUT/ppo: the policy (safetensors; plus `adapter/` with LoRA), `value_model/` (or
`value_head.safetensors`), tokenizer, config.yaml, metrics.json, log_history.json (every step),
samples.jsonl, tensorboard/, training.png, README.md. `--resume` continues from the last checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import types

import torch

from rlhf_dist import faults, relocate, rundir, watchdog
from rlhf_dist.errors import ConfigError, UserError
from rlhf_dist.models import base_config, load_causal_lm, load_frozen_reward_model, load_reward_model, load_tokenizer, peft_config
from rlhf_dist.rl.distributed import make_accelerator, replicated_loading, untied
from rlhf_dist.rl.sources import (  # noqa: F401 - resolve_reward, check_classifier: part of this stage's interface
    check_classifier,
    policy_base,
    resolve_reward,
    reward_adapter_path,
    sft_adapter,
    text_config,
)
from rlhf_dist.stages.common import StageContext, process_state, stage_main

STAGE, DATA_KIND = "ppo", "prompts"
log = logging.getLogger("rlhf_dist")


# ---------------------------------------------------------------------------------------------
# Checks, before any model is loaded (the model sources themselves: rlhf_dist.rl.sources)
# ---------------------------------------------------------------------------------------------

def encode_prompts(prompts: list, tokenizer) -> list[list[int]]:
    """Token ids of each prompt (chat template with the generation prompt for message lists)."""
    from rlhf_dist.lengths import token_ids

    return [token_ids(tokenizer, p, generation_prompt=True) for p in prompts]


def check(ctx: StageContext) -> None:
    from rlhf_dist.rl.batching import check_batch_sizes
    from rlhf_dist.rl.trainer import stop_token_ids

    cfg, a = ctx.cfg, ctx.cfg.training
    if sft_adapter(cfg) is not None:  # the SFT adapter becomes the frozen reference and the policy's starting point
        from rlhf_dist.models import check_model_path

        if not cfg.lora.enabled:
            raise UserError(f"ppo: {cfg.init_from} is a LoRA adapter; set ppo.lora.enabled: true (the adapter is then the "
                            "frozen reference and the policy's starting point) or merge it into its base (sft lora.merge: true)")
        check_model_path(policy_base(cfg), f"{cfg.init_from}/adapter_config.json base_model_name_or_path", cfg.model)
    reward_adapter_path(cfg)  # an explicit ppo.reward_adapter: true that cannot be met fails here
    if cfg.value_adapter and not cfg.lora.enabled:
        raise ConfigError("ppo.value_adapter: the value adapter sits on the policy's LoRA base; set ppo.lora.enabled: true, "
                          "or use ppo.value_head / ppo.value_model")
    try:
        check_batch_sizes(a, process_state().num_processes)
        stop_token_ids(ctx.tokenizer, a.stop_tokens, a.ignore_eos)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # Token ids from the length policy (rlhf_dist.lengths: prompts over max_prompt_length truncated on the left,
    # skipped, or refused, as ppo.data.on_long_row says)
    encoded = [list(x) for x in ctx.train["input_ids"]] + [list(x) for x in ctx.eval["input_ids"]]
    ctx.extra["train_prompts"], ctx.extra["eval_prompts"] = encoded[:len(ctx.train)], encoded[len(ctx.train):]
    limit = getattr(text_config(policy_base(cfg), cfg), "max_position_embeddings", None)
    longest = max(len(p) for p in encoded)
    if limit is not None and longest + a.max_new_tokens > limit:
        raise ConfigError(f"ppo: the longest prompt ({longest} tokens) + max_new_tokens ({a.max_new_tokens}) exceeds the "
                          f"policy's {limit} positions (max_position_embeddings); lower ppo.training.max_new_tokens or "
                          "ppo.training.max_prompt_length")
    _check_generation_config(cfg)
    if len(ctx.extra["train_prompts"]) < a.rollout_batch_size:
        raise ConfigError(f"ppo: {len(ctx.extra['train_prompts'])} training prompts are fewer than "
                          f"ppo.training.rollout_batch_size={a.rollout_batch_size}; lower it or add prompts")


def _check_generation_config(cfg) -> None:
    """The policy's generation_config.json must not reshape sampling (docs/ppo.md item 14); checked before loading weights."""
    from transformers import GenerationConfig

    from rlhf_dist.rl.rollout import _check_generation_config as check_sampling

    try:
        gen = GenerationConfig.from_pretrained(policy_base(cfg), revision=cfg.model.revision)
    except OSError:  # no generation_config.json: transformers' neutral defaults
        return
    try:
        check_sampling(types.SimpleNamespace(generation_config=gen), {})
    except ValueError as exc:
        raise UserError(f"ppo: {policy_base(cfg)}/generation_config.json: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def _frozen(model, accelerator):
    """Eval mode, no grad, dropout off, on the device; under DeepSpeed in its 16-bit dtype (as the policy)."""
    from rlhf_dist.rl.rollout import disable_dropout

    disable_dropout(model)
    model.requires_grad_(False)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None and accelerator.mixed_precision != "no" and not quantized:
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[accelerator.mixed_precision])
    return model.eval().to(accelerator.device)


def build_models(ctx: StageContext, accelerator):
    """(actor_critic, reference or None, RewardSource) on the accelerator's device.

    With LoRA the policy, the reference (adapters disabled) and, by default, the value function (its own
    adapter + a value head) share one base, loaded once (in 4 bit with QLoRA): `rlhf_dist.rl.adapters`.
    """
    from rlhf_dist.rl.actor_critic import ActorCritic, ValueHead, hidden_size_of
    from rlhf_dist.rl.adapters import (
        POLICY,
        REFERENCE,
        VALUE,
        adapter_aware_checkpointing,
        copy_adapter,
        load_reward_adapter,
        make_trainable,
    )
    from rlhf_dist.rl.reward_fn import load_reward_fn
    from rlhf_dist.rl.rollout import disable_dropout
    from rlhf_dist.rl.trainer import RewardSource

    cfg, a = ctx.cfg, ctx.cfg.training
    base = policy_base(cfg)
    policy = load_causal_lm(base, cfg)
    policy.generation_config.pad_token_id = ctx.tokenizer.pad_token_id
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
            if reward_tok.get_vocab() != ctx.tokenizer.get_vocab():
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

    if cfg.reward_fn:
        reward = RewardSource(fn=load_reward_fn(cfg.reward_fn), fn_name=cfg.reward_fn)
    elif shared_reward is not None:
        rm = _frozen(shared_reward, accelerator)
        reward = RewardSource(model=rm, tokenizer=None, max_length=rm.config.max_position_embeddings)
    else:
        reward_tok = load_tokenizer(cfg.reward_model, cfg.model)
        same = reward_tok.get_vocab() == ctx.tokenizer.get_vocab() and reward_tok.eos_token == ctx.tokenizer.eos_token
        with replicated_loading():
            rm = _frozen(load_frozen_reward_model(cfg.reward_model, cfg, reward_tok), accelerator)
        reward = RewardSource(model=rm, tokenizer=None if same else reward_tok,
                              max_length=getattr(rm.config, "max_position_embeddings", None))
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
            value_model = load_reward_model(source, cfg, ctx.tokenizer)
            value_lora = peft_config(cfg.lora, "SEQ_CLS")
            if value_lora is not None:
                from peft import get_peft_model

                value_model = get_peft_model(value_model, value_lora)
            disable_dropout(value_model)
            if a.activation_checkpointing:
                value_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    actor_critic = ActorCritic(policy, a.temperature, value_model, value_head, value_adapter)
    ctx.extra["memory"] = model_memory(actor_critic, reference, reward.model)
    return actor_critic, reference, reward


def model_memory(actor_critic, reference, reward_model) -> dict:
    """Bytes the PPO models hold as loaded (shared tensors counted once) against separate models.

    ``separate_bytes``: each role on its own at the precision it was loaded in (policy = base + its adapter,
    reference = base, value = base + value adapter + head, or the value model; reward); ``separate_16bit_bytes``:
    policy, reference, value and reward as four full 16-bit models (a value adapter counts as a value model the
    size of the base). Logged, and kept in metrics.json.
    """
    from rlhf_dist.rl.adapters import POLICY, REFERENCE, REWARD, AdapterRewardModel, lora_bytes, unique_bytes

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


def save_final(trainer, ctx: StageContext) -> None:
    """Policy (merged with LoRA, plus adapter/), value model or head, tokenizer: safetensors, main process."""
    from safetensors.torch import save_file

    cfg, acc, out = ctx.cfg, trainer.accelerator, ctx.final_dir
    state = acc.get_state_dict(trainer.model)  # full weights on the main process, also under ZeRO-3
    if not acc.is_main_process:
        return
    model = trainer.unwrapped
    part = {name: untied(getattr(model, name), {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
            for name in ("policy", "value_model", "value_head")}
    if hasattr(model.policy, "peft_config"):
        from peft import PeftModel, get_peft_model_state_dict

        from rlhf_dist.rl.adapters import POLICY

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
    ctx.tokenizer.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def run(ctx: StageContext) -> dict:
    from rlhf_dist.rl.trainer import PPOTrainer

    a, cfg = ctx.cfg.training, ctx.cfg
    accelerator = make_accelerator(a, process_state().num_processes, text_config(policy_base(cfg), cfg).hidden_size)
    actor_critic, reference, reward = build_models(ctx, accelerator)
    mem = ctx.extra["memory"]
    log.info("ppo: the models hold %.1f MiB; as separate models %.1f MiB (%.0f%% saved), as four 16-bit models %.1f MiB "
             "(%.0f%% saved)", mem["held_bytes"] / 2**20, mem["separate_bytes"] / 2**20, 100 * mem["saved_vs_separate"],
             mem["separate_16bit_bytes"] / 2**20, 100 * mem["saved_vs_separate_16bit"])
    work = ctx.final_dir.parent
    trainer = PPOTrainer(a, accelerator, actor_critic, reference, reward, ctx.tokenizer, ctx.extra["train_prompts"],
                         ctx.extra["eval_prompts"], work, guardrails=cfg.guardrails)
    before_file = work / "before.json"
    if ctx.checkpoint and before_file.is_file():  # the starting policy's figures, measured by the first attempt
        import json

        before = json.loads(before_file.read_text())
    else:
        before = trainer.evaluate()
        if accelerator.is_main_process:
            rundir.write_json(before_file, before)
    history = trainer.train(resume_from=ctx.checkpoint)
    faults.point("trained")
    watchdog.set_phase("finish")  # the evaluation below, then saving the models
    after = trainer.evaluate()
    save_final(trainer, ctx)
    if accelerator.is_main_process:
        if (work / "samples.jsonl").exists():  # (the TensorBoard folder is copied by stages.common, as for every stage)
            shutil.copy2(work / "samples.jsonl", ctx.final_dir / "samples.jsonl")
    accelerator.wait_for_everyone()
    last = history[-1] if history else {}
    train = {"global_step": trainer.step, "optimizer_steps": trainer.optimizer_step,
             "distributed_type": str(accelerator.distributed_type.value), "zero_stage": trainer.zero_stage,
             "final_kl": last.get("objective/kl"), "final_score": last.get("objective/scores"),
             "final_kl_coef": last.get("objective/kl_coef")}
    # Prompts sampled from (each step takes rollout_batch_size of them, in epochs) and held-out prompts evaluated
    rows = {"train": len(ctx.extra["train_prompts"]), "eval": min(len(ctx.extra["eval_prompts"]), a.eval_max_prompts)}
    return {"before": before, "after": after, "train": train, "models": ctx.extra["memory"],
            "guardrails": trainer.guard.summary(), "history": history, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, DATA_KIND, run, argv, check=check)


if __name__ == "__main__":
    raise SystemExit(main())
