"""The loss of one micro-batch in the PPO loop, from the forward's outputs: the policy term (PPO's clipped token ratio,
DAPO's decoupled clip, or GSPO's sequence ratio), GRPO's KL term, the entropy bonus, the value term.

Every term is normalised by the WHOLE minibatch's ``denominator`` (its valid tokens, its responses, or responses x
max_new_tokens: `normaliser`), so that summing the micro-batch losses over gradient accumulation and processes gives
the one-process minibatch loss (docs/ppo.md item 11; `rlhf_dist.rl.trainer.PPOLoop.update`).
"""

from __future__ import annotations

import torch

from rlhf_dist.rl.batch import RolloutBatch
from rlhf_dist.rl.kl import kl_estimate
from rlhf_dist.rl.losses import aggregate, gspo_policy_loss, ppo_policy_loss
from rlhf_dist.rl.losses import value_loss as clipped_value_loss
from rlhf_dist.rl.rewards import overlong_filter_mask


def aggregation(args) -> str:
    """How token terms are reduced: loss_aggregation, but per sequence for GSPO, whose objective is per sequence."""
    return "sequence" if args.policy_loss == "gspo" else args.loss_aggregation


def loss_mask(b: RolloutBatch, args) -> torch.Tensor:
    """The tokens the loss sees: every valid response token, less the responses that never stopped under DAPO's
    overlong filtering (training.overlong_filter)."""
    return overlong_filter_mask(b.response_mask, b.ended) if args.overlong_filter else b.response_mask


def normaliser(mask: torch.Tensor, args) -> float:
    """What a loss over these rows is divided by: their valid tokens (token), their responses (sequence), or
    responses x max_new_tokens (constant, Dr. GRPO's length-unbiased normaliser)."""
    kind = aggregation(args)
    if kind == "token":
        return float(mask.sum())
    if kind == "sequence":
        return float(mask.any(dim=1).sum())
    return float(mask.shape[0] * args.max_new_tokens)


def policy_loss(args, micro: RolloutBatch, logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
                denominator: float, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``pg_loss + beta * k3 KL (grpo, dr_grpo: args.kl_in_loss) - entropy_coef * entropy``; the stats are this
    micro-batch's means (the policy loss re-normalised by its own count)."""
    a, mask, kind = args, loss_mask(micro, args), aggregation(args)
    share = max(normaliser(mask, args), 1.0) / denominator  # of the minibatch's tokens (or sequences)
    low = a.clip_eps if a.clip_eps_low is None else a.clip_eps_low
    high = a.clip_eps if a.clip_eps_high is None else a.clip_eps_high
    if a.policy_loss == "gspo":
        pg_loss, pg_stats = gspo_policy_loss(logprobs, micro.logprobs, advantages, mask, low, high, denominator=denominator)
    else:
        pg_loss, pg_stats = ppo_policy_loss(logprobs, micro.logprobs, advantages, mask, a.clip_eps, kind,
                                            denominator=denominator, clip_eps_low=low, clip_eps_high=high,
                                            max_tokens=a.max_new_tokens)
    loss = pg_loss
    stats = {"policy/pg_loss": pg_loss.item() / share, **{f"policy/{k}": v for k, v in pg_stats.items()}}
    if a.kl_in_loss:  # GRPO: beta * k3(pi || pi_ref), differentiable in the policy
        kl = kl_estimate(logprobs, micro.ref_logprobs, "k3", a.kl_clamp, mask)
        loss = loss + beta * aggregate(kl, mask, kind, denominator, max_tokens=a.max_new_tokens)
    if a.entropy_coef:
        loss = loss - a.entropy_coef * aggregate(entropy, mask, kind, denominator, max_tokens=a.max_new_tokens)
    return loss, stats


def value_loss(args, micro: RolloutBatch, values: torch.Tensor, returns: torch.Tensor,
               denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``vf_coef * value_loss`` (clipped to value_clip around the rollout's values) and its stats."""
    mask = loss_mask(micro, args)
    share = max(normaliser(mask, args), 1.0) / denominator
    v_loss, v_stats = clipped_value_loss(values, micro.values, returns, mask, args.value_clip, aggregation(args),
                                         denominator=denominator, max_tokens=args.max_new_tokens)
    return args.vf_coef * v_loss, {"value/loss": v_loss.item() / share, "value/clipfrac": v_stats["vf_clipfrac"],
                                   "value/mean": v_stats["value_mean"]}
