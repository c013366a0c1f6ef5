"""PPO losses and the per-token quantities they need (log-probabilities, entropy).

Shapes are [B, T] over response tokens (logits [B, T, V]), as in `rlhf_dist.rl.advantages`.
Losses are local to this rank (DDP averages the gradients); statistics are plain floats, over
all ranks when ``reduce`` (a sum over data-parallel ranks) is given. Names follow the PPO paper
and cleanrl: ``pg_loss1``, ``pg_loss2``, ``v_loss_clipped``, ``clipfrac``; the KL between the old and the new
policy carries its estimator in its name (``approx_kl_k2``, ``approx_kl_k3``: cleanrl's ``approx_kl`` is k3, TRL's
``approxkl`` k2).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from rlhf_dist.rl.advantages import Reduce, as_bool_mask, masked_moments

Aggregation = Literal["token", "sequence"]
AGGREGATIONS = ("token", "sequence")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; expected 'token' or 'sequence'")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation,
              denominator: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar (docs/ppo.md item 11).

    * ``"token"``: ``sum_{b,t} m_bt * l_bt / N``, every valid token weighs the same; N = the valid tokens.
    * ``"sequence"``: ``(1/N) sum_b (sum_t m_bt * l_bt / sum_t m_bt)``, every sequence weighs the
      same whatever its length; N = the rows with at least one valid token.

    ``denominator`` replaces N: pass the count over the WHOLE minibatch (all micro-batches, all
    ranks) and sum the micro-batch losses, and gradient accumulation over N ranks computes exactly
    the one-process loss of the minibatch. A mask with no valid token gives 0 (no NaN).
    """
    _check_aggregation(aggregation)
    m = as_bool_mask(mask, per_token)
    masked = torch.where(m, per_token, 0)
    if aggregation == "token":
        total, count = masked.sum(), m.sum().clamp_min(1)
    else:
        total, count = (masked.sum(dim=1) / m.sum(dim=1).clamp_min(1)).sum(), m.any(dim=1).sum().clamp_min(1)
    return total / (count if denominator is None else denominator)


def _global_means(per_token: list[torch.Tensor], m: torch.Tensor, reduce: Reduce | None) -> list[float]:
    """Means over valid tokens (all ranks) of several [B, T] tensors, with one collective."""
    dtype = torch.float32
    for x in per_token:
        dtype = torch.promote_types(dtype, x.dtype)
    sums = torch.stack([torch.where(m, x.detach().to(dtype), 0).sum() for x in per_token] + [m.sum().to(dtype)])
    if reduce is not None:
        sums = reduce(sums)
    count = sums[-1].clamp_min(1)
    return (sums[:-1] / count).tolist()


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float, aggregation: Aggregation = "token", reduce: Reduce | None = None,
                    denominator: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate policy loss (Schulman et al. 2017, Eq. 7; docs/ppo.md items 11 and 14).

    ::

        ratio    = exp(logp - logp_old)
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - eps, 1 + eps)
        loss     = aggregate(max(pg_loss1, pg_loss2))      # = -L^CLIP

    The max is pessimistic: with A > 0 the ratio is cut at 1 + eps, with A < 0 at 1 - eps, and a
    clipped token has zero gradient.

    Args:
        logprobs: [B, T] log-probabilities of the sampled tokens under the current policy (with grad).
        old_logprobs: [B, T] the same at rollout time (constants).
        advantages: [B, T] (whitened) advantages (constants).
        mask: [B, T] valid response tokens.
        clip_eps: epsilon (docs/ppo.md item 11: default 0.2).
        aggregation: "token" or "sequence", see `aggregate`.
        reduce: optional sum over ranks, for the statistics only.
        denominator: see `aggregate` (the token or sequence count of the whole minibatch).
    Returns:
        ``(loss, stats)``: a scalar loss local to this rank (with "token" aggregation and ranks of
        unequal token counts, DDP's mean of local means is not the global token mean); stats over
        valid tokens (all ranks): ``clipfrac`` (share with pg_loss2 > pg_loss1), ``approx_kl_k2``
        (mean 0.5 * (logp - logp_old)^2, TRL's ``approxkl``), ``approx_kl_k3`` (mean (ratio - 1) - log ratio,
        cleanrl's ``approx_kl``), ``ratio_mean``, and ``ratio_max`` (THIS rank's max: ``reduce`` can only sum).
        ``approx_kl``, the k2 value under its old name, is kept for one release (dashboards); it means k3 in
        cleanrl, so read ``approx_kl_k2`` / ``approx_kl_k3`` instead.
    """
    _check_aggregation(aggregation)
    m = as_bool_mask(mask, logprobs)
    as_bool_mask(mask, old_logprobs)
    as_bool_mask(mask, advantages)
    # Zero the padding first so garbage there cannot overflow exp() or leak NaN into gradients.
    log_ratio = torch.where(m, logprobs - torch.where(m, old_logprobs.detach(), 0), 0)
    adv = torch.where(m, advantages.detach(), 0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_losses = torch.max(pg_loss1, pg_loss2)
    loss = aggregate(pg_losses, m, aggregation, denominator)

    with torch.no_grad():
        clipfrac, approx_kl, approx_kl_k3, ratio_mean = _global_means(
            [(pg_loss2 > pg_loss1), 0.5 * log_ratio**2, torch.expm1(log_ratio) - log_ratio, ratio], m, reduce)
        ratio_max = torch.where(m, ratio, -math.inf).max().item() if ratio.numel() else -math.inf
    stats = {"clipfrac": clipfrac, "approx_kl_k2": approx_kl, "approx_kl_k3": approx_kl_k3, "approx_kl": approx_kl,
             "ratio_mean": ratio_mean, "ratio_max": ratio_max}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None, aggregation: Aggregation = "token", reduce: Reduce | None = None,
               denominator: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (docs/ppo.md item 12; as in the OpenAI baselines / cleanrl PPO)::

        v_loss_unclipped = (V - R)^2
        V_clipped        = V_old + clip(V - V_old, -c, c)
        v_loss_clipped   = (V_clipped - R)^2
        loss             = 0.5 * aggregate(max(v_loss_unclipped, v_loss_clipped))

    With ``clip_range=None`` it is ``0.5 * aggregate(v_loss_unclipped)``. Shapes [B, T]: ``values``
    with grad, ``old_values`` (rollout time) and ``returns`` (from `gae`) constants. The value
    coefficient is applied by the caller; ``denominator`` as in `aggregate`.

    Returns ``(loss, stats)``: ``vf_clipfrac`` (share of valid tokens where the clipped loss is
    larger, i.e. the max picked it; 0 without clipping) and ``value_mean``, over all ranks with ``reduce``.
    """
    _check_aggregation(aggregation)
    m = as_bool_mask(mask, values)
    as_bool_mask(mask, old_values)
    as_bool_mask(mask, returns)
    v = torch.where(m, values, 0)
    old_v = torch.where(m, old_values.detach(), 0)
    ret = torch.where(m, returns.detach(), 0)
    v_loss_unclipped = (v - ret) ** 2
    if clip_range is None:
        v_losses = v_loss_unclipped
        clipped = torch.zeros_like(m)
    else:
        # Exactly V inside the range: V_old + (V - V_old) may differ from V in the last bit, and the max
        # below would then count rounding noise as clipping (and differ between 1 and N processes).
        moved = v - old_v
        v_clipped = torch.where(moved.abs() > clip_range, old_v + torch.clamp(moved, -clip_range, clip_range), v)
        v_loss_clipped = (v_clipped - ret) ** 2
        v_losses = torch.max(v_loss_unclipped, v_loss_clipped)
        clipped = v_loss_clipped > v_loss_unclipped
    loss = 0.5 * aggregate(v_losses, m, aggregation, denominator)
    with torch.no_grad():
        vf_clipfrac, value_mean = _global_means([clipped, v], m, reduce)
    return loss, {"vf_clipfrac": vf_clipfrac, "value_mean": value_mean}


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)`` (docs/ppo.md item 13).

    ``logp[b, t] = log_softmax(logits[b, t] / temperature)[labels[b, t]]``. ``logits[:, t]`` must be the
    distribution that produced ``labels[:, t]`` (shift the model's logits by one before calling).
    Use the sampling temperature in the rollout, reference and training forwards alike.

    Args: logits [B, T, V], labels [B, T] long. Returns [B, T] in the logits' dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: need [B, T, V] and [B, T]")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: ``H = -sum_v p_v log p_v``; [B, T, V] -> [B, T].

    Computed from ``log_softmax`` (stable for large logits); tokens with probability 0
    (``-inf`` logits) contribute 0 to the value and the gradient, not NaN. Pass
    ``logits / temperature`` for the entropy of the sampling distribution.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0)).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       reduce: Reduce | None = None) -> float:
    """How much of the returns the value function explains: ``1 - Var[R - V] / Var[R]`` over valid tokens.

    1 for perfect values, 0 for a constant equal to the mean return, negative when worse than that;
    NaN when the returns have zero variance. Global over ranks with ``reduce`` (docs/ppo.md item 23).
    """
    _, var_returns, _ = masked_moments(returns, mask, reduce=reduce)
    _, var_residual, _ = masked_moments(returns.detach() - values.detach(), mask, reduce=reduce)
    if var_returns == 0:
        return math.nan
    return float(1.0 - var_residual / var_returns)
