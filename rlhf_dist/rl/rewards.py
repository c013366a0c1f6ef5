"""From sampled responses to per-token rewards: truncation, score normalisation, KL shaping, DAPO's
overlong shaping and filtering.

docs/ppo.md items 2, 3, 5, 6 and 8. Shapes are [B, T] over response tokens, as in
`rlhf_dist.rl.advantages`; ``reduce`` sums a tensor over data-parallel ranks (None = one process).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_dist.rl.advantages import Reduce, as_bool_mask, masked_moments


def first_stop_truncate(response_ids: torch.Tensor, stop_ids: list[int],
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut every response after its first stop token (docs/ppo.md items 2 and 3).

    Tokens up to AND including the first token in ``stop_ids`` are kept; everything after becomes
    ``pad_id``. The mask is built from the lengths found here, never from ``ids != pad_id``, so it
    is right when the pad token is the EOS token.

    Args:
        response_ids: [B, T] LongTensor, generated tokens only (no prompt).
        stop_ids: token ids that end a response (EOS, end-of-turn, ...); may be empty.
        pad_id: id written after the stop token.
    Returns:
        ``(ids, mask, lengths, ended)``: ids [B, T] (a new tensor), mask [B, T] bool (True on kept
        tokens), lengths [B] long (kept tokens per row), ended [B] bool (a stop token occurred;
        False means the response ran to T tokens without stopping, see item 5).
    """
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be [B, T], got shape {tuple(response_ids.shape)}")
    B, T = response_ids.shape
    stops = torch.as_tensor(list(stop_ids), dtype=response_ids.dtype, device=response_ids.device)
    is_stop = torch.isin(response_ids, stops)
    ended = is_stop.any(dim=1)
    first_stop = is_stop.int().argmax(dim=1)  # first True; 0 for rows without a stop (masked out below)
    lengths = torch.where(ended, first_stop + 1, T).long()
    mask = torch.arange(T, device=response_ids.device)[None, :] < lengths[:, None]
    ids = torch.where(mask, response_ids, pad_id)
    return ids, mask, lengths, ended


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                      missing_eos_penalty: float | None = None, ended: torch.Tensor | None = None,
                      reduce: Reduce | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token rewards: a KL penalty on every token, the score on the last one (docs/ppo.md items 5, 6).

    Ziegler et al. 2019 (``R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))``), spread over
    tokens as in lm-human-preferences::

        r_t = -kl_coef * kl_t + [t == last valid token] * (score - penalty * [not ended])

    and ``r_t = 0`` at padding.

    Args:
        scores: [B] reward-model scores of prompt + truncated response (already normalised/clipped).
        kl: [B, T] per-token KL estimate (`kl_estimate`).
        mask: [B, T]; every row needs at least one valid token (the score must land somewhere).
        kl_coef: beta, e.g. ``controller.value``.
        missing_eos_penalty: subtracted from the score of rows with ``ended == False`` (item 5).
        ended: [B] bool from `first_stop_truncate`; required with ``missing_eos_penalty``.
        reduce: optional sum over ranks for the statistics.
    Returns:
        ``(rewards, stats)``: rewards [B, T] detached; stats (means over sequences, all ranks):
        ``score`` (the scores as given), ``non_score_reward`` (sum_t -kl_coef * kl_t),
        ``kl`` (sum_t kl_t), ``rlhf_reward`` (score after penalty + non_score_reward).
    """
    m = as_bool_mask(mask, kl)
    if scores.shape != (kl.shape[0],):
        raise ValueError(f"scores must have shape [B] = [{kl.shape[0]}], got {tuple(scores.shape)}")
    if missing_eos_penalty is not None and ended is None:
        raise ValueError("missing_eos_penalty needs `ended` (from first_stop_truncate) to know which rows did not stop")
    if not bool(m.any(dim=1).all()):
        raise ValueError("a response has no valid token, so its score has nowhere to go; "
                         "keep at least the first token of every response")
    T = kl.shape[1]
    kl = torch.where(m, kl.detach(), 0)
    non_score = -kl_coef * kl
    final_score = scores.detach().to(non_score.dtype)
    if missing_eos_penalty is not None:
        final_score = final_score - missing_eos_penalty * (~ended.bool()).to(final_score.dtype)
    positions = torch.arange(T, device=kl.device)
    last = torch.where(m, positions, -1).max(dim=1).values
    at_last = positions[None, :] == last[:, None]
    rewards = non_score + torch.where(at_last, final_score[:, None], 0)

    per_seq = torch.stack([scores.detach().to(kl.dtype), non_score.sum(1), kl.sum(1), final_score + non_score.sum(1)])
    sums = torch.cat([per_seq.sum(dim=1), per_seq.new_tensor([kl.shape[0]])])
    if reduce is not None:
        sums = reduce(sums)
    means = (sums[:-1] / sums[-1]).tolist()
    stats = dict(zip(("score", "non_score_reward", "kl", "rlhf_reward"), means))
    return rewards, stats


class RunningMoments:
    """Running mean, variance and count of all scores seen so far, on all ranks (docs/ppo.md item 8).

    Each ``update`` computes the batch's exact global (count, mean, sum of squared deviations)
    with `masked_moments` and merges it into the running values with the parallel form of
    Welford's algorithm (Chan, Golub & LeVeque 1979)::

        delta = mean_b - mean_a,   n = n_a + n_b
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n,    var = M2 / n   (population variance)

    so two updates with halves equal one update with the concatenation, and N ranks with
    ``reduce`` equal one process. State is Python floats (float64), checkpointed by ``state_dict``.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0
        self.count = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor, reduce: Reduce | None = None) -> None:
        """Merge the values of ``x`` (any shape, e.g. scores [B]) from all ranks into the moments."""
        x = x.detach().reshape(-1).double()
        mean_b, var_b, count_b = (float(t) for t in masked_moments(x, torch.ones_like(x, dtype=torch.bool),
                                                                     unbiased=False, reduce=reduce))
        total = self.count + count_b
        delta = mean_b - self.mean
        m2 = self.var * self.count + var_b * count_b + delta**2 * self.count * count_b / total
        self.mean += delta * count_b / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def normalize_scores(scores: torch.Tensor, moments: RunningMoments | None, clip: float | None,
                     eps: float = 1e-8) -> torch.Tensor:
    """Optionally normalise, then optionally clip, reward-model scores (docs/ppo.md item 8).

    ``s' = (s - mean) / (std + eps)`` with the running moments (skipped when ``moments`` is None),
    then ``clip(s', -clip, clip)`` (skipped when ``clip`` is None). Pure: update the moments
    first (``moments.update(scores, reduce)``) if the current batch should count. Returns a new [B].
    """
    out = scores.detach().clone()
    if moments is not None:
        if moments.count == 0:
            raise ValueError("normalize_scores got RunningMoments that have seen no scores; call moments.update(scores) first")
        out = (out - moments.mean) / (moments.std + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


def fit_gain_bias(scores: torch.Tensor, target_mean: float = 0.0, target_std: float = 1.0,
                  reduce: Reduce | None = None) -> tuple[float, float]:
    """A fixed gain and bias that give ``scores`` the target mean and std (docs/ppo.md item 8).

    As lm-human-preferences (``rewards.py::set_reward_norm`` with the statistics of
    ``train_reward.py::stats``, on samples of the initial policy, target mean 0 / std 1)::

        gain = target_std / std(s),    bias = target_mean - gain * mean(s)

    so ``gain * s + bias`` has exactly the target mean and std over the given scores. ``std`` is the
    POPULATION (biased, divisor n) std, as there (``sqrt(E[s^2] - E[s]^2)``; computed here in two passes
    in float64, the same number without the cancellation), over all ranks with ``reduce``. Fit it
    once, on the scores of rollouts of the initial policy, keep the two floats fixed for the run
    (checkpoint them), and apply them with `apply_gain_bias`.

    Args:
        scores: reward-model scores, any shape (e.g. [N]); at least two distinct values over all ranks.
        target_mean, target_std: the wanted mean and std (``target_std > 0``).
        reduce: optional sum over ranks.
    Returns:
        ``(gain, bias)`` as Python floats.
    """
    if not target_std > 0:
        raise ValueError(f"target_std must be > 0, got {target_std}")
    x = scores.detach().reshape(-1).double()
    mean, var, _ = masked_moments(x, torch.ones_like(x, dtype=torch.bool), unbiased=False, reduce=reduce)
    std = math.sqrt(float(var))
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"cannot fit a reward gain to scores with std {std} (all equal, or not finite)")
    gain = target_std / std
    return gain, target_mean - gain * float(mean)


def apply_gain_bias(scores: torch.Tensor, gain: float, bias: float) -> torch.Tensor:
    """``gain * s + bias`` (see `fit_gain_bias`): a new detached tensor in ``scores``' dtype and shape."""
    return scores.detach() * gain + bias


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", Eq. 13), added to the score::

        R_length(L) = 0                                  if L <= max_len - cache_len
                    = ((max_len - cache_len) - L) / cache_len   if max_len - cache_len < L <= max_len
                    = -1                                 if L > max_len

    a linear ramp from 0 to -1 over the last ``cache_len`` tokens of the budget (DAPO: max_len = 20480,
    cache_len = 4096). Equal to OpenRLHF's ``apply_overlong_penalty`` with ``overlong_penalty_factor = 1``
    (``-min(L - (max_len - cache_len), cache_len) / cache_len`` when positive); scale it for another factor.

    Args:
        lengths: [B] response lengths (valid tokens, e.g. from `first_stop_truncate`).
        max_len: the generation budget L_max (max_new_tokens); cache_len: L_cache, 0 < cache_len <= max_len.
        dtype: of the result (default: torch's default float dtype).
    Returns:
        [B] penalties in [-1, 0].
    """
    if isinstance(cache_len, bool) or not (0 < cache_len <= max_len):
        raise ValueError(f"overlong_penalty needs 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape [B], got {tuple(lengths.shape)}")
    L = lengths.detach().double()
    expected = float(max_len - cache_len)
    ramp = (expected - L) / cache_len
    out = torch.where(L <= expected, torch.zeros_like(L), torch.where(L <= max_len, ramp, torch.full_like(L, -1.0)))
    return out.to(dtype or torch.get_default_dtype())


def overlong_filter_mask(mask: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering (Yu et al. 2025, Sec. 3.4): truncated samples leave the loss.

    ``mask'[b, t] = mask[b, t] and ended[b]``: the rows that hit the budget without a stop token
    (``ended == False`` from `first_stop_truncate`) get no valid token, so no loss term and no
    gradient. Use it for the LOSS (and its ``denominator``); keep the full mask for the rewards
    (`kl_shaped_rewards` needs a valid token in every row). Args: mask [B, T], ended [B] bool.
    Returns a new [B, T] bool mask.
    """
    if ended.shape != (mask.shape[0],):
        raise ValueError(f"ended must have shape [B] = [{mask.shape[0]}], got {tuple(ended.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return m & ended.to(device=m.device, dtype=torch.bool)[:, None]
