"""Masked statistics, whitening, GAE, group baselines and REINFORCE++ over response tokens.

Shapes: every per-token tensor is ``[B, T]`` over RESPONSE tokens only (``T`` = longest response
in the batch); ``mask`` is ``[B, T]``, bool or 0/1 float, True on valid tokens and False on the
padding after each response's end (docs/ppo.md item 4). Masked positions never reach an output
at a valid position: inputs are replaced by 0 there before any arithmetic (``torch.where``, not a
multiplication, so NaN/inf garbage in the padding cannot leak), and outputs are 0 there.

Distributed statistics: ``reduce`` is an optional callable that SUMS a tensor over the
data-parallel ranks, e.g. ``lambda t: accelerator.reduce(t, "sum")``. Only sums (token counts,
sums, sums of squared deviations) are reduced, so N ranks get exactly the statistics of the
concatenated batch (item 10). It is a collective: every rank must make the same calls.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over data-parallel ranks (``accelerator.reduce(t, "sum")``); None = one process."""

WHITEN_EPS = 1e-8


def as_bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor, after checking it has the shape of ``like``."""
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the tensor it masks has shape {tuple(like.shape)}; "
                         "both must be [B, T] over response tokens")
    return mask if mask.dtype == torch.bool else mask != 0


def _sum_over_ranks(t: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    return t if reduce is None else reduce(t)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate statistics in at least float32 (bf16/fp16 sums lose too much)."""
    return torch.promote_types(x.dtype, torch.float32)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
                   reduce: Reduce | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ``(mean, var, count)`` of ``x`` over valid positions, in two passes.

    Pass 1 reduces ``[count, sum x]``; pass 2 reduces ``sum (x - mean)^2`` about the GLOBAL mean
    (two small all-reduces; exact and free of the cancellation of ``E[x^2] - E[x]^2``)::

        mean = sum_i x_i / n,    var = sum_i (x_i - mean)^2 / (n - 1 if unbiased else n)

    Raises ValueError (on every rank alike, since it tests reduced values) when there are no
    valid positions, or only one with ``unbiased=True``.
    """
    m = as_bool_mask(mask, x)
    xs = torch.where(m, x.detach().to(_acc_dtype(x)), 0)
    sums = _sum_over_ranks(torch.stack([m.sum().to(xs.dtype), xs.sum()]), reduce)
    count, total = sums[0], sums[1]
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked statistics over {int(count)} valid token(s): need at least {2 if unbiased else 1}; "
                         "check that the mask is not all zeros")
    mean = total / count
    sq_dev = _sum_over_ranks(torch.where(m, (xs - mean) ** 2, 0).sum(), reduce)
    var = sq_dev / (count - 1 if unbiased else count)
    return mean, var, count


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """Mean of ``x`` [B, T] over valid positions (all ranks if ``reduce``): ``sum_{mask} x / sum mask``.

    Returns a 0-dim tensor in ``x``'s dtype; differentiable when ``reduce`` is None (with
    ``reduce`` it is a statistic). Raises ValueError if no position is valid on any rank.
    """
    m = as_bool_mask(mask, x)
    acc = _acc_dtype(x)
    sums = _sum_over_ranks(torch.stack([torch.where(m, x, 0).sum(dtype=acc), m.sum().to(acc)]), reduce)
    if sums[1] == 0:
        raise ValueError("masked_mean over an all-zero mask: no valid token to average")
    return (sums[0] / sums[1]).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce: Reduce | None = None) -> torch.Tensor:
    """Variance of ``x`` [B, T] over valid positions (all ranks if ``reduce``); 0-dim, detached.

    ``var = sum_{mask} (x - mean)^2 / (n - 1)`` (``/ n`` if ``unbiased=False``); see `masked_moments`.
    """
    _, var, _ = masked_moments(x, mask, unbiased=unbiased, reduce=reduce)
    return var.to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce | None = None) -> torch.Tensor:
    """Whiten ``x`` [B, T] with the mean and (unbiased) variance of its valid positions on ALL ranks.

    ``x_hat = (x - mean) * rsqrt(var + 1e-8)``; with ``shift_mean=False`` the mean is added back,
    ``x_hat + mean`` (only the scale changes). Statistics come from `masked_moments`, so N ranks
    with ``reduce`` give exactly the result of one process on the whole batch (docs/ppo.md
    item 10). Returns [B, T] in ``x``'s dtype, 0 at masked positions, detached (whitening is
    applied to advantages, which are constants of the loss).
    """
    m = as_bool_mask(mask, x)
    mean, var, _ = masked_moments(x, mask, unbiased=True, reduce=reduce)
    xs = x.detach().to(mean.dtype)
    out = (xs - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0).to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (docs/ppo.md item 9).

    Schulman et al. 2016 (GAE), in the truncated form of Schulman et al. 2017 (PPO), Eqs. 11-12::

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_{t+1} = 0 after the last valid token)
        A_t     = delta_t + gamma * lam * A_{t+1}      (A = 0 after the last valid token)
        returns = A + V

    Args:
        rewards: [B, T] per-token rewards (e.g. from `kl_shaped_rewards`).
        values: [B, T] value estimates V_t of the state before token t.
        mask: [B, T], a prefix mask per row (padding only after the end). A zero inside a row
            acts as an episode end: nothing is bootstrapped across it.
        gamma, lam: discount and GAE lambda (docs/ppo.md item 9: defaults 1.0 and 0.95).

    Returns:
        ``(advantages, returns)``, both [B, T], detached, 0 at masked positions. Appending
        padding columns (any values) does not change the valid positions.
    """
    m = as_bool_mask(mask, rewards)
    as_bool_mask(mask, values)
    r = torch.where(m, rewards.detach(), 0)
    v = torch.where(m, values.detach(), 0)
    T = r.shape[1]
    next_adv = torch.zeros_like(r[:, 0])
    adv_reversed = []
    for t in reversed(range(T)):
        next_value = v[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = torch.where(m[:, t], delta + gamma * lam * next_adv, 0)
        adv_reversed.append(next_adv)
    advantages = torch.stack(adv_reversed[::-1], dim=1)
    returns = torch.where(m, advantages + v, 0)
    return advantages, returns


def _score_groups(scores: torch.Tensor, group_size: int, caller: str) -> torch.Tensor:
    """``scores`` [N] as ``[N / group_size, group_size]`` (rows ``[g*k, (g+1)*k)`` = prompt ``g``), detached, after checks."""
    if scores.dim() != 1:
        raise ValueError(f"{caller} expects scores of shape [N], got {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (samples per prompt), got {group_size!r}")
    if scores.numel() % group_size != 0:
        raise ValueError(f"{scores.numel()} scores are not a whole number of groups of group_size={group_size}; "
                         "generate group_size samples for every prompt")
    return scores.detach().reshape(-1, group_size)


def group_baseline(scores: torch.Tensor, group_size: int, kind: Literal["rloo", "grpo", "dr_grpo"],
                   eps: float = 1e-4) -> torch.Tensor:
    """Per-sequence advantages from the other samples of the same prompt (no value model).

    Rows are grouped consecutively: rows ``[g*k, (g+1)*k)`` are the ``k = group_size`` samples of
    prompt ``g``. With ``s_i`` the scores of one group:

    * ``"rloo"`` (Ahmadian et al. 2024, "Back to Basics", leave-one-out baseline):
      ``A_i = s_i - (1 / (k - 1)) * sum_{j != i} s_j``
    * ``"grpo"`` (Shao et al. 2024, DeepSeekMath, outcome supervision):
      ``A_i = (s_i - mean(s)) / (std(s) + eps)`` with the UNBIASED std (divisor ``k - 1``, like
      ``torch.std``). A group of identical scores gives 0, not NaN.
    * ``"dr_grpo"`` (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO): GRPO without
      the std division, ``A_i = s_i - mean(s)``, ``mean(s) = (1/k) sum_{j=1..k} s_j`` over the WHOLE
      group (``s_i`` included). Computed as ``c_i - mean(c)`` with ``c_i = s_i - s_1`` (the same
      number, and a group of identical scores gives exactly 0). Also the score baseline of
      OpenRLHF's ``reinforce_baseline`` / ``dr_grpo`` estimators (``rewards - rewards.mean(-1)``).

    Args:
        scores: [N] one score per sequence, N a multiple of ``group_size``.
        group_size: samples per prompt, at least 2.
    Returns:
        [N] advantages in ``scores``' dtype, detached; see `sequence_advantages_to_tokens`.
    """
    groups = _score_groups(scores, group_size, "group_baseline")
    if kind == "rloo":
        others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others_mean).reshape(-1)
    if kind == "grpo":
        centred = groups - groups.mean(dim=1, keepdim=True)
        return (centred / (groups.std(dim=1, unbiased=True, keepdim=True) + eps)).reshape(-1)
    if kind == "dr_grpo":
        shifted = groups - groups[:, :1]
        return (shifted - shifted.mean(dim=1, keepdim=True)).reshape(-1)
    raise ValueError(f"unknown group baseline kind {kind!r}; expected 'rloo' or 'grpo', or 'dr_grpo'")


def informative_groups(scores: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """Which prompt groups carry a learning signal: DAPO's dynamic sampling filter (Yu et al. 2025, Eq. 11).

    DAPO keeps a prompt only if ``0 < #{correct samples} < G``: a group whose samples all score the
    same has zero group-relative advantage (GRPO, Dr. GRPO, RLOO) and only shrinks the batch. For
    real-valued scores, with groups consecutive as in `group_baseline`::

        informative_g = max_i s_{g,i} - min_i s_{g,i} > atol

    so with ``atol=0`` (the default) a group is uninformative only if its scores are all EXACTLY
    equal. Pure: the caller drops the uninformative groups and samples more prompts to refill
    the batch (DAPO Algorithm 1).

    Args:
        scores: [N] one score per sequence, N a multiple of ``group_size``; must be finite.
        group_size: samples per prompt, at least 2.
        atol: scores within ``atol`` of each other count as equal (>= 0).
    Returns:
        [N / group_size] bool, True for the groups to keep.
    """
    groups = _score_groups(scores, group_size, "informative_groups")
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    if not bool(torch.isfinite(groups).all()):
        raise ValueError("informative_groups got a NaN or infinite score; fix the reward before filtering groups")
    if atol == 0:
        return (groups != groups[:, :1]).any(dim=1)
    return (groups.max(dim=1).values - groups.min(dim=1).values) > atol


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Token-level discounted returns (reward-to-go) over response tokens::

        G_t = r_t + gamma * G_{t+1}        (G = 0 after the last valid token)

    OpenRLHF's ``get_cumulative_returns``; `gae` with ``V = 0`` and ``lam = 1``. A zero inside a row's
    mask acts as an episode end, as in `gae` (OpenRLHF carries the return through such a hole;
    with prefix masks, ours, the two agree). Args: rewards [B, T], mask [B, T], gamma in [0, 1].
    Returns [B, T] in ``rewards``' dtype, detached, 0 at masked positions.
    """
    m = as_bool_mask(mask, rewards)
    r = torch.where(m, rewards.detach(), 0)
    running = torch.zeros_like(r[:, 0])
    out = []
    for t in reversed(range(r.shape[1])):
        running = torch.where(m[:, t], r[:, t] + gamma * running, 0)
        out.append(running)
    return torch.stack(out[::-1], dim=1) if out else r.clone()


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, reduce: Reduce | None = None, *,
                            scores: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++"): discounted returns of the per-token rewards,
    whitened over every valid token of the batch. No value model, no group normalisation.

    ::

        r'_t = r_t - [t == last valid token] * b        (b = 0 for "reinforce")
        G_t  = r'_t + gamma * G_{t+1}                    (`discounted_returns`)
        A_t  = (G_t - mean(G)) / sqrt(max(var(G), 1e-8))

    with ``r_t`` the KL-shaped rewards of `kl_shaped_rewards` (``-beta * kl_t``, plus the score on the
    last token) and mean / var over all valid tokens of all ranks (``reduce``), the variance BIASED
    (divisor n). REINFORCE++-baseline (``scores`` and ``group_size`` given): ``b`` is the mean score
    of the row's prompt group, ``b = (1/k) sum_{j in group} s_j`` (groups consecutive as in
    `group_baseline`), i.e. the score becomes ``s_i - mean(s)`` (= `group_baseline` kind "dr_grpo")
    before the returns; the same as calling `kl_shaped_rewards` with those centred scores. Pass the
    scores exactly as they sit on the last token (after any normalisation, overlong or missing-EOS
    penalty), since OpenRLHF subtracts the group mean after its length penalties. Groups must not be
    split across ranks.

    Follows OpenRLHF (``openrlhf/trainer/ppo_utils/experience_maker.py``, estimators ``reinforce`` and
    ``reinforce_baseline``, commit 3c3be6234e0cb353e76bb8019947db9dfe99fca7): the same baseline, returns,
    biased variance and ``var.clamp(min=1e-8).rsqrt()``. Differs: (1) OpenRLHF forces ``gamma = 1``
    for ``reinforce_baseline`` (here ``gamma`` is used as given; pass 1.0 to match); (2) a zero inside a
    row's mask ends the episode here (as in `gae`); (3) masked positions are 0 here, ``-mean * rstd``
    there (masked out of its loss anyway); (4) statistics accumulate in at least float32 (float64 for
    float64 input) with a two-pass variance, OpenRLHF in float32. Also unlike `whiten` (unbiased
    variance, ``rsqrt(var + 1e-8)``), on purpose, to match OpenRLHF.

    Args:
        rewards: [B, T] per-token rewards (`kl_shaped_rewards`).
        mask: [B, T] valid response tokens; at least one on some rank.
        gamma: discount (OpenRLHF's default 1.0).
        reduce: optional sum over ranks: the whitening statistics are those of all ranks.
        scores, group_size: both or neither; [B] sequence scores and samples per prompt (baseline variant).
    Returns:
        [B, T] advantages in ``rewards``' dtype, detached, 0 at masked positions.
    """
    m = as_bool_mask(mask, rewards)
    r = torch.where(m, rewards.detach(), 0)
    if (scores is None) != (group_size is None):
        raise ValueError("reinforce_pp_advantages: the baseline variant needs both `scores` and `group_size` (or neither)")
    if scores is not None:
        if scores.shape != (r.shape[0],):
            raise ValueError(f"scores must have shape [B] = [{r.shape[0]}], got {tuple(scores.shape)}")
        group_mean = _score_groups(scores, group_size, "reinforce_pp_advantages").mean(dim=1)
        baseline = group_mean.repeat_interleave(group_size).to(r.dtype)
        if r.shape[1]:  # the last valid token of each row (none in a row without valid tokens)
            positions = torch.arange(r.shape[1], device=r.device)
            last = torch.where(m, positions, -1).max(dim=1).values
            r = r - torch.where(positions[None, :] == last[:, None], baseline[:, None], 0)
    returns = discounted_returns(r, m, gamma)
    mean, var, _ = masked_moments(returns, m, unbiased=False, reduce=reduce)
    advantages = (returns.to(mean.dtype) - mean) * torch.rsqrt(var.clamp_min(WHITEN_EPS))
    return torch.where(m, advantages, 0).to(rewards.dtype)


def sequence_advantages_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sequence advantage [B] to its valid tokens: ``A[b, t] = adv[b] * mask[b, t]``, [B, T]."""
    if adv.dim() != 1 or adv.shape[0] != mask.shape[0]:
        raise ValueError(f"adv must have shape [B] = [{mask.shape[0]}], got {tuple(adv.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(m, adv[:, None], 0).to(adv.dtype)
