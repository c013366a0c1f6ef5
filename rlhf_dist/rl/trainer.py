"""Our PPO loop for language models: sharded rollouts, global statistics, minibatch epochs.

One `PPOLoop.train_step` reads as the algorithm (Ziegler et al. 2019; Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO"):

    1. rollout      every process samples responses for ITS shard of the step's prompts and runs the
                    batched forwards: policy log-probs and values, reference log-probs, scores
    2. gather       the step's rollouts are gathered, so every process holds all of them (a few MB of
                    token ids and floats) and computes the same global statistics below
    3. score        optional running normalisation and clipping of the scores (docs/ppo.md item 8)
    4. reward       per-token reward: -beta * KL on every token, the score on the last one (items 5-7);
                    with GRPO the KL is a loss term instead (DeepSeekMath), the reward only the score
    5. advantages   GAE over response tokens (value model), or a group baseline (RLOO/GRPO)
    6. whiten       over every valid token of the step (item 10)
    7. update       ppo_epochs x shuffled minibatches; each process takes its slice of each minibatch,
                    micro-batches accumulate; clipped policy and value losses, entropy bonus (items 11, 12)
    8. log          docs/ppo.md item 23's metrics, reduced over processes; KL controller update

Why 2 processes compute what 1 does (the test suite checks it, for DDP and ZeRO-2/3):

* the prompts of a step are the same on every process count (one seeded order); process r takes the
  r-th contiguous block, and the blocks concatenate back into the one-process order;
* sampling randomness belongs to a generation chunk, not to a process: chunk c of step s is
  sampled with seed f(seed, s, c), so chunk c is the same whichever process generates it, and
  processes sample differently because they hold different chunks (item 22);
* every statistic is computed on the gathered step, and a minibatch's loss is normalised by the
  token (or sequence) count of the WHOLE minibatch, scaled so that the gradient averaging of
  DDP/DeepSpeed and of gradient accumulation yields the one-process minibatch gradient;
* every process runs the same number of generate/forward/backward calls (equal shards, checked
  up front), so no process waits on a collective another one skipped (item 20).

Under DeepSpeed ZeRO-3 generation uses ``synced_gpus=True`` (item 21): each layer's parameters are
gathered as it runs and every process keeps stepping until all have finished. We chose it over
gathering the whole model around ``generate`` because it never needs the full model on one GPU,
which is the reason to use ZeRO-3; the price is more communication per generated token.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from rlhf_dist import faults, preempt, watchdog
from rlhf_dist.rl import checkpoint, guardrails, objective
from rlhf_dist.rl.actor_critic import ActorCritic
from rlhf_dist.rl.advantages import (
    gae,
    group_baseline,
    masked_mean,
    reinforce_pp_advantages,
    sequence_advantages_to_tokens,
    whiten,
)
from rlhf_dist.rl.batch import RolloutBatch, gather_batch
from rlhf_dist.rl.batching import check_batch_sizes
from rlhf_dist.rl.distributed import WeightedMeans, max_over_processes, zero_stage
from rlhf_dist.rl.guardrails import Guardrails
from rlhf_dist.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_dist.rl.losses import explained_variance
from rlhf_dist.rl.optim import build_optimizer, lr_factor
from rlhf_dist.rl.rewards import (
    RunningMoments,
    apply_gain_bias,
    fit_gain_bias,
    kl_shaped_rewards,
    normalize_scores,
    overlong_penalty,
)
from rlhf_dist.rl.sampler import RolloutSampler, component_means, derived_seed
from rlhf_dist.rl.scoring import RewardSource, decode_pairs
from rlhf_dist.rl.tracking import Tracker

log = logging.getLogger("rlhf_dist")


class PPOLoop:
    """PPO (or RLOO/GRPO) on prompts; see the module docstring for the phases.

    Args:
        args: `rlhf_dist.config.ppo.PPOTrainingConfig`.
        accelerator: an ``accelerate.Accelerator`` whose ``gradient_accumulation_steps`` is
            `micro_batches_per_process(args, world)` (`rlhf_dist.rl.distributed.make_accelerator` builds it).
        actor_critic: the trainable `ActorCritic` (not yet prepared).
        reference: frozen reference model, or None = the policy with its LoRA adapter disabled.
        reward: the `RewardSource`.
        tokenizer: the policy's tokenizer.
        train_prompts, eval_prompts: token id lists (already checked against max_prompt_length).
        work_dir: where checkpoints and logs go.
        guardrails: `rlhf_dist.config.ppo.GuardrailsConfig` (default: its defaults), see `rlhf_dist.rl.guardrails`.
        train_columns, eval_columns: the prompt rows' other columns (name -> one value per prompt) that reward
            functions read (e.g. a reference answer), or None.

    `rlhf_dist.rl.models.build_ppo` builds actor_critic, reference and reward from a PPO stage config.
    """

    def __init__(self, args, accelerator, actor_critic: ActorCritic, reference: nn.Module | None, reward: RewardSource,
                 tokenizer, train_prompts: list[list[int]], eval_prompts: list[list[int]], work_dir: Path,
                 guardrails=None, train_columns: dict[str, list] | None = None,
                 eval_columns: dict[str, list] | None = None):
        self.args, self.accelerator, self.reward = args, accelerator, reward
        self.tokenizer, self.train_prompts, self.eval_prompts = tokenizer, train_prompts, eval_prompts
        self.train_columns, self.eval_columns = train_columns or {}, eval_columns or {}
        self.work_dir = Path(work_dir)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.pad_id = tokenizer.pad_token_id
        check_batch_sizes(args, self.world)
        self.steps_per_epoch = len(train_prompts) // args.rollout_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train_prompts)} training prompts are fewer than training.rollout_batch_size="
                             f"{args.rollout_batch_size}; lower it or add prompts")
        self.max_steps = args.max_steps or self.steps_per_epoch * args.num_train_epochs
        self.rollouts_per_step = args.rollout_batch_size * args.samples_per_prompt
        self.minibatches = self.rollouts_per_step // args.mini_batch_size
        self.optimizer_steps = self.max_steps * args.ppo_epochs * self.minibatches
        self.kl_in_loss = args.kl_in_loss
        self.zero_stage = zero_stage(accelerator)
        self.deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None

        self.optimizer = build_optimizer(actor_critic, args, self.deepspeed)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.raw_optimizer = self.optimizer
        self.model, self.optimizer = accelerator.prepare(actor_critic, self.optimizer)
        self.reference = reference
        self.sampler = RolloutSampler(args, accelerator, self.model, reference, reward, tokenizer, self.zero_stage)
        self.stop_ids = self.sampler.stop_ids
        # Policy and value passes share no trainable weight (separate value model, or its own adapter on a frozen base),
        # so their backwards can run one after the other: the same gradients, half the activations alive at the peak.
        separate_value = actor_critic.has_value and not actor_critic.values_need_policy_pass
        self.split_backward = bool(separate_value and self.world == 1 and not self.deepspeed and args.split_backward is not False)
        if args.split_backward and not self.split_backward:
            log.info("training.split_backward is on, but the policy and value passes run as one here (several "
                     "processes, DeepSpeed, or a value head on the policy's own pass)")
        if args.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)
        self.moments = RunningMoments()
        self.gain_bias: tuple[float, float] | None = None  # fitted once on the initial policy (reward_gain_bias)
        self.step = 0
        self.optimizer_step = 0
        if guardrails is None:
            from rlhf_dist.config.ppo import GuardrailsConfig

            guardrails = GuardrailsConfig()
        self.guard = Guardrails(guardrails, args.max_new_tokens, args.ignore_eos)
        self.guard_events = []  # events of the step in progress (the optimizer's), handled after it

    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    def _lr_scale(self, opt_step: int) -> float:
        """The learning rates' factor at optimizer step `opt_step`: the schedule times the guardrails' scale."""
        a = self.args
        return lr_factor(opt_step, a.warmup_steps, self.optimizer_steps, a.lr_scheduler_type) * self.guard.lr_scale

    def _set_lr(self) -> None:
        for group, base in zip(self.raw_optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self._lr_scale(self.optimizer_step)

    def step_prompts(self, step: int, refill: int = 0) -> list[list[int]]:
        """This process's prompts for PPO step ``step`` (1-based), each repeated samples_per_prompt times."""
        return self.prompts_of(self.step_rows(step, refill))[0]

    def prompts_of(self, rows: list[int]) -> tuple[list[list[int]], dict[str, list]]:
        """The training prompts `rows` and their other columns (for the reward functions that read them)."""
        return ([self.train_prompts[i] for i in rows],
                {name: [values[i] for i in rows] for name, values in self.train_columns.items()})

    def step_rows(self, step: int, refill: int = 0) -> list[int]:
        """This process's training prompts (indices) for PPO step ``step``, each repeated samples_per_prompt times.
        `refill` > 0: dynamic sampling's refill round `refill` (another seeded draw of rollout_batch_size prompts)."""
        a = self.args
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        seed = derived_seed(a.seed, step, refill, 2) if refill else derived_seed(a.seed, epoch)
        order = torch.randperm(len(self.train_prompts), generator=torch.Generator().manual_seed(seed))
        index = 0 if refill else index
        global_rows = order[index * a.rollout_batch_size:(index + 1) * a.rollout_batch_size].tolist()
        per_process = a.rollout_batch_size // self.world
        mine = global_rows[self.rank * per_process:(self.rank + 1) * per_process]
        return [i for i in mine for _ in range(a.samples_per_prompt)]

    def rollout(self, prompts: list[list[int]], seed_parts: tuple[int, ...],
                columns: dict[str, list] | None = None) -> RolloutBatch:
        """Phase 1 for ``prompts`` (this process's share): `RolloutSampler.rollout`."""
        return self.sampler.rollout(prompts, seed_parts, self.step, columns)

    # -- one PPO step ------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[dict[str, float], RolloutBatch]:
        a, acc = self.args, self.accelerator
        started = time.perf_counter()

        # 1. rollout: this process's shard of the step's prompts
        prompts, columns = self.prompts_of(self.step_rows(step))
        local = self.rollout(prompts, (a.seed, step), columns)
        rollout_seconds = time.perf_counter() - started
        # 2. gather: every process now holds the whole step (identical tensors everywhere)
        with watchdog.phase("gather", step):
            batch = gather_batch(acc, local, self.pad_id)
        sampling = {}
        if a.dynamic_sampling:  # DAPO: groups of equal scores dropped and refilled (the same decisions on every process)
            batch, sampling = self.sampler.dynamic_sampling(batch, lambda r: self.prompts_of(self.step_rows(step, r)),
                                                            (a.seed, step), step)
            rollout_seconds = time.perf_counter() - started  # the refill rounds too (and their gathers)
        mask = batch.response_mask

        # 3. score: the fixed gain/bias, DAPO's overlong shaping, optional running normalisation and clipping (item 8)
        scores = batch.scores
        if self.gain_bias is not None:
            scores = apply_gain_bias(scores, *self.gain_bias)
        if a.overlong_buffer:
            overlong = a.overlong_penalty_factor * overlong_penalty(mask.sum(1), a.max_new_tokens, a.overlong_buffer,
                                                                    scores.dtype)
            scores = scores + overlong
            sampling["objective/overlong_penalty"] = float(overlong.mean())
        if a.reward_normalization:
            self.moments.update(scores)
        scores = normalize_scores(scores, self.moments if a.reward_normalization else None, a.reward_clip)

        # 4. KL-shaped per-token reward: -beta * kl_t on every token, score (- EOS penalty) on the last (items 5-7).
        #    GRPO keeps the KL out of the reward (a k3 loss term in the update, as in DeepSeekMath): normalising
        #    beta * KL differences inside a group whose scores are all equal would turn KL noise into full-size
        #    advantages.
        kl = kl_estimate(batch.logprobs, batch.ref_logprobs, a.kl_estimator, a.kl_clamp, mask)
        beta = self.kl_ctl.value
        rewards, reward_stats = kl_shaped_rewards(scores, kl, mask, 0.0 if self.kl_in_loss else beta,
                                                  a.missing_eos_penalty, batch.ended)

        # 5. advantages: GAE with the value model, REINFORCE++'s whitened returns, or a baseline from the other samples
        #    of the prompt
        returns = None
        if a.advantage_estimator == "gae":
            advantages, returns = gae(rewards, batch.values, mask, a.gamma, a.lam)
        elif a.advantage_estimator in ("reinforce_pp", "reinforce_pp_baseline"):
            final = scores - (a.missing_eos_penalty or 0.0) * (~batch.ended).to(scores.dtype)  # the score on the last token
            group = {"scores": final, "group_size": a.samples_per_prompt} if a.advantage_estimator.endswith("baseline") else {}
            advantages = reinforce_pp_advantages(rewards, mask, a.gamma, **group)
        else:
            sequence_reward = rewards.sum(dim=1)  # score - beta * sum_t kl_t
            advantages = sequence_advantages_to_tokens(
                group_baseline(sequence_reward, a.samples_per_prompt, a.advantage_estimator), mask)

        # 6. whiten over every valid token of the step (all processes hold all of it: item 10)
        if a.whiten_advantages:
            advantages = whiten(advantages, mask)

        # 7. ppo_epochs x minibatches
        update_started = time.perf_counter()
        faults.point("step", step)
        with watchdog.phase("update", step):
            train_stats = self.update(step, batch, advantages, returns, beta)
        update_seconds = time.perf_counter() - update_started

        # 8. log, and adapt beta to this step's KL (Ziegler et al.; a no-op for a fixed coefficient)
        self.kl_ctl.update(reward_stats["kl"], len(batch))
        lengths = mask.sum(1).float()
        generated_tokens = float(lengths.sum())
        rollout_seconds_all = max_over_processes(acc, rollout_seconds)
        metrics = {
            "objective/scores": float(batch.scores.float().mean()),
            "objective/scores_std": float(batch.scores.float().std()) if len(batch) > 1 else 0.0,
            "objective/kl": reward_stats["kl"],
            "objective/kl_coef": beta,
            "objective/non_score_reward": reward_stats["non_score_reward"],
            "objective/rlhf_reward": reward_stats["rlhf_reward"],
            "policy/entropy": float(masked_mean(batch.entropy, mask)),
            **component_means(self.reward, batch.components),
            **sampling,
            **train_stats,
            "rollout/response_length": float(lengths.mean()),
            "rollout/eos_rate": float(batch.ended.float().mean()),
            "rollout/tokens_per_second": generated_tokens / max(rollout_seconds_all, 1e-9),
            "train/samples_per_second": len(batch) / max(time.perf_counter() - started, 1e-9),  # rollout + update
            "time/rollout": rollout_seconds_all,
            "time/update": update_seconds,
            "time/step": time.perf_counter() - started,
            "train/samples": step * len(batch),
        }
        if returns is not None:
            metrics["value/explained_variance"] = explained_variance(batch.values, returns, mask)
        return metrics, batch

    # -- 7. the update -------------------------------------------------------------------------------
    def update(self, step: int, batch: RolloutBatch, advantages: torch.Tensor, returns: torch.Tensor | None,
               beta: float) -> dict:
        """ppo_epochs passes over the step's rollouts, each in shuffled minibatches of mini_batch_size rollouts (one
        optimizer step each); a process takes its slice of each minibatch and runs it in micro-batches of
        per_device_train_batch_size, whose gradients accumulate."""
        a, acc = self.args, self.accelerator
        per_process = a.mini_batch_size // self.world
        micro_size = a.per_device_train_batch_size
        # accelerate (and DeepSpeed) divide each micro-batch loss by the accumulation steps, and DDP /
        # DeepSpeed average gradients over processes: undo both, so that summing the micro-batch losses
        # (each normalised by the whole minibatch's count) gives the one-process minibatch gradient.
        scale = float(self.world * acc.gradient_accumulation_steps)
        stats, first, row_tokens = WeightedMeans(), WeightedMeans(), batch.query_mask.sum(1) + batch.response_mask.sum(1)
        self.model.train()
        for epoch in range(a.ppo_epochs):
            order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(derived_seed(a.seed, step, epoch, 1)))
            for k in range(self.minibatches):
                minibatch_rows = order[k * a.mini_batch_size:(k + 1) * a.mini_batch_size]
                my_rows = minibatch_rows[self.rank * per_process:(self.rank + 1) * per_process]
                if a.sort_micro_batches:  # micro-batches of similar length, each cut to its longest row (batch.select)
                    my_rows = my_rows[torch.argsort(row_tokens[my_rows], stable=True)]
                minibatch_mask = objective.loss_mask(batch, a)[minibatch_rows]
                denominator = max(objective.normaliser(minibatch_mask, a), 1.0)  # all of the minibatch, every process
                self._set_lr()
                for j in range(0, per_process, micro_size):
                    rows = my_rows[j:j + micro_size]
                    micro = batch.select(rows)
                    width = micro.response_ids.shape[1]
                    micro_returns = None if returns is None else returns[rows][:, :width]
                    with acc.accumulate(self.model):
                        micro_stats = self.backward(micro, advantages[rows][:, :width], micro_returns, denominator,
                                                    beta, scale)
                        if acc.sync_gradients:
                            self.optimizer_update(stats)
                    tokens = float(objective.loss_mask(micro, a).sum())
                    stats.add(micro_stats, tokens)
                    if epoch == 0 and k == 0:
                        first.add({"policy/ratio_first_minibatch": micro_stats["policy/ratio_mean"]}, tokens)
        out = stats.reduce(acc)
        out.update(first.reduce(acc))
        out["train/lr"] = self.base_lrs[0] * self._lr_scale(max(self.optimizer_step - 1, 0))
        return out

    def backward(self, micro: RolloutBatch, advantages: torch.Tensor, returns: torch.Tensor | None, denominator: float,
                 beta: float, scale: float) -> dict[str, float]:
        """The loss of one micro-batch and its backward; returns its statistics.

        With `split_backward` the policy's pass and its backward run first, then the value function's pass and
        its backward: the same gradients as one joint loss (they share no trainable weight), with only one pass's
        activations alive at a time."""
        if not self.split_backward:
            loss, stats = self.loss(micro, advantages, returns, denominator, beta)
            self.accelerator.backward(loss * scale)
            return stats
        loss, stats = self.loss(micro, advantages, None, denominator, beta)
        self.accelerator.backward(loss * scale)
        loss, value_stats = self.value_loss(micro, returns, denominator)
        self.accelerator.backward(loss * scale)
        return {**stats, **value_stats}

    def loss(self, micro: RolloutBatch, advantages: torch.Tensor, returns: torch.Tensor | None, denominator: float,
             beta: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective on one micro-batch (`rl.objective`), normalised by the whole minibatch's ``denominator``: the
        policy's and, with ``returns``, the value function's terms from one forward."""
        with self.accelerator.autocast():
            logprobs, entropy, values = self.model(micro.query_ids, micro.query_mask, micro.response_ids,
                                                   micro.response_mask, with_values=returns is not None)
        loss, stats = objective.policy_loss(self.args, micro, logprobs, entropy, advantages, denominator, beta)
        if returns is not None:
            v_loss, v_stats = objective.value_loss(self.args, micro, values, returns, denominator)
            loss = loss + v_loss
            stats.update(v_stats)
        return loss, stats

    def value_loss(self, micro: RolloutBatch, returns: torch.Tensor, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """``vf_coef * value_loss`` from the value function's own pass (`split_backward`)."""
        with self.accelerator.autocast():
            values = self.unwrapped.values(micro.query_ids, micro.query_mask, micro.response_ids, micro.response_mask)
        return objective.value_loss(self.args, micro, values, returns, denominator)

    def optimizer_update(self, stats: WeightedMeans) -> None:
        """Clip the accumulated gradients, step Adam, zero them (under DeepSpeed the engine did all of it).

        Gradients that are not finite (a NaN or Inf loss anywhere makes them so on every process: they are
        averaged) skip the step on every process; the schedule moves on as if it had been taken.
        """
        if self.args.max_grad_norm is not None:  # the pre-clip global norm (under DeepSpeed: its engine's)
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        elif self.deepspeed:  # the engine stepped inside backward(); it knows the norm
            grad_norm = getattr(self.model, "get_global_grad_norm", lambda: None)()
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        norm = None if grad_norm is None else float(grad_norm)
        stopping = any(e.action == "stop" for e in self.guard_events)  # the step ends in a stop: no more updates
        if stopping or (norm is not None and not math.isfinite(norm)):
            if not stopping:
                self.guard_events.append(self.guard.skipped(self.step, self.optimizer_step + 1, norm, self.deepspeed))
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_step += 1
            return
        if norm is not None and self.args.max_grad_norm is not None:
            stats.add({"train/grad_norm": norm}, 1.0)
        self.guard.stepped()
        if not self.deepspeed:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1

    def fit_gain_bias(self) -> None:
        """The fixed gain and bias of the scores (docs/ppo.md item 8), fitted once on a step's worth of rollouts of the
        initial policy (their own seeds: no training step samples them) so that those scores have reward_target_mean
        and reward_target_std; kept in every checkpoint."""
        a = self.args
        with watchdog.phase("train_step", 0):
            prompts, columns = self.prompts_of(self.step_rows(1))
            local = self.rollout(prompts, (a.seed, -2), columns)
            batch = gather_batch(self.accelerator, local, self.pad_id)
        self.gain_bias = fit_gain_bias(batch.scores.float(), a.reward_target_mean, a.reward_target_std)
        log.info("ppo: fixed reward gain %.4g and bias %.4g, fitted on %d rollouts of the initial policy (score mean "
                 "%.4g, std %.4g)", *self.gain_bias, len(batch), float(batch.scores.float().mean()),
                 float(batch.scores.float().std(unbiased=False)))

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out score, KL, length and EOS rate (`RolloutSampler.evaluate`), the same prompts and seeds each time."""
        n = self.args.eval_max_prompts
        return self.sampler.evaluate(self.eval_prompts[:n], self.step, {k: v[:n] for k, v in self.eval_columns.items()})

    def samples(self, batch: RolloutBatch, n: int) -> list[dict]:
        """The first n rollouts of a step as text, for the sample log."""
        rows = torch.arange(min(n, len(batch)))
        sub = batch.select(rows)
        prompts, completions = decode_pairs(self.tokenizer, sub.query_ids, sub.query_mask, sub.response_ids,
                                            sub.response_mask)
        return [{"prompt": p, "completion": c, "score": float(s), "ended": bool(e)}
                for p, c, s, e in zip(prompts, completions, sub.scores, sub.ended)]

    # -- checkpoints -------------------------------------------------------------------------------------
    def counters(self) -> dict:
        """The loop's own state beside the weights and the optimizer (a checkpoint's `checkpoint.COUNTERS_FILE`)."""
        return {"step": self.step, "optimizer_step": self.optimizer_step, "kl_ctl": self.kl_ctl.state_dict(),
                "moments": self.moments.state_dict(), "world_size": self.world, "guardrails": self.guard.state_dict(),
                "gain_bias": self.gain_bias}

    def save_checkpoint(self) -> Path:
        """WORK/checkpoint-STEP: weights, optimizer, RNG (accelerate) and the counters, sealed (`rl.checkpoint.save`)."""
        with watchdog.phase("save", self.step):
            return checkpoint.save(self.accelerator, self.work_dir, self.step, self.counters(), self.args.save_total_limit)

    def load_checkpoint(self, folder: str | Path, rollback: bool = False) -> None:
        """Weights, optimizer, RNG and counters from `folder`. A resume also takes the guardrails' state from it; a
        rollback keeps the run's (its counters and scales go on) and puts the KL coefficient on the current scale."""
        # A PEFT policy's checkpoint holds only what trains (ActorCritic.state_dict): the frozen base is not in it.
        state = checkpoint.load(self.accelerator, Path(folder), partial=hasattr(self.unwrapped.policy, "peft_config"))
        self.step, self.optimizer_step = int(state["step"]), int(state["optimizer_step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
        self.gain_bias = tuple(state["gain_bias"]) if state.get("gain_bias") else None
        saved_guard = state.get("guardrails", {})
        if rollback:
            self.kl_ctl.value *= self.guard.kl_scale / saved_guard.get("kl_scale", 1.0)
        elif saved_guard:
            self.guard.load_state_dict(saved_guard)

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self, resume_from: str | None = None) -> list[dict]:
        """Run to max_steps (from a checkpoint if given); returns the logged history."""
        from tqdm.auto import tqdm

        a, acc = self.args, self.accelerator
        if resume_from:
            self.load_checkpoint(resume_from)
            log.info("ppo: resumed at step %d from %s", self.step, resume_from)
        if a.reward_gain_bias and self.gain_bias is None:
            self.fit_gain_bias()
        if not resume_from and a.save_steps and self.guard.may_roll_back():
            self.save_checkpoint()  # checkpoint-0: a rollback before the first checkpoint goes back to the start
        self.tracker = tracker = Tracker(self.work_dir, acc.is_main_process, list(a.report_to), resume_step=self.step,
                                         events=len(self.guard.events))
        bar = tqdm(total=self.max_steps, initial=self.step, desc="ppo", disable=not acc.is_main_process, dynamic_ncols=True)
        try:
            while self.step < self.max_steps:
                self.step += 1
                watchdog.set_phase("train_step", self.step)  # between the phases below (the logging's collectives)
                metrics, batch = self.train_step(self.step)
                heldout = None
                every = self.guard.cfg.heldout_every
                if every and self.step % every == 0:
                    heldout = metrics["heldout/score"] = self.evaluate()["score"]
                if self.step % a.logging_steps == 0 or self.step == self.max_steps:
                    samples = self.samples(batch, a.num_sample_completions) if acc.is_main_process else None
                    tracker.log(self.step, metrics, samples)
                bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}",
                                ratio=f"{metrics['policy/ratio_mean']:.3f}")
                bar.update(1)
                if guardrails.act(self, metrics, heldout, bar):
                    continue  # rolled back: self.step is the checkpoint's
                saved = a.save_steps and self.step % a.save_steps == 0 and self.step < self.max_steps
                if saved and not self.guard.healthy():  # every checkpoint on disk is one a rollback may go back to
                    log.info("ppo: no checkpoint at step %d: a guardrail is firing", self.step)
                    saved = False
                if saved:
                    self.save_checkpoint()
                if preempt.requested():  # a collective: every process asks after every step
                    checkpoint = self.work_dir / f"checkpoint-{self.step}" if saved else self.save_checkpoint()
                    raise preempt.Preempted(self.step, checkpoint)
        finally:
            bar.close()
            tracker.close()
        return tracker.history()

