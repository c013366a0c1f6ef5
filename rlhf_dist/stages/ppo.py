"""Stage `ppo`: RLHF with our own PPO loop (or the critic-free RLOO / GRPO baselines) on prompts.

Four models, built by `rlhf_dist.rl.models.build_ppo` (docs/ppo.md items 16-19): the policy (the SFT output, or
a LoRA adapter on it), a frozen reference (the SFT model; with LoRA the policy with its adapter disabled), a reward
model (default: this run's reward stage) or a Python function `module:function`, and a value function (from the
reward model by default; a value head or a value adapter; none for rloo / grpo). The loop is
`rlhf_dist.rl.trainer.PPOLoop`. Reported on held-out prompts, before and after: the mean score, the KL to the
reference, the response length and the EOS rate.

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

import json
import logging
import shutil
import types

from rlhf_dist import faults, rundir, watchdog
from rlhf_dist.errors import ConfigError, UserError
from rlhf_dist.rl.sources import composite, policy_base, reward_adapter_path, sft_adapter, text_config
from rlhf_dist.stages.common import StageContext, process_state

log = logging.getLogger("rlhf_dist")


def prompts(ctx: StageContext) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval) prompt token ids, as the length policy made them (rlhf_dist.lengths: prompts over
    max_prompt_length truncated on the left, skipped, or refused, as ppo.data.on_long_row says)."""
    return [list(x) for x in ctx.train["input_ids"]], [list(x) for x in ctx.eval["input_ids"]]


def reward_columns(cfg) -> list[str]:
    """The prompt data's other columns that the reward functions read (ppo.rewards' components, or ppo.reward_fn)."""
    from rlhf_dist.rewards.calling import declared_columns
    from rlhf_dist.rl.reward_fn import load_reward_fn

    rewards = composite(cfg)
    if rewards is not None:
        return rewards.columns
    return declared_columns(load_reward_fn(cfg.reward_fn))[0] if cfg.reward_fn else []


def columns(ctx: StageContext) -> tuple[dict[str, list], dict[str, list]]:
    """(train, eval) values of the prompt data's columns that the reward functions read."""
    names = reward_columns(ctx.cfg)
    return {c: list(ctx.train[c]) for c in names}, {c: list(ctx.eval[c]) for c in names}


def check(ctx: StageContext) -> None:
    """What can be wrong with the models' sources, the batch sizes and the prompts, before any weights load."""
    from rlhf_dist.rl.batching import check_batch_sizes
    from rlhf_dist.rl.generation import stop_token_ids

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
    train, evaluation = prompts(ctx)
    limit = getattr(text_config(policy_base(cfg), cfg), "max_position_embeddings", None)
    longest = max(len(p) for p in train + evaluation)
    if limit is not None and longest + a.max_new_tokens > limit:
        raise ConfigError(f"ppo: the longest prompt ({longest} tokens) + max_new_tokens ({a.max_new_tokens}) exceeds the "
                          f"policy's {limit} positions (max_position_embeddings); lower ppo.training.max_new_tokens or "
                          "ppo.training.max_prompt_length")
    _check_generation_config(cfg)
    rewards, needed = composite(cfg), reward_columns(cfg)
    for split, ds in (("train", ctx.train), ("eval", ctx.eval)):  # every column a reward function reads is there
        if rewards is not None:
            rewards.check_columns(ds.column_names, f"ppo.data ({split} split)")
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise ConfigError(f"ppo.reward_fn: {cfg.reward_fn} reads the column '{missing[0]}' of the prompt data "
                              f"({split} split), which has {', '.join(ds.column_names)}; add it, or map yours with "
                              f"ppo.data.columns: {{{missing[0]}: your_column}}")
    if len(train) < a.rollout_batch_size:
        raise ConfigError(f"ppo: {len(train)} training prompts are fewer than "
                          f"ppo.training.rollout_batch_size={a.rollout_batch_size}; lower it or add prompts")


def _check_generation_config(cfg) -> None:
    """The policy's generation_config.json must not reshape sampling (docs/ppo.md item 14); checked before loading weights."""
    from transformers import GenerationConfig

    from rlhf_dist.rl.generation import check_generation_config

    try:
        gen = GenerationConfig.from_pretrained(policy_base(cfg), revision=cfg.model.revision)
    except OSError:  # no generation_config.json: transformers' neutral defaults
        return
    try:
        check_generation_config(types.SimpleNamespace(generation_config=gen), {})
    except ValueError as exc:
        raise UserError(f"ppo: {policy_base(cfg)}/generation_config.json: {exc}") from None


def run(ctx: StageContext) -> dict:
    from rlhf_dist.rl.distributed import make_accelerator
    from rlhf_dist.rl.models import build_ppo, save_ppo
    from rlhf_dist.rl.trainer import PPOLoop

    a, cfg = ctx.cfg.training, ctx.cfg
    accelerator = make_accelerator(a, process_state().num_processes, text_config(policy_base(cfg), cfg).hidden_size)
    models = build_ppo(cfg, ctx.tokenizer, accelerator)
    mem = models.memory
    log.info("ppo: the models hold %.1f MiB; as separate models %.1f MiB (%.0f%% less)%s", mem["held_bytes"] / 2**20,
             mem["separate_bytes"] / 2**20, 100 * mem["saved_vs_separate"],
             "" if mem["saved_vs_separate_16bit"] <= 0 else  # only a saving is news (a 32-bit run holds more than 16-bit)
             f"; as four 16-bit models {mem['separate_16bit_bytes'] / 2**20:.1f} MiB "
             f"({100 * mem['saved_vs_separate_16bit']:.0f}% less)")
    work = ctx.final_dir.parent
    train_prompts, eval_prompts = prompts(ctx)
    train_columns, eval_columns = columns(ctx)
    loop = PPOLoop(a, accelerator, models.actor_critic, models.reference, models.reward, ctx.tokenizer, train_prompts,
                   eval_prompts, work, guardrails=cfg.guardrails, train_columns=train_columns, eval_columns=eval_columns)
    before_file = work / "before.json"
    if ctx.checkpoint and before_file.is_file():  # the starting policy's figures, measured by the first attempt
        before = json.loads(before_file.read_text())
    else:
        before = loop.evaluate()
        if accelerator.is_main_process:
            rundir.write_json(before_file, before)
    history = loop.train(resume_from=ctx.checkpoint)
    faults.point("trained")
    watchdog.set_phase("finish")  # the evaluation below, then saving the models
    after = loop.evaluate()
    save_ppo(loop, cfg, ctx.tokenizer, ctx.final_dir)
    if accelerator.is_main_process and (work / "samples.jsonl").exists():  # (TensorBoard: stages.common, every stage)
        shutil.copy2(work / "samples.jsonl", ctx.final_dir / "samples.jsonl")
    accelerator.wait_for_everyone()
    last = history[-1] if history else {}
    train = {"global_step": loop.step, "optimizer_steps": loop.optimizer_step,
             "distributed_type": str(accelerator.distributed_type.value), "zero_stage": loop.zero_stage,
             "final_kl": last.get("objective/kl"), "final_score": last.get("objective/scores"),
             "final_kl_coef": last.get("objective/kl_coef"), "reward_gain_bias": loop.gain_bias}
    # Prompts sampled from (each step takes rollout_batch_size of them, in epochs) and held-out prompts evaluated
    rows = {"train": len(train_prompts), "eval": min(len(eval_prompts), a.eval_max_prompts)}
    return {"before": before, "after": after, "train": train, "models": mem, "guardrails": loop.guard.summary(),
            "history": history, "rows": rows}
