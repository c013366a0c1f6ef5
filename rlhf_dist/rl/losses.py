"""PPO losses (token-level, DAPO's decoupled clipping, GSPO's sequence-level ratio) and the per-token
quantities they need (log-probabilities, entropy).

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

Aggregation = Literal["token", "sequence", "constant"]
AGGREGATIONS = ("token", "sequence", "constant")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; expected 'constant', 'token' or 'sequence'")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation,
              denominator: float | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar (docs/ppo.md item 11).

    * ``"token"``: ``sum_{b,t} m_bt * l_bt / N``, every valid token weighs the same; N = the valid tokens.
    * ``"sequence"``: ``(1/N) sum_b (sum_t m_bt * l_bt / sum_t m_bt)``, every sequence weighs the
      same whatever its length; N = the rows with at least one valid token.
    * ``"constant"`` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", Sec. 3.1):
      ``sum_{b,t} m_bt * l_bt / N`` with the CONSTANT ``N = B * max_tokens``: B = the rows of ``per_token``
      (every sequence, also one without valid tokens), ``max_tokens`` = the generation budget
      (max_new_tokens). Every token weighs the same whatever the lengths in the batch, so there is no
      length bias from a per-sequence ``1/|o_i|``. As TRL's ``loss_type="dr_grpo"``.

    ``denominator`` replaces N: pass the count over the WHOLE minibatch (all micro-batches, all
    ranks) and sum the micro-batch losses, and gradient accumulation over N ranks computes exactly
    the one-process loss of the minibatch. For "constant" it replaces the whole ``B * max_tokens``
    (pass rows_in_minibatch * max_new_tokens; ``max_tokens`` is then unused, and needed only
    without ``denominator``); "token" and "sequence" ignore ``max_tokens``. A mask with no valid
    token gives 0 (no NaN).
    """
    _check_aggregation(aggregation)
    m = as_bool_mask(mask, per_token)
    masked = torch.where(m, per_token, 0)
    if aggregation == "token":
        total, count = masked.sum(), m.sum().clamp_min(1)
    elif aggregation == "sequence":
        total, count = (masked.sum(dim=1) / m.sum(dim=1).clamp_min(1)).sum(), m.any(dim=1).sum().clamp_min(1)
    else:
        total = masked.sum()
        if denominator is None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(f"aggregation 'constant' needs max_tokens (the generation budget, max_new_tokens) as "
                                 f"an integer >= 1, or a denominator; got max_tokens={max_tokens!r}")
            count = max(per_token.shape[0] * max_tokens, 1)
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


def _check_clip(low: float, high: float) -> None:
    if not (low >= 0 and high >= 0):
        raise ValueError(f"clip epsilons must be >= 0, got low={low}, high={high}")


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float, aggregation: Aggregation = "token", reduce: Reduce | None = None,
                    denominator: float | None = None, *, clip_eps_low: float | None = None,
                    clip_eps_high: float | None = None, max_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate policy loss (Schulman et al. 2017, Eq. 7; docs/ppo.md items 11 and 14).

    ::

        ratio    = exp(logp - logp_old)
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - eps_low, 1 + eps_high)
        loss     = aggregate(max(pg_loss1, pg_loss2))      # = -L^CLIP

    The max is pessimistic: with A > 0 the ratio is cut at 1 + eps_high, with A < 0 at 1 - eps_low,
    and a clipped token has zero gradient. ``eps_low = eps_high = clip_eps`` by default (PPO);
    different values are DAPO's "clip-higher" (Yu et al. 2025, "DAPO", Eq. 10: eps_low = 0.2,
    eps_high = 0.28, so that low-probability tokens can grow), as TRL's ``epsilon`` / ``epsilon_high``.

    Args:
        logprobs: [B, T] log-probabilities of the sampled tokens under the current policy (with grad).
        old_logprobs: [B, T] the same at rollout time (constants).
        advantages: [B, T] (whitened) advantages (constants).
        mask: [B, T] valid response tokens.
        clip_eps: epsilon (docs/ppo.md item 11: default 0.2).
        aggregation: "token", "sequence" or "constant", see `aggregate`.
        reduce: optional sum over ranks, for the statistics only.
        denominator: see `aggregate` (the token or sequence count of the whole minibatch, or for
            "constant" rows_in_minibatch * max_new_tokens).
        clip_eps_low, clip_eps_high: DAPO's decoupled range ``[1 - eps_low, 1 + eps_high]``; None means
            ``clip_eps`` (then the loss is bit for bit the symmetric one).
        max_tokens: the generation budget for "constant" aggregation without ``denominator``.
    Returns:
        ``(loss, stats)``: a scalar loss local to this rank (with "token" aggregation and ranks of
        unequal token counts, DDP's mean of local means is not the global token mean); stats over
        valid tokens (all ranks): ``clipfrac`` (share with pg_loss2 > pg_loss1, i.e. the max picked the
        clipped term: A > 0 with ratio > 1 + eps_high, or A < 0 with ratio < 1 - eps_low), ``approx_kl_k2``
        (mean 0.5 * (logp - logp_old)^2, TRL's ``approxkl``), ``approx_kl_k3`` (mean (ratio - 1) - log ratio,
        cleanrl's ``approx_kl``), ``ratio_mean``, and ``ratio_max`` (THIS rank's max: ``reduce`` can only sum).
        ``approx_kl``, the k2 value under its old name, is kept for one release (dashboards); it means k3 in
        cleanrl, so read ``approx_kl_k2`` / ``approx_kl_k3`` instead.
    """
    _check_aggregation(aggregation)
    low = clip_eps if clip_eps_low is None else clip_eps_low
    high = clip_eps if clip_eps_high is None else clip_eps_high
    _check_clip(low, high)
    m = as_bool_mask(mask, logprobs)
    as_bool_mask(mask, old_logprobs)
    as_bool_mask(mask, advantages)
    # Zero the padding first so garbage there cannot overflow exp() or leak NaN into gradients.
    log_ratio = torch.where(m, logprobs - torch.where(m, old_logprobs.detach(), 0), 0)
    adv = torch.where(m, advantages.detach(), 0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    pg_losses = torch.max(pg_loss1, pg_loss2)
    loss = aggregate(pg_losses, m, aggregation, denominator, max_tokens)

    with torch.no_grad():
        clipfrac, approx_kl, approx_kl_k3, ratio_mean = _global_means(
            [(pg_loss2 > pg_loss1), 0.5 * log_ratio**2, torch.expm1(log_ratio) - log_ratio, ratio], m, reduce)
        ratio_max = torch.where(m, ratio, -math.inf).max().item() if ratio.numel() else -math.inf
    stats = {"clipfrac": clipfrac, "approx_kl_k2": approx_kl, "approx_kl_k3": approx_kl_k3, "approx_kl": approx_kl,
             "ratio_mean": ratio_mean, "ratio_max": ratio_max}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None, aggregation: Aggregation = "token", reduce: Reduce | None = None,
               denominator: float | None = None, *, max_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (docs/ppo.md item 12; as in the OpenAI baselines / cleanrl PPO)::

        v_loss_unclipped = (V - R)^2
        V_clipped        = V_old + clip(V - V_old, -c, c)
        v_loss_clipped   = (V_clipped - R)^2
        loss             = 0.5 * aggregate(max(v_loss_unclipped, v_loss_clipped))

    With ``clip_range=None`` it is ``0.5 * aggregate(v_loss_unclipped)``. Shapes [B, T]: ``values``
    with grad, ``old_values`` (rollout time) and ``returns`` (from `gae`) constants. The value
    coefficient is applied by the caller; ``denominator`` and ``max_tokens`` (for "constant") as in `aggregate`.

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
    loss = 0.5 * aggregate(v_losses, m, aggregation, denominator, max_tokens)
    with torch.no_grad():
        vf_clipfrac, value_mean = _global_means([clipped, v], m, reduce)
    return loss, {"vf_clipfrac": vf_clipfrac, "value_mean": value_mean}


def sequence_importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level importance ratio (Zheng et al. 2025, "Group Sequence Policy Optimization", Eq. 7)::

        s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp((1/|y_i|) sum_t m_it (logp_it - logp_old_it))

    the geometric mean of the token ratios over the valid tokens (``|y_i| = sum_t m_it``); 1 for a
    row without valid tokens. [B, T] -> [B], differentiable in ``logprobs``, accumulated in at least
    float32 (a mean over hundreds of bf16 log-ratios would lose too much).
    """
    m = as_bool_mask(mask, logprobs)
    as_bool_mask(mask, old_logprobs)
    acc = torch.promote_types(logprobs.dtype, torch.float32)
    log_ratio = torch.where(m, logprobs.to(acc) - torch.where(m, old_logprobs.detach(), 0).to(acc), 0)
    return torch.exp(log_ratio.sum(dim=1) / m.sum(dim=1).clamp_min(1).to(acc))


def gspo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_eps_low: float, clip_eps_high: float, reduce: Reduce | None = None,
                     denominator: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO policy loss: PPO's clipped objective on the sequence-level ratio (Zheng et al. 2025, Eqs. 5-7).

    ::

        s_i    = exp(mean_t (logp_it - logp_old_it))                 (`sequence_importance_ratio`)
        l_i    = max(-A_i * s_i, -A_i * clip(s_i, 1 - eps_low, 1 + eps_high))
        loss   = (1/N) sum_i l_i                                       # = -J_GSPO

    A whole sequence is clipped or not; the gradient flows through ``s_i`` (for an unclipped
    sequence ``d l_i / d logp_it = -A_i * s_i / |y_i|``). The paper's ranges are small (eps_low = 3e-4,
    eps_high = 4e-4), since ``s_i`` is a per-token geometric mean.

    Advantages [B] (the paper's ``A_i``, e.g. `group_baseline`) or [B, T]: per-token advantages give
    ``l_i = mean_t max(-A_it * s_i, -A_it * clip(s_i))`` over the valid tokens, the same number for
    an advantage constant along the sequence (the convention of TRL's GRPOTrainer with
    ``importance_sampling_level="sequence"``, ``loss_type="grpo"``: its per-token loss is [B, 1] times the
    advantages; it is not GSPO-token, whose gradient uses each token's own ratio).

    Agrees with TRL (trl 1.16.0 ``GRPOTrainer._compute_loss``, importance_sampling_level="sequence",
    loss_type="grpo", beta=0): the same ``s_i``, clip and per-sequence loss, averaged over sequences.
    Differs: TRL's ``.mean()`` also counts rows without valid tokens (here N = rows with a valid
    token, as `aggregate` "sequence"; pass ``denominator`` to count them), TRL's ``log_ratio * mask``
    lets NaN in padding through (zeroed here), and TRL's loss types "bnpo", "dr_grpo", "dapo" SUM the
    [B, 1] sequence loss over tokens (each sequence weighted by its length: not GSPO, as TRL warns).

    Args:
        logprobs: [B, T] with grad; old_logprobs: [B, T] rollout-time (constants).
        advantages: [B] or [B, T] (constants).
        mask: [B, T] valid response tokens.
        clip_eps_low, clip_eps_high: the sequence-ratio clip range ``[1 - eps_low, 1 + eps_high]``.
        reduce: optional sum over ranks, for the statistics only.
        denominator: replaces N; the number of sequences of the WHOLE minibatch (all micro-batches,
            all ranks), so that summed micro-batch losses give the minibatch loss.
    Returns:
        ``(loss, stats)``: a scalar (in at least float32) local to this rank; stats over all ranks:
        ``clipfrac`` (share of valid tokens whose term the max took clipped: for [B] advantages the
        share of tokens in clipped sequences, the measure of GSPO's Fig. 4; comparable with
        `ppo_policy_loss`), ``seq_clipfrac`` (share of sequences with a clipped term), ``ratio_mean``
        (mean of ``s_i`` over sequences), ``ratio_max`` (THIS rank's max ``s_i``), ``approx_kl_k2`` and
        ``approx_kl_k3`` (token-level, as in `ppo_policy_loss`).
    """
    _check_clip(clip_eps_low, clip_eps_high)
    m = as_bool_mask(mask, logprobs)
    seq_ratio = sequence_importance_ratio(logprobs, old_logprobs, m)
    has_token = m.any(dim=1)
    clipped_ratio = torch.clamp(seq_ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    if advantages.dim() == 1:
        if advantages.shape != (m.shape[0],):
            raise ValueError(f"advantages must have shape [B] = [{m.shape[0]}] or [B, T], got {tuple(advantages.shape)}")
        adv = torch.where(has_token, advantages.detach(), 0).to(seq_ratio.dtype)
        loss1, loss2 = -adv * seq_ratio, -adv * clipped_ratio
        per_sequence = torch.max(loss1, loss2)
        clipped = (loss2 > loss1)[:, None] & m
    else:
        adv = torch.where(as_bool_mask(mask, advantages), advantages.detach(), 0).to(seq_ratio.dtype)
        loss1, loss2 = -adv * seq_ratio[:, None], -adv * clipped_ratio[:, None]
        per_sequence = torch.where(m, torch.max(loss1, loss2), 0).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        clipped = (loss2 > loss1) & m
    total = torch.where(has_token, per_sequence, 0).sum()
    loss = total / (has_token.sum().clamp_min(1) if denominator is None else denominator)

    with torch.no_grad():
        log_ratio = torch.where(m, logprobs.detach().to(seq_ratio.dtype) - torch.where(m, old_logprobs, 0), 0)
        parts = [clipped.sum(), m.sum(), (0.5 * log_ratio**2).sum(), (torch.expm1(log_ratio) - log_ratio).sum(),
                 clipped.any(dim=1).sum(), torch.where(has_token, seq_ratio.detach(), 0).sum(), has_token.sum()]
        sums = torch.stack([x.to(seq_ratio.dtype) for x in parts])
        if reduce is not None:
            sums = reduce(sums)
        tokens, sequences = sums[1].clamp_min(1), sums[6].clamp_min(1)
        clipfrac, k2, k3 = (sums[[0, 2, 3]] / tokens).tolist()
        seq_clipfrac, ratio_mean = (sums[[4, 5]] / sequences).tolist()
        ratio_max = torch.where(has_token, seq_ratio.detach(), -math.inf).max().item() if has_token.numel() else -math.inf
    stats = {"clipfrac": clipfrac, "seq_clipfrac": seq_clipfrac, "approx_kl_k2": k2, "approx_kl_k3": k3,
             "ratio_mean": ratio_mean, "ratio_max": ratio_max}
    return loss, stats


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
