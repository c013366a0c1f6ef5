"""DAPO, Dr. GRPO, REINFORCE++, GSPO and reward gain/bias (rlhf_dist.rl) against plain loops, numbers worked out by
hand, and the few lines of peers' code (OpenRLHF, TRL, lm-human-preferences) that define their conventions.

As in test_rl_math.py: [B, T] tensors over response tokens with a mask, float64 wherever a loop is the reference,
data-parallel ranks simulated with threads and an all-reduce built on a barrier. The peer code copied below is the
REFERENCE of a test, each block naming the file and commit (or release) it came from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import on_ranks, pad_mask, with_garbage

from rlhf_dist.rl import (
    aggregate,
    apply_gain_bias,
    discounted_returns,
    fit_gain_bias,
    group_baseline,
    gspo_policy_loss,
    informative_groups,
    kl_shaped_rewards,
    overlong_filter_mask,
    overlong_penalty,
    ppo_policy_loss,
    reinforce_pp_advantages,
    sequence_advantages_to_tokens,
    sequence_importance_ratio,
    value_loss,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers (as in test_rl_math.py)

def ragged(B: int, T: int, seed: int, min_len: int = 1) -> tuple[torch.Tensor, list[int]]:
    """A prefix mask [B, T] with random lengths in [min_len, T] (row 0 of full length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None], lengths


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def grad_of(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x'), d fn / d x')`` with x' a leaf copy of ``x``."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward()
    return out.detach(), leaf.grad


# ----------------------------------------------------------------------------- peers' code, the references

def trl_grpo_loss(per_token_logps, old_per_token_logps, advantages, mask, epsilon_low, epsilon_high,
                  importance_sampling_level, loss_type, max_completion_length=None):
    """TRL's GRPO policy loss, copied from trl 1.16.0 (the version in .venv), trl/trainer/grpo_trainer.py,
    GRPOTrainer._compute_loss, lines 3083-3120 and 3153-3164. Cut to beta = 0, no delta, no entropy mask, no vLLM
    correction, one process, no gradient accumulation (normalizer 1); ``self.*`` became arguments."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    # ... and its clip statistic (lines 3274-3276; for the sequence level a mean over sequences)
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    return loss, is_region_clipped


def openrlhf_reinforce(scores, kl, action_mask, kl_coef, gamma, estimator, n_samples_per_prompt):
    """OpenRLHF's REINFORCE++ / REINFORCE++-baseline advantages, copied from OpenRLHF/OpenRLHF at commit
    3c3be6234e0cb353e76bb8019947db9dfe99fca7: openrlhf/trainer/ppo_utils/experience_maker.py
    (``compute_advantages_and_returns``, ``get_cumulative_returns``) and openrlhf/models/utils.py (``compute_reward``).
    Cut to one experience holding the whole batch in prompt order (no index shuffling), no reward clip range, no
    length penalty, ``args.*`` as arguments; ``.float()`` became ``.double()`` in the whitening so that the comparison
    can be tight."""
    rewards = scores.reshape(-1, n_samples_per_prompt)
    if estimator in ["reinforce_baseline", "dr_grpo"]:
        rewards = rewards - rewards.mean(-1, keepdim=True)
    r = rewards.reshape(-1)
    # compute_reward
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    reward = last_reward + kl_reward
    # get_cumulative_returns (gamma is forced to 1.0 for reinforce_baseline)
    if gamma != 1.0 and estimator in ["rloo", "reinforce_baseline", "group_norm", "dr_grpo"]:
        gamma = 1.0
    response_length = reward.size(1)
    returns = torch.zeros_like(reward)
    cumulative_return = torch.zeros(reward.size(0), device=reward.device)
    reward = action_mask * reward
    for t in reversed(range(response_length)):
        cumulative_return = reward[:, t] + gamma * cumulative_return
        returns[:, t] = cumulative_return
    advantages = returns.clone()
    # Normalize advantages across all experiences
    all_advantages = advantages.flatten().double()
    all_action_masks = action_mask.flatten()
    num_actions = all_action_masks.sum()
    mean = (all_advantages * all_action_masks).sum() / num_actions
    var = ((all_advantages - mean).pow(2) * all_action_masks).sum() / num_actions
    rstd = var.clamp(min=1e-8).rsqrt()
    return (advantages - mean) * rstd


def openrlhf_overlong_penalty(lengths, max_new_tokens, overlong_buffer_len, overlong_penalty_factor=1.0):
    """OpenRLHF's DAPO overlong penalty, openrlhf/trainer/ppo_utils/length_penalty.py::apply_overlong_penalty at
    commit 3c3be6234e0cb353e76bb8019947db9dfe99fca7 (the per-sample loop; the penalty instead of adding it to rewards)."""
    expected_len = max_new_tokens - overlong_buffer_len
    out = []
    for valid_response_length in lengths:
        exceed_len = min(valid_response_length - expected_len, overlong_buffer_len)
        out.append(-exceed_len / overlong_buffer_len * overlong_penalty_factor if exceed_len > 0 else 0.0)
    return out


def lmhp_gain_bias(rewards: np.ndarray, num_ranks: int, new_mean: float, new_std: float) -> tuple[float, float]:
    """lm-human-preferences' reward normalisation, copied from openai/lm-human-preferences at commit
    cbfd210bb8b08f6bc5c26878c10984b90f516c66: lm_human_preferences/train_reward.py (``stats``: MPI allreduce of the sums,
    here the ranks' rows concatenated) and lm_human_preferences/rewards.py (``set_reward_norm``)."""
    sums = np.asarray([rewards.sum(axis=0), np.square(rewards).sum(axis=0)])
    means, sqr_means = sums / (num_ranks * (rewards.shape[0] // num_ranks))
    stds = np.sqrt(sqr_means - means ** 2)
    old_mean, old_std = means, stds
    gain = new_std / old_std
    bias = new_mean - gain * old_mean
    return float(gain), float(bias)


# ============================================================================= 1. DAPO decoupled clipping

@pytest.mark.parametrize(
    "ratio,A,loss,clipfrac,grad",
    [
        # eps_low = 0.2, eps_high = 0.28: the range is [0.8, 1.28]. loss = max(-A r, -A clip(r)); grad = d loss / d logp.
        (1.25, 1.0, -1.25, 0.0, -1.25),  # A > 0, 1.2 < r < 1.28: PPO's symmetric 0.2 would clip it, clip-higher does not
        (1.30, 1.0, -1.28, 1.0, 0.0),    # A > 0, r above 1.28: clipped at 1 + eps_high, no gradient
        (0.75, -1.0, 0.80, 1.0, 0.0),    # A < 0, r below 0.8: clipped at 1 - eps_low, no gradient
        (0.85, -1.0, 0.85, 0.0, 0.85),   # inside: -A r, gradient -A r
        (1.30, -1.0, 1.30, 0.0, 1.30),   # A < 0 above the range: the max picks -A r, not clipped
        (0.75, 1.0, -0.75, 0.0, -0.75),  # A > 0 below the range: not clipped
    ],
)
def test_dapo_clip_higher_one_token_by_hand(ratio, A, loss, clipfrac, grad):
    logp = torch.tensor([[math.log(ratio)]], dtype=F64)
    old, adv, mask = torch.zeros(1, 1, dtype=F64), torch.tensor([[A]], dtype=F64), torch.ones(1, 1)
    out, g = grad_of(lambda lp: ppo_policy_loss(lp, old, adv, mask, 0.2, clip_eps_low=0.2, clip_eps_high=0.28)[0], logp)
    assert out.item() == pytest.approx(loss, abs=1e-12)
    assert g.item() == pytest.approx(grad, abs=1e-12)
    _, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, clip_eps_low=0.2, clip_eps_high=0.28)
    assert stats["clipfrac"] == clipfrac
    assert stats["ratio_mean"] == pytest.approx(ratio) and stats["approx_kl_k3"] == pytest.approx(ratio - 1 - math.log(ratio))
    if ratio == 1.25:  # the symmetric loss does clip here: the two really differ
        assert ppo_policy_loss(logp, old, adv, mask, 0.2)[0].item() == pytest.approx(-1.2)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_dapo_defaults_are_bit_for_bit_the_symmetric_loss(dtype, aggregation):
    mask, _ = ragged(6, 8, seed=3)
    old, adv = (randn(6, 8, seed=4) * 0.1).to(dtype), randn(6, 8, seed=5).to(dtype)
    logp = old + (randn(6, 8, seed=6) * 0.4).to(dtype)  # many ratios outside [0.8, 1.2]
    ref_loss, ref_grad = grad_of(lambda lp: ppo_policy_loss(lp, old, adv, mask, 0.2, aggregation)[0], logp)
    ref_stats = ppo_policy_loss(logp, old, adv, mask, 0.2, aggregation)[1]
    assert 0 < ref_stats["clipfrac"] < 1
    for kwargs, clip_eps in (({"clip_eps_low": None, "clip_eps_high": None}, 0.2), ({"clip_eps_low": 0.2}, 0.2),
                             ({"clip_eps_high": 0.2}, 0.2), ({"clip_eps_low": 0.2, "clip_eps_high": 0.2}, 0.2),
                             ({"clip_eps_low": 0.2, "clip_eps_high": 0.2}, 0.9)):  # clip_eps unused when both are given
        loss, grad = grad_of(lambda lp: ppo_policy_loss(lp, old, adv, mask, clip_eps, aggregation, **kwargs)[0], logp)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
        assert ppo_policy_loss(logp, old, adv, mask, clip_eps, aggregation, **kwargs)[1] == ref_stats


def ppo_loop(logp, old, adv, lengths, low, high):
    """Per-token clipped losses and clipped flags as nested lists (rows cut to their lengths)."""
    losses, clipped = [], []
    for b, n in enumerate(lengths):
        row, flags = [], []
        for t in range(n):
            r = math.exp(logp[b][t] - old[b][t])
            unclipped, clip = -adv[b][t] * r, -adv[b][t] * min(max(r, 1 - low), 1 + high)
            row.append(max(unclipped, clip))
            flags.append(clip > unclipped)
        losses.append(row)
        clipped.append(flags)
    return losses, clipped


@pytest.mark.parametrize("seed", [0, 1])
def test_dapo_loss_and_clipfrac_match_loop(seed):
    mask, lengths = ragged(6, 9, seed)
    logp, old, adv = randn(6, 9, seed=seed) * 0.3, randn(6, 9, seed=seed + 1) * 0.3, randn(6, 9, seed=seed + 2)
    rows, flags = ppo_loop(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.1, 0.35)
    n = sum(lengths)
    expected = {"token": sum(map(sum, rows)) / n, "sequence": sum(sum(r) / len(r) for r in rows) / len(rows),
                "constant": sum(map(sum, rows)) / (6 * 12)}
    for aggregation, value in expected.items():
        loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, aggregation, clip_eps_low=0.1, clip_eps_high=0.35,
                                      max_tokens=12)
        assert loss.item() == pytest.approx(value, abs=1e-12)
        assert stats["clipfrac"] == pytest.approx(sum(map(sum, flags)) / n, abs=1e-12)
    assert 0 < sum(map(sum, flags)) < n


@pytest.mark.parametrize("level,ours", [("token", "token"), ("token", "sequence"), ("token", "constant")])
def test_dapo_loss_agrees_with_trl(level, ours):
    """TRL's token-level loss with epsilon / epsilon_high: its "bnpo" is our "token", "grpo" our "sequence", "dr_grpo"
    our "constant" (max_completion_length = max_tokens). Masks without empty rows, finite padding (TRL multiplies by
    the mask, which would pass NaN on)."""
    mask, _ = ragged(5, 7, seed=8)
    old, adv = randn(5, 7, seed=9) * 0.2, randn(5, seed=10)
    logp = old + randn(5, 7, seed=11) * 0.3
    trl_type = {"token": "bnpo", "sequence": "grpo", "constant": "dr_grpo"}[ours]
    ref, ref_grad = grad_of(lambda lp: trl_grpo_loss(lp, old, adv, mask.double(), 0.2, 0.28, level, trl_type, 9)[0], logp)
    got, grad = grad_of(lambda lp: ppo_policy_loss(lp, old, sequence_advantages_to_tokens(adv, mask), mask, 0.2, ours,
                                                   clip_eps_low=0.2, clip_eps_high=0.28, max_tokens=9)[0], logp)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    _, region = trl_grpo_loss(logp, old, adv, mask.double(), 0.2, 0.28, level, trl_type, 9)
    _, stats = ppo_policy_loss(logp, old, sequence_advantages_to_tokens(adv, mask), mask, 0.2, ours,
                               clip_eps_low=0.2, clip_eps_high=0.28, max_tokens=9)
    assert stats["clipfrac"] == pytest.approx(region[mask].double().mean().item(), abs=1e-12)  # TRL's region_mean


@pytest.mark.parametrize("aggregation,count", [("token", None), ("sequence", 6.0), ("constant", 6.0 * 10)])
def test_dapo_micro_batches_with_the_minibatch_denominator_sum_to_the_whole(aggregation, count):
    mask, _ = ragged(6, 8, seed=12)
    count = float(mask.sum()) if count is None else count
    logp, old, adv = randn(6, 8, seed=13) * 0.3, randn(6, 8, seed=14) * 0.3, randn(6, 8, seed=15)
    kw = {"clip_eps_low": 0.15, "clip_eps_high": 0.3}
    whole, whole_grad = grad_of(lambda lp: ppo_policy_loss(lp, old, adv, mask, 0.2, aggregation, max_tokens=10, **kw)[0], logp)
    leaf = logp.clone().requires_grad_(True)
    parts = [ppo_policy_loss(leaf[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2, aggregation,
                             denominator=count, **kw)[0] for i in (0, 2, 4)]
    sum(parts).backward()
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(leaf.grad, whole_grad, rtol=0, atol=1e-12)


def test_dapo_stats_on_two_ranks_equal_whole_batch():
    mask, _ = ragged(6, 7, seed=9)
    logp, old, adv = randn(6, 7, seed=1) * 0.3, randn(6, 7, seed=2) * 0.3, randn(6, 7, seed=3)
    kw = {"clip_eps_low": 0.1, "clip_eps_high": 0.3}
    _, full = ppo_policy_loss(logp, old, adv, mask, 0.2, **kw)
    per_rank = on_ranks(2, lambda r, reduce: ppo_policy_loss(logp[3 * r:3 * r + 3], old[3 * r:3 * r + 3], adv[3 * r:3 * r + 3],
                                                             mask[3 * r:3 * r + 3], 0.2, reduce=reduce, **kw)[1])
    for stats in per_rank:
        for key in ("clipfrac", "approx_kl_k2", "approx_kl_k3", "ratio_mean"):
            assert stats[key] == pytest.approx(full[key], abs=1e-12)
    with pytest.raises(ValueError, match="clip epsilons must be >= 0"):
        ppo_policy_loss(logp, old, adv, mask, 0.2, clip_eps_low=-0.1)


# ============================================================================= 2. Dr. GRPO

def test_dr_grpo_group_baseline_by_hand():
    # Group 1: mean 2.5 -> [-1.5, -0.5, 0.5, 1.5] (GRPO would divide by sqrt(5/3) + 1e-4).
    # Group 2: all 0.1 -> exactly 0.  Group 3: mean 1 -> [-1, -1, 1, 1]
    scores = torch.tensor([1, 2, 3, 4, 0.1, 0.1, 0.1, 0.1, 0, 0, 2, 2], dtype=F64)
    adv = group_baseline(scores, 4, "dr_grpo")
    assert adv[:4].tolist() == [-1.5, -0.5, 0.5, 1.5]
    assert (adv[4:8] == 0).all() and adv[8:].tolist() == [-1.0, -1.0, 1.0, 1.0]
    grpo = group_baseline(scores, 4, "grpo")
    torch.testing.assert_close(adv[:4], grpo[:4] * (math.sqrt(5 / 3) + 1e-4), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected 'rloo' or 'grpo', or 'dr_grpo'"):
        group_baseline(scores, 4, "drgrpo")


def test_dr_grpo_group_baseline_agrees_with_openrlhf():
    scores = randn(24, seed=3) * 5 + 100
    # OpenRLHF experience_maker.py (commit 3c3be62), estimators "reinforce_baseline" and "dr_grpo":
    rewards = scores.reshape(-1, 6)
    rewards = rewards - rewards.mean(-1, keepdim=True)
    torch.testing.assert_close(group_baseline(scores, 6, "dr_grpo"), rewards.reshape(-1), rtol=0, atol=1e-12)
    # All-equal groups give exactly 0, also where s - mean(s) does not: (0.1 + 0.1 + 0.1) / 3 != 0.1 in binary.
    constant = torch.full((6,), 0.1, dtype=F64)
    assert (group_baseline(constant, 3, "dr_grpo") == 0).all()
    assert (constant.reshape(2, 3) - constant.reshape(2, 3).mean(-1, keepdim=True)).abs().max() > 0


def test_constant_aggregation_by_hand():
    # Row 0: tokens 1, 2, 3; row 1: token 4 (then NaN/inf padding); row 2: no valid token (still one of the B = 3 rows).
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, math.nan, math.inf], [math.nan, -math.inf, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert aggregate(per_token, mask, "constant", max_tokens=4).item() == 10 / (3 * 4)  # sum 10 / (B * max_tokens)
    assert aggregate(per_token, mask, "constant", denominator=5.0, max_tokens=4).item() == 2.0  # the whole divisor replaced
    assert aggregate(per_token, mask, "token").item() == 2.5                                  # 10 / 4 tokens
    assert aggregate(per_token, mask, "sequence", max_tokens=4).item() == 3.0                 # (6/3 + 4/1) / 2 rows
    assert aggregate(per_token, torch.zeros_like(mask), "constant", max_tokens=4).item() == 0.0
    for bad in (None, 0, True):
        with pytest.raises(ValueError, match="needs max_tokens"):
            aggregate(per_token, mask, "constant", max_tokens=bad)
    with pytest.raises(ValueError, match="'token' or 'sequence'"):  # the message test_rl_math.py checks
        aggregate(per_token, mask, "batch")


def test_constant_aggregation_weighs_every_token_alike():
    """Dr. GRPO's point: d loss / d logp of an unclipped token is -A r / (B * max_tokens), whatever its row's length
    (with "sequence" it is -A r / (B * |o_i|))."""
    mask, lengths = ragged(4, 6, seed=5)
    old, adv = randn(4, 6, seed=6) * 0.01, randn(4, 6, seed=7)
    logp = old + randn(4, 6, seed=8) * 0.01  # no ratio near the clip range
    _, grad = grad_of(lambda lp: ppo_policy_loss(lp, old, adv, mask, 0.2, "constant", max_tokens=16)[0], logp)
    ratio = torch.exp(logp - old)
    torch.testing.assert_close(grad[mask], (-adv * ratio)[mask] / (4 * 16), rtol=1e-12, atol=0)
    _, seq_grad = grad_of(lambda lp: ppo_policy_loss(lp, old, adv, mask, 0.2, "sequence")[0], logp)
    per_row = torch.tensor(lengths, dtype=F64)[:, None].expand(4, 6)
    torch.testing.assert_close(seq_grad[mask], (-adv * ratio / per_row)[mask] / 4, rtol=1e-12, atol=0)


def test_constant_aggregation_micro_batches_sum_to_the_whole_for_every_loss():
    mask, _ = ragged(6, 5, seed=7)
    a, b, c = randn(6, 5, seed=8), randn(6, 5, seed=9), randn(6, 5, seed=10)
    max_tokens, denominator = 7, 6.0 * 7  # the trainer passes rows_in_minibatch * max_new_tokens
    losses = {
        "aggregate": lambda x, s, d, mt: aggregate(x[s] * b[s], mask[s], "constant", d, mt),
        "ppo": lambda x, s, d, mt: ppo_policy_loss(x[s] * 0.1, b[s] * 0.1, c[s], mask[s], 0.2, "constant", denominator=d,
                                                   max_tokens=mt)[0],
        "value": lambda x, s, d, mt: value_loss(x[s], b[s], c[s], mask[s], 0.3, "constant", denominator=d, max_tokens=mt)[0],
    }
    for name, fn in losses.items():
        whole, whole_grad = grad_of(lambda x: fn(x, slice(None), None, max_tokens), a)
        leaf = a.clone().requires_grad_(True)
        total = sum(fn(leaf, slice(i, i + 2), denominator, None) for i in (0, 2, 4))
        total.backward()
        assert total.item() == pytest.approx(whole.item(), abs=1e-12), name
        torch.testing.assert_close(leaf.grad, whole_grad, rtol=0, atol=1e-12)


# ============================================================================= 3. REINFORCE++

def returns_loop(rewards, lengths, gamma):
    out = [[0.0] * len(rewards[0]) for _ in rewards]
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            running = rewards[b][t] + gamma * running
            out[b][t] = running
    return out


def reinforce_pp_loop(rewards, lengths, gamma, scores=None, k=None):
    r = [row[:] for row in rewards]
    if scores is not None:
        for b, n in enumerate(lengths):
            g = b // k
            r[b][n - 1] -= sum(scores[g * k:(g + 1) * k]) / k
    G = returns_loop(r, lengths, gamma)
    valid = [G[b][t] for b, n in enumerate(lengths) for t in range(n)]
    mean = sum(valid) / len(valid)
    var = sum((v - mean) ** 2 for v in valid) / len(valid)  # biased, as OpenRLHF
    rstd = 1 / math.sqrt(max(var, 1e-8))
    return torch.tensor([[(G[b][t] - mean) * rstd if t < n else 0.0 for t in range(len(r[0]))] for b, n in enumerate(lengths)],
                        dtype=F64)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_match_loop(gamma):
    mask, lengths = ragged(5, 7, seed=1)
    rewards = randn(5, 7, seed=2)
    ref = torch.tensor(returns_loop(rewards.tolist(), lengths, gamma), dtype=F64)
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma), ref, rtol=0, atol=1e-12)
    # by hand, gamma 0.5: rewards [1, 2, 4] -> G = [1 + 0.5 * 4, 2 + 0.5 * 4, 4] = [3, 4, 4]; padding 0
    r = torch.tensor([[1.0, 2.0, 4.0, 9.0]], dtype=F64)
    assert discounted_returns(r, torch.tensor([[1, 1, 1, 0]]), 0.5).tolist() == [[3.0, 4.0, 4.0, 0.0]]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_reinforce_pp_matches_loop(seed, gamma):
    mask, lengths = ragged(6, 8, seed)
    rewards, scores = randn(6, 8, seed=seed + 10), randn(6, seed=seed + 20)
    got = reinforce_pp_advantages(rewards, mask, gamma)
    torch.testing.assert_close(got, reinforce_pp_loop(rewards.tolist(), lengths, gamma), rtol=0, atol=1e-12)
    base = reinforce_pp_advantages(rewards, mask, gamma, scores=scores, group_size=3)
    torch.testing.assert_close(base, reinforce_pp_loop(rewards.tolist(), lengths, gamma, scores.tolist(), 3), rtol=0, atol=1e-12)
    assert not torch.allclose(got, base)
    # whitened: mean 0, biased variance 1 over the valid tokens
    assert got[mask].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert got[mask].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("estimator,gamma", [("reinforce", 1.0), ("reinforce", 0.9), ("reinforce_baseline", 1.0)])
def test_reinforce_pp_agrees_with_openrlhf(estimator, gamma):
    mask, _ = ragged(8, 9, seed=4)
    scores, kl = randn(8, seed=5), torch.where(mask, randn(8, 9, seed=6).abs() * 0.1, 0)
    ref = openrlhf_reinforce(scores, kl, mask, 0.05, gamma, estimator, n_samples_per_prompt=4)
    rewards, _ = kl_shaped_rewards(scores, kl, mask, kl_coef=0.05)
    baseline = {"scores": scores, "group_size": 4} if estimator == "reinforce_baseline" else {}
    got = reinforce_pp_advantages(rewards, mask, gamma, **baseline)
    torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=1e-10)
    assert (got[~mask] == 0).all()  # OpenRLHF leaves -mean * rstd there (masked out of its loss)
    # the baseline variant = kl_shaped_rewards with the Dr. GRPO-centred scores
    if baseline:
        centred, _ = kl_shaped_rewards(group_baseline(scores, 4, "dr_grpo"), kl, mask, kl_coef=0.05)
        torch.testing.assert_close(reinforce_pp_advantages(centred, mask, gamma), got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("at", [2, 4])
def test_reinforce_pp_on_two_ranks_equals_whole_batch(at):
    """Whitening statistics over all ranks (groups of 2 are whole on each rank)."""
    mask, _ = ragged(6, 8, seed=11)
    rewards, scores = randn(6, 8, seed=12) * 2 + 1, randn(6, seed=13)
    for baseline in (False, True):
        kw = (lambda s: {"scores": scores[s], "group_size": 2}) if baseline else (lambda s: {})
        full = reinforce_pp_advantages(rewards, mask, 0.9, **kw(slice(None)))
        t1 = int(mask[at:].sum(1).max())
        parts = [(slice(0, at), slice(None)), (slice(at, None), slice(0, t1))]
        per_rank = on_ranks(2, lambda r, reduce: reinforce_pp_advantages(rewards[parts[r]], mask[parts[r]], 0.9, reduce,
                                                                         **kw(parts[r][0])))
        torch.testing.assert_close(per_rank[0], full[:at], rtol=0, atol=1e-12)
        torch.testing.assert_close(per_rank[1], full[at:, :t1], rtol=0, atol=1e-12)
        assert not torch.allclose(reinforce_pp_advantages(rewards[:at], mask[:at], 0.9, **kw(slice(0, at))), full[:at])


def test_reinforce_pp_edge_cases():
    mask, _ = ragged(4, 5, seed=2)
    # all-equal scores in every group and no KL: every centred reward is 0 -> advantages exactly 0, no NaN
    scores = torch.tensor([0.7, 0.7, 3.0, 3.0], dtype=F64)
    rewards, _ = kl_shaped_rewards(scores, torch.zeros(4, 5, dtype=F64), mask, kl_coef=0.1)
    zero = reinforce_pp_advantages(rewards, mask, 1.0, scores=scores, group_size=2)
    assert (zero == 0).all()
    # a row with no valid token: 0 there, and the other rows as without it (the statistics are over valid tokens)
    rewards = randn(4, 5, seed=3)
    empty = mask.clone()
    empty[2] = False
    got = reinforce_pp_advantages(with_garbage(rewards, empty, 2), pad_mask(empty, 2), 1.0)
    assert torch.isfinite(got).all() and (got[2] == 0).all() and (got[:, 5:] == 0).all()
    keep = [0, 1, 3]
    torch.testing.assert_close(got[keep, :5], reinforce_pp_advantages(rewards[keep], mask[keep], 1.0), rtol=0, atol=1e-12)
    # one valid token in all: variance 0 -> 0, not NaN
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert (reinforce_pp_advantages(rewards, one, 1.0) == 0).all()
    with pytest.raises(ValueError, match="both `scores` and `group_size`"):
        reinforce_pp_advantages(rewards, mask, 1.0, scores=scores)
    with pytest.raises(ValueError, match="not a whole number of groups"):
        reinforce_pp_advantages(rewards, mask, 1.0, scores=scores, group_size=3)


def test_reinforce_pp_padding_invariance():
    mask, _ = ragged(4, 6, seed=7)
    rewards, scores = randn(4, 6, seed=8), randn(4, seed=9)
    clean = reinforce_pp_advantages(torch.where(mask, rewards, 0), mask, 0.9, scores=scores, group_size=2)
    dirty = reinforce_pp_advantages(with_garbage(rewards, mask, 3), pad_mask(mask, 3), 0.9, scores=scores, group_size=2)
    torch.testing.assert_close(dirty[:, :6], clean, rtol=0, atol=1e-12)
    assert (dirty[:, 6:] == 0).all()


# ============================================================================= 4. GSPO

def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    mask, lengths = ragged(5, 7, seed=1)
    logp, old = randn(5, 7, seed=2) * 0.3 - 2, randn(5, 7, seed=3) * 0.3 - 2
    got = sequence_importance_ratio(with_garbage(logp, mask, 2), with_garbage(old, mask, 2), pad_mask(mask, 2))
    LP, OLD = logp.tolist(), old.tolist()
    ref = [math.prod(math.exp(LP[b][t] - OLD[b][t]) for t in range(n)) ** (1 / n) for b, n in enumerate(lengths)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-12, atol=0)
    empty = mask.clone()
    empty[1] = False
    assert sequence_importance_ratio(logp, old, empty)[1].item() == 1.0
    # bf16 log-probabilities accumulate in float32
    assert sequence_importance_ratio(logp.bfloat16(), old.bfloat16(), mask).dtype == torch.float32


@pytest.mark.parametrize(
    "log_ratios,A,low,high,loss,grad,clipped",
    [
        # s = geometric mean of the token ratios; l = max(-A s, -A clip(s, 1 - low, 1 + high)); grad per token -A s / |y|.
        ([math.log(1.21), 0.0], 1.0, 0.05, 0.05, -1.05, 0.0, True),    # s = 1.1 > 1.05, A > 0: clipped, no gradient at all
        ([math.log(1.21), 0.0], 1.0, 0.05, 0.20, -1.10, -0.55, False),  # inside [0.95, 1.2]: -A s, grad -1.1 / 2
        ([math.log(1.21), 0.0], -1.0, 0.05, 0.05, 1.10, 0.55, False),   # A < 0 above the range: not clipped
        ([math.log(0.81), 0.0], -1.0, 0.05, 0.05, 0.95, 0.0, True),     # s = 0.9 < 0.95, A < 0: clipped
        ([0.3, -0.3], 2.0, 0.01, 0.01, -2.0, -1.0, False),              # token ratios 1.35, 0.74 but s = 1: not clipped
    ],
)
def test_gspo_by_hand(log_ratios, A, low, high, loss, grad, clipped):
    logp, old = torch.tensor([log_ratios], dtype=F64), torch.zeros(1, 2, dtype=F64)
    mask, adv = torch.ones(1, 2, dtype=torch.bool), torch.tensor([A], dtype=F64)
    out, g = grad_of(lambda lp: gspo_policy_loss(lp, old, adv, mask, low, high)[0], logp)
    assert out.item() == pytest.approx(loss, abs=1e-12)
    torch.testing.assert_close(g, torch.full((1, 2), grad, dtype=F64), rtol=0, atol=1e-12)
    _, stats = gspo_policy_loss(logp, old, adv, mask, low, high)
    assert stats["clipfrac"] == stats["seq_clipfrac"] == float(clipped)
    # token-level PPO with the same range clips the tokens of the last case; GSPO does not
    if log_ratios == [0.3, -0.3]:
        assert ppo_policy_loss(logp, old, adv.expand(1, 2), mask, 0.01)[1]["clipfrac"] == 0.5


def gspo_loop(logp, old, adv, lengths, low, high):
    """Per-sequence GSPO losses: adv a list of floats ([B]) or of rows ([B, T], per-token then the row mean)."""
    out = []
    for b, n in enumerate(lengths):
        s = math.exp(sum(logp[b][t] - old[b][t] for t in range(n)) / n)
        c = min(max(s, 1 - low), 1 + high)
        terms = [max(-a * s, -a * c) for a in ([adv[b]] if not isinstance(adv[b], list) else adv[b][:n])]
        out.append(sum(terms) / len(terms))
    return out


@pytest.mark.parametrize("per_token", [False, True])
def test_gspo_matches_loop(per_token):
    mask, lengths = ragged(8, 7, seed=4)
    old = randn(8, 7, seed=5) * 0.2 - 1
    logp = old + randn(8, 7, seed=6) * 0.15
    adv = randn(8, 7, seed=7) if per_token else randn(8, seed=7)
    rows = gspo_loop(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.03, 0.04)
    loss, stats = gspo_policy_loss(logp, old, adv, mask, 0.03, 0.04)
    assert loss.item() == pytest.approx(sum(rows) / 8, abs=1e-12)
    s = sequence_importance_ratio(logp, old, mask)
    assert stats["ratio_mean"] == pytest.approx(s.mean().item(), abs=1e-12) and stats["ratio_max"] == s.max().item()
    assert 0 < stats["seq_clipfrac"] < 1


@pytest.mark.parametrize("per_token", [False, True])
def test_gspo_gradcheck(per_token):
    mask, _ = ragged(3, 4, seed=1)
    old = randn(3, 4, seed=2) * 0.2 - 1
    logp = (old + randn(3, 4, seed=3) * 0.2).requires_grad_(True)
    adv = randn(3, 4, seed=4) if per_token else randn(3, seed=4)
    s = sequence_importance_ratio(logp.detach(), old, mask)
    assert ((s - 0.9).abs() > 1e-3).all() and ((s - 1.1).abs() > 1e-3).all()  # no ratio at a kink of the clip
    assert torch.autograd.gradcheck(lambda lp: gspo_policy_loss(lp, old, adv, mask, 0.1, 0.1)[0], (logp,))


@pytest.mark.parametrize("per_token", [False, True])
def test_gspo_agrees_with_trl_sequence_level(per_token):
    """TRL's GRPOTrainer, importance_sampling_level="sequence", loss_type="grpo": same loss, gradients and clip share."""
    mask, _ = ragged(6, 8, seed=8)
    old = randn(6, 8, seed=9) * 0.2 - 1
    logp = old + randn(6, 8, seed=10) * 0.1
    adv = torch.where(mask, randn(6, 8, seed=11), 0) if per_token else randn(6, seed=11)
    ref, ref_grad = grad_of(lambda lp: trl_grpo_loss(lp, old, adv, mask.double(), 0.02, 0.03, "sequence", "grpo")[0], logp)
    got, grad = grad_of(lambda lp: gspo_policy_loss(lp, old, adv, mask, 0.02, 0.03)[0], logp)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    _, stats = gspo_policy_loss(logp, old, adv, mask, 0.02, 0.03)
    _, region = trl_grpo_loss(logp, old, adv, mask.double(), 0.02, 0.03, "sequence", "grpo")
    if not per_token:  # TRL's clip_ratio/region_mean at the sequence level: a mean over sequences
        assert stats["seq_clipfrac"] == pytest.approx(region.double().mean().item(), abs=1e-12)
        assert 0 < stats["seq_clipfrac"] < 1


def test_gspo_differs_from_trl_only_in_counting_empty_rows():
    """TRL's .mean() counts a row without valid tokens (its loss 0); ours counts rows with a valid token, as
    `aggregate` "sequence". With denominator = B the two agree. TRL's "dr_grpo"/"bnpo" sum the sequence loss over
    tokens (length-weighted): not GSPO."""
    mask, _ = ragged(4, 6, seed=12)
    mask[3] = False
    old, adv = randn(4, 6, seed=13) * 0.2, randn(4, seed=14)
    logp = old + randn(4, 6, seed=15) * 0.1
    trl, _ = trl_grpo_loss(logp, old, adv, mask.double(), 0.2, 0.2, "sequence", "grpo")
    ours, _ = gspo_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert ours.item() == pytest.approx(trl.item() * 4 / 3, abs=1e-12)
    assert gspo_policy_loss(logp, old, adv, mask, 0.2, 0.2, denominator=4.0)[0].item() == pytest.approx(trl.item(), abs=1e-12)
    length_weighted, _ = trl_grpo_loss(logp, old, adv, mask.double(), 0.2, 0.2, "sequence", "bnpo")
    assert abs(length_weighted.item() - trl.item()) > 1e-3


def test_gspo_micro_batches_with_the_minibatch_denominator_sum_to_the_whole():
    mask, _ = ragged(6, 8, seed=16)
    old, adv = randn(6, 8, seed=17) * 0.2, randn(6, seed=18)
    logp = old + randn(6, 8, seed=19) * 0.1
    whole, whole_grad = grad_of(lambda lp: gspo_policy_loss(lp, old, adv, mask, 0.02, 0.03)[0], logp)
    leaf = logp.clone().requires_grad_(True)
    total = sum(gspo_policy_loss(leaf[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.02, 0.03, denominator=6.0)[0]
                for i in (0, 2, 4))
    total.backward()
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(leaf.grad, whole_grad, rtol=0, atol=1e-12)


def test_gspo_stats_on_two_ranks_and_at_ratio_one():
    mask, _ = ragged(6, 7, seed=20)
    old, adv = randn(6, 7, seed=21) * 0.2, randn(6, seed=22)
    logp = old + randn(6, 7, seed=23) * 0.1
    _, full = gspo_policy_loss(logp, old, adv, mask, 0.02, 0.03)
    per_rank = on_ranks(2, lambda r, reduce: gspo_policy_loss(logp[3 * r:3 * r + 3], old[3 * r:3 * r + 3], adv[3 * r:3 * r + 3],
                                                              mask[3 * r:3 * r + 3], 0.02, 0.03, reduce=reduce)[1])
    for stats in per_rank:
        for key in ("clipfrac", "seq_clipfrac", "approx_kl_k2", "approx_kl_k3", "ratio_mean"):
            assert stats[key] == pytest.approx(full[key], abs=1e-12)
    assert max(s["ratio_max"] for s in per_rank) == full["ratio_max"]
    _, first = gspo_policy_loss(logp, logp.clone(), adv, mask, 0.02, 0.03)
    assert first == {"clipfrac": 0.0, "seq_clipfrac": 0.0, "approx_kl_k2": 0.0, "approx_kl_k3": 0.0, "ratio_mean": 1.0,
                     "ratio_max": 1.0}


def test_gspo_padding_invariance_and_errors():
    mask, _ = ragged(4, 6, seed=24)
    old, adv = randn(4, 6, seed=25) * 0.2, randn(4, 6, seed=26)
    logp = old + randn(4, 6, seed=27) * 0.1
    zero = lambda x: torch.where(mask, x, 0)  # noqa: E731
    clean, clean_grad = grad_of(lambda lp: gspo_policy_loss(lp, zero(old), zero(adv), mask, 0.05, 0.05)[0], zero(logp))
    dirty, dirty_grad = grad_of(lambda lp: gspo_policy_loss(lp, with_garbage(old, mask, 2), with_garbage(adv, mask, 2),
                                                            pad_mask(mask, 2), 0.05, 0.05)[0], with_garbage(logp, mask, 2))
    assert dirty.item() == pytest.approx(clean.item(), abs=1e-12)
    assert (dirty_grad[:, 6:] == 0).all() and (dirty_grad[:, :6][~mask] == 0).all()
    torch.testing.assert_close(dirty_grad[:, :6], clean_grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"advantages must have shape \[B\]"):
        gspo_policy_loss(logp, old, adv[:, 0][:3], mask, 0.1, 0.1)
    with pytest.raises(ValueError, match="clip epsilons"):
        gspo_policy_loss(logp, old, adv, mask, -0.1, 0.1)


# ============================================================================= 5. DAPO overlong shaping and filtering

def test_overlong_penalty_by_hand():
    # max_len 10, cache 4: free up to 6, then (6 - L) / 4 down to -1 at 10, -1 beyond
    lengths = torch.tensor([0, 6, 7, 8, 10, 11, 50])
    assert overlong_penalty(lengths, 10, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert overlong_penalty(lengths, 10, 4).dtype == torch.get_default_dtype()
    assert overlong_penalty(lengths, 10, 10, dtype=F64).tolist() == [0.0, -0.6, -0.7, -0.8, -1.0, -1.0, -1.0]
    for max_len, cache_len in ((10, 0), (10, 11), (10, -1)):
        with pytest.raises(ValueError, match="0 < cache_len <= max_len"):
            overlong_penalty(lengths, max_len, cache_len)


def test_overlong_penalty_agrees_with_openrlhf():
    lengths = torch.randint(0, 130, (200,), generator=torch.Generator().manual_seed(0))
    ref = openrlhf_overlong_penalty(lengths.tolist(), 128, 40)
    torch.testing.assert_close(overlong_penalty(lengths, 128, 40, dtype=F64), torch.tensor(ref, dtype=F64), rtol=0, atol=1e-15)


def test_overlong_filter_mask():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    ended = torch.tensor([True, False, True])
    out = overlong_filter_mask(mask, ended)
    assert out.dtype == torch.bool and out.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]  # input untouched
    # the loss over the filtered mask = the loss over the rows that ended
    logp, old, adv = randn(3, 3, seed=1) * 0.3, randn(3, 3, seed=2) * 0.3, randn(3, 3, seed=3)
    for aggregation in ("token", "sequence"):
        filtered, _ = ppo_policy_loss(logp, old, adv, out, 0.2, aggregation)
        kept, _ = ppo_policy_loss(logp[[0, 2]], old[[0, 2]], adv[[0, 2]], mask[[0, 2]], 0.2, aggregation)
        assert filtered.item() == pytest.approx(kept.item(), abs=1e-12)
    with pytest.raises(ValueError, match=r"ended must have shape \[B\]"):
        overlong_filter_mask(mask, ended[:2])


# ============================================================================= 6. DAPO dynamic sampling

def test_informative_groups():
    scores = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0.5, 0.5, 0.5, 0.5 + 1e-9, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    assert informative_groups(scores, 4).tolist() == [False, True, True, False]          # exact equality
    assert informative_groups(scores, 4, atol=1e-6).tolist() == [False, True, False, False]  # 1e-9 apart counts as equal
    assert informative_groups(scores, 2).tolist() == [False, False, True, False, False, True, False, False]
    kept = informative_groups(scores, 4).repeat_interleave(4)
    assert (group_baseline(scores, 4, "dr_grpo")[~kept] == 0).all()  # what is dropped had no signal
    with pytest.raises(ValueError, match="not a whole number of groups"):
        informative_groups(scores[:6], 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        informative_groups(torch.tensor([1.0, math.nan]), 2)
    with pytest.raises(ValueError, match="atol must be >= 0"):
        informative_groups(scores, 4, atol=-1.0)


# ============================================================================= 7. fixed reward gain and bias

def test_fit_gain_bias_by_hand():
    scores = torch.tensor([1.0, 3.0])  # mean 2, population std 1
    assert fit_gain_bias(scores) == (1.0, -2.0)
    assert fit_gain_bias(scores, target_mean=5.0, target_std=2.0) == (2.0, 1.0)  # gain 2 / 1, bias 5 - 2 * 2
    out = apply_gain_bias(scores, 2.0, 1.0)
    assert out.tolist() == [3.0, 7.0] and out.dtype == scores.dtype and scores.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="std 0.0"):
        fit_gain_bias(torch.full((4,), 0.3))
    with pytest.raises(ValueError, match="target_std must be > 0"):
        fit_gain_bias(scores, target_std=0.0)


def test_fit_gain_bias_agrees_with_lm_human_preferences_and_hits_the_targets():
    scores = randn(64, seed=1) * 3 + 7
    for target_mean, target_std in ((0.0, 1.0), (0.5, 2.0)):
        gain, bias = fit_gain_bias(scores, target_mean, target_std)
        ref_gain, ref_bias = lmhp_gain_bias(scores.numpy(), 1, target_mean, target_std)
        assert (gain, bias) == pytest.approx((ref_gain, ref_bias), rel=1e-12)
        out = apply_gain_bias(scores, gain, bias)
        assert out.mean().item() == pytest.approx(target_mean, abs=1e-12)
        assert out.std(unbiased=False).item() == pytest.approx(target_std, abs=1e-12)  # POPULATION std, as lm-human-preferences


def test_fit_gain_bias_on_two_ranks_equals_one():
    scores = randn(40, seed=2) * 2 - 3
    whole = fit_gain_bias(scores)
    per_rank = on_ranks(2, lambda r, reduce: fit_gain_bias(scores[:16] if r == 0 else scores[16:], reduce=reduce))
    assert per_rank == [pytest.approx(whole, rel=1e-12)] * 2
    assert fit_gain_bias(scores[:16]) != pytest.approx(whole, rel=1e-3)  # rank-local statistics would differ


# ============================================================================= purity

def test_new_functions_do_not_modify_their_inputs():
    mask, _ = ragged(4, 5, seed=1)
    tensors = {k: with_garbage(randn(4, 5, seed=i), mask, 0) for i, k in enumerate("abc")}
    scores, lengths = randn(4, seed=9), torch.tensor([1, 3, 5, 5])
    before = {k: v.clone() for k, v in tensors.items()} | {"scores": scores.clone(), "lengths": lengths.clone()}
    a, b, c = tensors.values()
    ppo_policy_loss(a, b, c, mask, 0.2, "constant", clip_eps_low=0.1, clip_eps_high=0.3, max_tokens=5)
    gspo_policy_loss(a, b, c, mask, 0.1, 0.1)
    gspo_policy_loss(a, b, scores, mask, 0.1, 0.1)
    reinforce_pp_advantages(a, mask, 0.9, scores=scores, group_size=2)
    discounted_returns(a, mask, 0.9)
    group_baseline(scores, 2, "dr_grpo")
    informative_groups(scores, 2)
    apply_gain_bias(scores, *fit_gain_bias(scores))
    overlong_penalty(lengths, 5, 2)
    for k, v in (tensors | {"scores": scores, "lengths": lengths}).items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k
