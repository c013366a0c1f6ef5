"""Our PPO loop for language models: sharded rollouts, global statistics, minibatch epochs.

One `PPOTrainer.step` reads as the algorithm (Ziegler et al. 2019; Huang et al. 2024, "The N+
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

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rlhf_dist import faults, preempt, rundir, watchdog
from rlhf_dist.errors import StageStopped
from rlhf_dist.rl.actor_critic import ActorCritic
from rlhf_dist.rl.adapters import REFERENCE, no_adapter, use_adapter
from rlhf_dist.rl.advantages import gae, group_baseline, masked_mean, sequence_advantages_to_tokens, whiten
from rlhf_dist.rl.batching import check_batch_sizes, micro_batches_per_process
from rlhf_dist.rl.guardrails import GUARD_STOPPED, Guardrails, worst
from rlhf_dist.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_dist.rl.losses import aggregate, explained_variance, ppo_policy_loss, value_loss
from rlhf_dist.rl.reward_fn import call_reward_fn
from rlhf_dist.rl.rewards import RunningMoments, kl_shaped_rewards, normalize_scores
from rlhf_dist.rl.rollout import decode_pairs, forward_logprobs, generate, left_pad, retokenize, sequence_scores
from rlhf_dist.rl.tracking import Tracker
from rlhf_dist.rundir import write_json

log = logging.getLogger("rlhf_dist")

STATE_FILE = "ppo_state.json"


def derived_seed(*parts: int) -> int:
    """A seed from integers (seed, step, chunk...): the same on every process, different per tuple."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).hexdigest()
    return int(digest[:15], 16)


# ---------------------------------------------------------------------------------------------
# A batch of rollouts
# ---------------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """Rollouts of one step (rows = prompt + response). Queries left-padded, responses right-padded."""

    query_ids: torch.Tensor      # [N, Lq] long
    query_mask: torch.Tensor     # [N, Lq] long
    response_ids: torch.Tensor   # [N, T] long
    response_mask: torch.Tensor  # [N, T] bool
    ended: torch.Tensor          # [N] bool: the response stopped (else it hit max_new_tokens)
    logprobs: torch.Tensor       # [N, T] policy at rollout time (= "old" log-probs)
    ref_logprobs: torch.Tensor   # [N, T] reference
    entropy: torch.Tensor        # [N, T] of the sampling distribution
    values: torch.Tensor | None  # [N, T] value estimates (None without a value function)
    scores: torch.Tensor         # [N] raw reward-model / reward-function scores

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, rows: torch.Tensor) -> "Rollouts":
        """The given rows, with all-padding columns trimmed (left of the queries, right of the responses)."""
        picked = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows]) for f in fields(self)}
        q_keep = int(picked["query_mask"].sum(1).max())
        t_keep = max(int(picked["response_mask"].sum(1).max()), 1)
        for name in ("query_ids", "query_mask"):
            picked[name] = picked[name][:, picked[name].shape[1] - q_keep:]
        for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "entropy", "values"):
            if picked[name] is not None:
                picked[name] = picked[name][:, :t_keep]
        return Rollouts(**picked)


def _pad_columns(t: torch.Tensor, width: int, value: Any, left: bool) -> torch.Tensor:
    missing = width - t.shape[1]
    if missing <= 0:
        return t
    pad = torch.full((t.shape[0], missing), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Stack chunks of rollouts: queries left-padded, responses right-padded to the widest."""
    lq = max(p.query_ids.shape[1] for p in parts)
    t = max(p.response_ids.shape[1] for p in parts)
    out = {}
    for f in fields(Rollouts):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            out[f.name] = None
        elif f.name in ("query_ids", "query_mask"):
            out[f.name] = torch.cat([_pad_columns(v, lq, pad_id if f.name == "query_ids" else 0, True) for v in values])
        elif values[0].dim() == 2:
            fill = pad_id if f.name == "response_ids" else (False if f.name == "response_mask" else 0.0)
            out[f.name] = torch.cat([_pad_columns(v, t, fill, False) for v in values])
        else:
            out[f.name] = torch.cat(values)
    return Rollouts(**out)


def gather_rollouts(accelerator, local: Rollouts, pad_id: int) -> Rollouts:
    """Every process gets every process's rollouts, in process order (= the one-process order)."""
    if accelerator.num_processes == 1:
        return local
    out = {}
    for f in fields(Rollouts):
        t = getattr(local, f.name)
        if t is None:
            out[f.name] = None
            continue
        is_bool = t.dtype == torch.bool
        t = t.long() if is_bool else t
        if t.dim() == 2:
            left = f.name in ("query_ids", "query_mask")
            fill = pad_id if f.name in ("query_ids", "response_ids") else 0
            t = accelerator.pad_across_processes(t, dim=1, pad_index=fill, pad_first=left)
        t = accelerator.gather(t.contiguous())
        out[f.name] = t.bool() if is_bool else t
    return Rollouts(**out)


# ---------------------------------------------------------------------------------------------
# Statistics summed over micro-batches and processes
# ---------------------------------------------------------------------------------------------

class WeightedMeans:
    """Weighted means of named statistics, reduced over processes with ONE collective at the end."""

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


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

@dataclass
class RewardSource:
    """Where scores come from: a reward model (with its own tokenizer, or None = the policy's) or a function."""

    model: nn.Module | None = None
    tokenizer: Any = None
    max_length: int | None = None
    fn: Callable | None = None
    fn_name: str = "reward_fn"


class PPOTrainer:
    """PPO (or RLOO/GRPO) on prompts; see the module docstring for the phases.

    Args:
        args: `rlhf_dist.config.PPOTrainingConfig`.
        accelerator: an ``accelerate.Accelerator`` whose ``gradient_accumulation_steps`` is
            `micro_batches_per_process(args, world)`.
        actor_critic: the trainable `ActorCritic` (not yet prepared).
        reference: frozen reference model, or None = the policy with its LoRA adapter disabled.
        reward: the `RewardSource`.
        tokenizer: the policy's tokenizer.
        train_prompts, eval_prompts: token id lists (already checked against max_prompt_length).
        work_dir: where checkpoints and logs go.
        guardrails: `rlhf_dist.config.GuardrailsConfig` (default: its defaults), see `rlhf_dist.rl.guardrails`.
    """

    def __init__(self, args, accelerator, actor_critic: ActorCritic, reference: nn.Module | None, reward: RewardSource,
                 tokenizer, train_prompts: list[list[int]], eval_prompts: list[list[int]], work_dir: Path,
                 guardrails=None):
        self.args, self.accelerator, self.reward = args, accelerator, reward
        self.tokenizer, self.train_prompts, self.eval_prompts = tokenizer, train_prompts, eval_prompts
        self.work_dir = Path(work_dir)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer, args.stop_tokens, args.ignore_eos)
        check_batch_sizes(args, self.world)
        self.steps_per_epoch = len(train_prompts) // args.rollout_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train_prompts)} training prompts are fewer than training.rollout_batch_size="
                             f"{args.rollout_batch_size}; lower it or add prompts")
        self.max_steps = args.max_steps or self.steps_per_epoch * args.num_train_epochs
        self.rollouts_per_step = args.rollout_batch_size * args.samples_per_prompt
        self.minibatches = self.rollouts_per_step // args.mini_batch_size
        self.optimizer_steps = self.max_steps * args.ppo_epochs * self.minibatches
        self.kl_in_loss = args.advantage_estimator == "grpo"
        self.zero_stage = _zero_stage(accelerator)
        self.zero3 = self.zero_stage == 3

        deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        groups = _param_groups(actor_critic, args)
        self.optimizer = torch.optim.AdamW(
            groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
            fused=_fused_adam_ok(groups, deepspeed))
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.raw_optimizer = self.optimizer
        self.model, self.optimizer = accelerator.prepare(actor_critic, self.optimizer)
        self.reference = reference
        # Policy and value passes share no trainable weight (separate value model, or its own adapter on a frozen base),
        # so their backwards can run one after the other: the same gradients, half the activations alive at the peak.
        separate_value = actor_critic.has_value and not actor_critic.values_need_policy_pass
        self.split_backward = bool(separate_value and self.world == 1 and not deepspeed and args.split_backward is not False)
        if args.split_backward and not self.split_backward:
            log.info("training.split_backward is on, but the policy and value passes run as one here (several "
                     "processes, DeepSpeed, or a value head on the policy's own pass)")
        if args.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)
        self.moments = RunningMoments()
        self.step = 0
        self.optimizer_step = 0
        if guardrails is None:
            from rlhf_dist.config import GuardrailsConfig

            guardrails = GuardrailsConfig()
        self.guard = Guardrails(guardrails, args.max_new_tokens, args.ignore_eos)
        self.deepspeed = deepspeed
        self._guard_events = []  # events of the step in progress (the optimizer's), handled after it

    # -- small helpers ---------------------------------------------------------------------------
    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    def _lr_factor(self, opt_step: int) -> float:
        """Warm-up then constant / linear / cosine decay to 0 over all optimizer steps."""
        warmup, total = self.args.warmup_steps, max(self.optimizer_steps, 1)
        if opt_step < warmup:
            return (opt_step + 1) / warmup
        progress = (opt_step - warmup) / max(total - warmup, 1)
        if self.args.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if self.args.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    def _set_lr(self) -> None:
        factor = self._lr_factor(self.optimizer_step) * self.guard.lr_scale
        for group, base in zip(self.raw_optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step_prompts(self, step: int) -> list[list[int]]:
        """This process's prompts for PPO step ``step`` (1-based), each repeated samples_per_prompt times."""
        a = self.args
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = torch.randperm(len(self.train_prompts), generator=torch.Generator().manual_seed(derived_seed(a.seed, epoch)))
        global_rows = order[index * a.rollout_batch_size:(index + 1) * a.rollout_batch_size].tolist()
        per_process = a.rollout_batch_size // self.world
        mine = global_rows[self.rank * per_process:(self.rank + 1) * per_process]
        return [self.train_prompts[i] for i in mine for _ in range(a.samples_per_prompt)]

    # -- 1. rollout ------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], seed_parts: tuple[int, ...]) -> Rollouts:
        """Sample and score ``prompts`` (this process's share) in chunks of generation_batch_size."""
        a, device = self.args, self.accelerator.device
        chunk_size = a.generation_batch_size
        chunks_per_process = len(prompts) // chunk_size
        parts = []
        for j in range(chunks_per_process):
            chunk = prompts[j * chunk_size:(j + 1) * chunk_size]
            global_chunk = self.rank * chunks_per_process + j
            with watchdog.phase("rollout", self.step):  # each chunk on its own clock
                parts.append(self._rollout_chunk(chunk, derived_seed(*seed_parts, global_chunk), device))
        return concat_rollouts(parts, self.pad_id)

    def _rollout_chunk(self, prompts: list[list[int]], seed: int, device) -> Rollouts:
        a, model = self.args, self.unwrapped
        q_ids, q_mask = left_pad(prompts, self.pad_id, device)
        extra = {"synced_gpus": True} if self.zero3 and self.world > 1 else {}
        with self.accelerator.autocast():
            recorded = a.rollout_logprobs == "generate"
            head_on_policy = recorded and model.values_need_policy_pass  # the head reads the sampling pass's states
            sample = generate(model.policy, q_ids, q_mask, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              top_k=a.top_k, top_p=a.top_p, stop_ids=self.stop_ids, pad_id=self.pad_id,
                              generator_seed=seed, return_logprobs=recorded, return_hidden=head_on_policy, **extra)
            if recorded:
                sample, logprobs, entropy, *hidden = sample
            r_ids, r_mask = sample.response_ids, sample.response_mask
            if head_on_policy:  # no second policy pass at all
                values = torch.where(r_mask, model.value_head(hidden[0]), 0.0)
            elif recorded:  # no second policy pass: the values alone (none for RLOO/GRPO)
                values = model.values(q_ids, q_mask, r_ids, r_mask)
            else:
                logprobs, entropy, values = model(q_ids, q_mask, r_ids, r_mask)  # the training forward, without grad
            ref_logprobs = self._ref_logprobs(q_ids, q_mask, r_ids, r_mask)
            with watchdog.phase("score", self.step):
                scores = self.score(q_ids, q_mask, r_ids, r_mask, sample.ended)
        return Rollouts(q_ids, q_mask, r_ids, r_mask, sample.ended, logprobs, ref_logprobs, entropy, values, scores)

    def _ref_logprobs(self, q_ids, q_mask, r_ids, r_mask) -> torch.Tensor:
        if self.reference is not None:
            return forward_logprobs(self.reference, q_ids, q_mask, r_ids, r_mask, self.args.temperature)
        policy = self.unwrapped.policy
        reference = use_adapter(policy, REFERENCE) if REFERENCE in policy.peft_config else no_adapter(policy)
        with reference:  # the SFT model: the base (SFT merged into it), or the frozen SFT adapter (item 19)
            return forward_logprobs(policy, q_ids, q_mask, r_ids, r_mask, self.args.temperature)

    def score(self, q_ids, q_mask, r_ids, r_mask, ended) -> torch.Tensor:
        """[B] scores of prompt + truncated response (item 3), from the reward model or function."""
        rw = self.reward
        if rw.fn is not None:
            prompts, completions = decode_pairs(self.tokenizer, q_ids, q_mask, r_ids, r_mask)
            values = call_reward_fn(rw.fn, prompts, completions, rw.fn_name)
            return torch.tensor(values, dtype=torch.float32, device=q_ids.device)
        if rw.tokenizer is None:  # same tokenizer: score the very tokens the policy produced
            return sequence_scores(rw.model, q_ids, q_mask, r_ids, r_mask)
        prompts, completions = decode_pairs(self.tokenizer, q_ids, q_mask, r_ids, r_mask)
        ids, mask = retokenize(prompts, completions, rw.tokenizer, rw.max_length, append_eos=ended, device=q_ids.device)
        empty = ids.new_zeros((ids.shape[0], 0))
        return sequence_scores(rw.model, ids, mask, empty, empty.bool())

    # -- one PPO step ------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[dict[str, float], Rollouts]:
        a, acc = self.args, self.accelerator
        started = time.perf_counter()

        # 1. rollout: this process's shard of the step's prompts
        local = self.rollout(self.step_prompts(step), (a.seed, step))
        rollout_seconds = time.perf_counter() - started
        # 2. gather: every process now holds the whole step (identical tensors everywhere)
        with watchdog.phase("gather", step):
            batch = gather_rollouts(acc, local, self.pad_id)
        mask = batch.response_mask

        # 3. score: optional running normalisation and clipping (item 8)
        scores = batch.scores
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

        # 5. advantages: GAE with the value model, or a baseline from the other samples of the prompt
        if a.advantage_estimator == "gae":
            advantages, returns = gae(rewards, batch.values, mask, a.gamma, a.lam)
        else:
            sequence_reward = rewards.sum(dim=1)  # score - beta * sum_t kl_t
            advantages = sequence_advantages_to_tokens(
                group_baseline(sequence_reward, a.samples_per_prompt, a.advantage_estimator), mask)
            returns = None

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
        rollout_seconds_all = _max_over_processes(acc, rollout_seconds)
        metrics = {
            "objective/scores": float(batch.scores.float().mean()),
            "objective/scores_std": float(batch.scores.float().std()) if len(batch) > 1 else 0.0,
            "objective/kl": reward_stats["kl"],
            "objective/kl_coef": beta,
            "objective/non_score_reward": reward_stats["non_score_reward"],
            "objective/rlhf_reward": reward_stats["rlhf_reward"],
            "policy/entropy": float(masked_mean(batch.entropy, mask)),
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
    def update(self, step: int, batch: Rollouts, advantages: torch.Tensor, returns: torch.Tensor | None,
               beta: float) -> dict:
        a, acc = self.args, self.accelerator
        per_process = a.mini_batch_size // self.world
        micro = a.per_device_train_batch_size
        # accelerate (and DeepSpeed) divide each micro-batch loss by the accumulation steps, and DDP /
        # DeepSpeed average gradients over processes: undo both, so that summing the micro-batch losses
        # (each normalised by the whole minibatch's count) gives the one-process minibatch gradient.
        scale = float(self.world * acc.gradient_accumulation_steps)
        stats, first = WeightedMeans(), WeightedMeans()
        self.model.train()
        for epoch in range(a.ppo_epochs):
            order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(derived_seed(a.seed, step, epoch, 1)))
            for k in range(self.minibatches):
                rows = order[k * a.mini_batch_size:(k + 1) * a.mini_batch_size]
                mine = rows[self.rank * per_process:(self.rank + 1) * per_process]
                mb_mask = batch.response_mask[rows]
                denominator = float(mb_mask.sum()) if a.loss_aggregation == "token" else float(len(rows))
                self._set_lr()
                for j in range(0, per_process, micro):
                    idx = mine[j:j + micro]
                    mb = batch.select(idx)
                    width = mb.response_ids.shape[1]
                    mb_returns = None if returns is None else returns[idx][:, :width]
                    with acc.accumulate(self.model):
                        if self.split_backward:  # the policy's pass and backward, then the value function's
                            loss, micro_stats = self.loss(mb, advantages[idx][:, :width], None, denominator, beta)
                            acc.backward(loss * scale)
                            loss, value_stats = self.value_loss(mb, mb_returns, denominator)
                            micro_stats.update(value_stats)
                        else:
                            loss, micro_stats = self.loss(mb, advantages[idx][:, :width], mb_returns, denominator, beta)
                        acc.backward(loss * scale)
                        if acc.sync_gradients:
                            self.optimizer_update(stats)
                    tokens = float(mb.response_mask.sum())
                    stats.add(micro_stats, tokens)
                    if epoch == 0 and k == 0:
                        first.add({"policy/ratio_first_minibatch": micro_stats["policy/ratio_mean"]}, tokens)
        out = stats.reduce(acc)
        out.update(first.reduce(acc))
        out["train/lr"] = self.base_lrs[0] * self._lr_factor(max(self.optimizer_step - 1, 0)) * self.guard.lr_scale
        return out

    def loss(self, mb: Rollouts, advantages: torch.Tensor, returns: torch.Tensor | None, denominator: float,
             beta: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO objective on one micro-batch, normalised by the whole minibatch's ``denominator``.

        ``loss = pg_loss + vf_coef * v_loss (gae) + beta * k3 KL (grpo) - entropy_coef * entropy``;
        the stats are this micro-batch's means (losses re-normalised by its own count).
        """
        a = self.args
        with self.accelerator.autocast():
            logprobs, entropy, values = self.model(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                                                   with_values=returns is not None)
        mask, aggregation = mb.response_mask, a.loss_aggregation
        share = max(_count(mb, a), 1) / denominator  # of the minibatch's tokens (or sequences)
        pg_loss, pg_stats = ppo_policy_loss(logprobs, mb.logprobs, advantages, mask, a.clip_eps, aggregation,
                                            denominator=denominator)
        loss = pg_loss
        stats = {"policy/pg_loss": pg_loss.item() / share, **{f"policy/{k}": v for k, v in pg_stats.items()}}
        if returns is not None:
            v_loss, v_stats = self._value_term(values, mb, returns, denominator)
            loss = loss + v_loss
            stats.update(v_stats)
        if self.kl_in_loss:  # GRPO: beta * k3(pi || pi_ref), differentiable in the policy
            kl = kl_estimate(logprobs, mb.ref_logprobs, "k3", a.kl_clamp, mask)
            loss = loss + beta * aggregate(kl, mask, aggregation, denominator)
        if a.entropy_coef:
            loss = loss - a.entropy_coef * aggregate(entropy, mask, aggregation, denominator)
        return loss, stats

    def value_loss(self, mb: Rollouts, returns: torch.Tensor, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """``vf_coef * value_loss`` from the value function's own pass (`split_backward`)."""
        with self.accelerator.autocast():
            values = self.unwrapped.values(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask)
        return self._value_term(values, mb, returns, denominator)

    def _value_term(self, values: torch.Tensor, mb: Rollouts, returns: torch.Tensor,
                    denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        a = self.args
        share = max(_count(mb, a), 1) / denominator
        v_loss, v_stats = value_loss(values, mb.values, returns, mb.response_mask, a.value_clip, a.loss_aggregation,
                                     denominator=denominator)
        return a.vf_coef * v_loss, {"value/loss": v_loss.item() / share, "value/clipfrac": v_stats["vf_clipfrac"],
                                    "value/mean": v_stats["value_mean"]}

    def optimizer_update(self, stats: "WeightedMeans") -> None:
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
        stopping = any(e.action == "stop" for e in self._guard_events)  # the step ends in a stop: no more updates
        if stopping or (norm is not None and not math.isfinite(norm)):
            if not stopping:
                self._guard_events.append(self.guard.skipped(self.step, self.optimizer_step + 1, norm, self.deepspeed))
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

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean score, KL to the reference (sum over tokens of logp - logp_ref), length and EOS rate
        of responses sampled for the held-out prompts, with fixed seeds (the same before and after)."""
        with watchdog.phase("evaluate"):
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        a = self.args
        prompts = self.eval_prompts[:a.eval_max_prompts]
        quantum = self.world * a.generation_batch_size  # equal, whole chunks on every process (item 20)
        padded = prompts + [prompts[0]] * (-len(prompts) % quantum)
        per_process = len(padded) // self.world
        mine = padded[self.rank * per_process:(self.rank + 1) * per_process]
        batch = gather_rollouts(self.accelerator, self.rollout(mine, (a.seed, -1)), self.pad_id)
        n = len(prompts)
        mask = batch.response_mask[:n]
        kl = ((batch.logprobs - batch.ref_logprobs)[:n] * mask).sum(1)
        return {"score": float(batch.scores[:n].float().mean()), "kl": float(kl.mean()),
                "response_length": float(mask.sum(1).float().mean()), "eos_rate": float(batch.ended[:n].float().mean())}

    def samples(self, batch: Rollouts, n: int) -> list[dict]:
        """The first n rollouts of a step as text, for the sample log."""
        rows = torch.arange(min(n, len(batch)))
        sub = batch.select(rows)
        prompts, completions = decode_pairs(self.tokenizer, sub.query_ids, sub.query_mask, sub.response_ids,
                                            sub.response_mask)
        return [{"prompt": p, "completion": c, "score": float(s), "ended": bool(e)}
                for p, c, s, e in zip(prompts, completions, sub.scores, sub.ended)]

    # -- checkpoints -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "optimizer_step": self.optimizer_step, "kl_ctl": self.kl_ctl.state_dict(),
                "moments": self.moments.state_dict(), "world_size": self.world, "guardrails": self.guard.state_dict()}

    def save_checkpoint(self) -> Path:
        """WORK/checkpoint-STEP: weights, optimizer, RNG (accelerate) + our counters; sealed, then renamed.

        Written as ``checkpoint-STEP.tmp``, sealed (`rundir.seal_checkpoint`) once every process has written
        its part, and renamed: a crash while writing leaves an unsealed folder that resume sets aside, and the
        previous checkpoint stays usable.
        """
        with watchdog.phase("save", self.step):
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.work_dir / f"checkpoint-{self.step}"
        tmp = self.work_dir / f"checkpoint-{self.step}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # this very run's own unfinished attempt at this step (resume set older ones aside)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        faults.point("checkpoint", self.step)
        if acc.is_main_process:
            write_json(tmp / STATE_FILE, self.state())
            rundir.seal_checkpoint(tmp, self.step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            rundir.rotate_checkpoints(self.work_dir, self.args.save_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: str | Path, rollback: bool = False) -> None:
        """Weights, optimizer, RNG and counters from `folder`. A resume also takes the guardrails' state from it; a
        rollback keeps the run's (its counters and scales go on) and puts the KL coefficient on the current scale."""
        folder = Path(folder)
        # A PEFT policy's checkpoint holds only what trains (ActorCritic.state_dict): the frozen base is not in it.
        peft = hasattr(self.unwrapped.policy, "peft_config")
        self.accelerator.load_state(str(folder), **({"strict": False} if peft else {}))
        state = json.loads((folder / STATE_FILE).read_text())
        self.step, self.optimizer_step = int(state["step"]), int(state["optimizer_step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
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
        elif a.save_steps and self.guard.may_roll_back():
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
                if self.guardrails(metrics, heldout, bar):
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

    def guardrails(self, metrics: dict, heldout: float | None, bar=None) -> bool:
        """This step's guardrail events: logged, then acted on; True if the run rolled back to a checkpoint."""
        events = [*self._guard_events, *self.guard.check(self.step, metrics, heldout)]
        self._guard_events = []
        for event in events:
            (log.warning if event.action in ("warn", "skip") else log.error)(
                "ppo: guardrail '%s' at step %d: %s (%s)", event.rule, event.step, event.message, event.action)
            self.tracker.event(event.as_dict())
        event = worst(events)
        if event is None or event.action in ("warn", "skip"):
            return False
        healthy, condemned = self._healthy_checkpoint(self.guard.since.get(event.rule, self.step))
        if event.action == "rollback":
            limit = self.guard.cfg.rollback.max_rollbacks
            if healthy is not None and self.guard.rollbacks < limit:
                self._rollback(healthy, condemned)
                if bar is not None:
                    bar.n = self.step
                    bar.refresh()
                return True
            why = f"{limit} rollback(s) already" if healthy is not None else "no checkpoint from before it to go back to"
            self._stop(event, healthy, condemned, f"rollback refused: {why}")
        self._stop(event, healthy, condemned)
        return False

    def _healthy_checkpoint(self, since: int) -> tuple[Path | None, list[Path]]:
        """(the newest complete checkpoint whose policy was seen healthy, the newer ones). A rule firing since step
        `since` judges the rollouts of step `since`, sampled by the policy of checkpoint-(since - 1): a healthy one is
        older than that."""
        complete, _ = rundir.checkpoints(self.work_dir)
        older = [p for p in complete if rundir.checkpoint_step(p) < since - 1]
        return (older[-1] if older else None), [p for p in complete if p not in older]

    def _set_aside(self, condemned: list[Path]) -> None:
        """Checkpoints a rule condemns go to WORK/unhealthy/, out of the way of resuming (kept, not deleted)."""
        if condemned and self.accelerator.is_main_process:
            moved = rundir.set_aside(self.work_dir, [p.name for p in condemned], into=rundir.UNHEALTHY)
            log.warning("ppo: set aside %s (saved after the policy went wrong) in %s", ", ".join(p.name for p in moved),
                        self.work_dir / rundir.UNHEALTHY)
        self.accelerator.wait_for_everyone()

    def _rollback(self, target: Path, condemned: list[Path]) -> None:
        rb = self.guard.cfg.rollback
        self.guard.rollbacks += 1
        self.guard.lr_scale *= rb.lr_factor
        self.guard.kl_scale *= rb.kl_factor
        step = self.step
        self.load_checkpoint(target, rollback=True)
        self._set_aside(condemned)
        self.guard.reset_streaks()
        self.tracker.rewind(self.step)
        log.warning("ppo: rollback %d of %d: from step %d back to %s; learning rate x%g (now x%g), KL coefficient now %.4g",
                    self.guard.rollbacks, rb.max_rollbacks, step, target, rb.lr_factor, self.guard.lr_scale,
                    self.kl_ctl.value)

    def _stop(self, event, healthy: Path | None, condemned: list[Path], why: str = "") -> None:
        self._set_aside(condemned)
        rolled = f" after {self.guard.rollbacks} rollback(s)" if self.guard.rollbacks else ""
        resume = (f"--resume continues from {healthy}, saved before it: change the recipe first (e.g. a lower "
                  "ppo.training.learning_rate or a higher ppo.training.kl_coef)" if healthy else
                  "no checkpoint from before it: change the recipe and run again")
        raise StageStopped(f"guardrail '{event.rule}' stopped the run at step {event.step}{rolled}: {event.message}"
                           f"{'; ' + why if why else ''}; {resume}", GUARD_STOPPED,
                           log=self.work_dir / "log.jsonl")


# ---------------------------------------------------------------------------------------------
# Set-up helpers (also used by the stage before any model is loaded)
# ---------------------------------------------------------------------------------------------

def _count(mb: Rollouts, a) -> int:
    return int(mb.response_mask.sum()) if a.loss_aggregation == "token" else len(mb)


def _max_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device)).max())


def _zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def _param_groups(model: ActorCritic, args) -> list[dict]:
    """The policy's trainable weights at learning_rate; the value function's (model, head, adapter) at value_learning_rate."""
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


def _fused_adam_ok(groups: list[dict], deepspeed: bool) -> bool | None:
    """Fused AdamW (one kernel over all tensors, as transformers' default optimizer) where torch has it for every
    parameter: floating point on CPU or CUDA. Not under DeepSpeed, which drives its own optimizer states."""
    if deepspeed:
        return None
    params = [p for group in groups for p in group["params"]]
    ok = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                              for p in params)
    return True if ok else None


def stop_token_ids(tokenizer, stop_tokens: list[str], ignore_eos: bool = False) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS (unless ``ignore_eos``) and ``stop_tokens``."""
    ids = [] if tokenizer.eos_token_id is None or ignore_eos else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab()
    for token in stop_tokens:
        if token not in vocab:
            raise ValueError(f"ppo.training.stop_tokens: '{token}' is not a single token of the policy's tokenizer")
        ids.append(int(vocab[token]))
    return sorted(set(ids))


__all__ = ["PPOTrainer", "RewardSource", "Rollouts", "check_batch_sizes", "concat_rollouts", "derived_seed",
           "gather_rollouts", "micro_batches_per_process", "stop_token_ids"]
