"""The RL math of the PPO stage (rlhf_dist.rl) against plain for-loops and numbers worked out by hand.

Per-token tensors are [B, T] over response tokens with a mask; float64 wherever a loop is the
reference, so tolerances stay tight. Data-parallel ranks are simulated with threads and an
all-reduce built on a barrier, so a function may call `reduce` as often as it likes, as with NCCL.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import on_ranks, pad_mask, with_garbage

from rlhf_dist.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    first_stop_truncate,
    gae,
    group_baseline,
    kl_estimate,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    normalize_scores,
    ppo_policy_loss,
    sequence_advantages_to_tokens,
    value_loss,
    whiten,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers

def ragged(B: int, T: int, seed: int, min_len: int = 1) -> tuple[torch.Tensor, list[int]]:
    """A prefix mask [B, T] with random lengths in [min_len, T] (at least one row of full length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return mask, lengths


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)




def split_rows(x: torch.Tensor, mask: torch.Tensor, at: int):
    """Two "ranks": rows [:at] and [at:], the second trimmed to its own longest response."""
    t1 = int(mask[at:].sum(1).max())
    return [(x[:at], mask[:at]), (x[at:, :t1], mask[at:, :t1])]


# ----------------------------------------------------------------------------- GAE

def gae_loop(rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float, lam: float):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        running = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + values[b][t]
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)])
def test_gae_matches_loop(seed, gamma, lam):
    mask, lengths = ragged(6, 9, seed)
    rewards, values = randn(6, 9, seed=seed + 100), randn(6, 9, seed=seed + 200)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)


def test_gae_by_hand():
    # Row 0, T=3, gamma=1, lam=1: advantages are reward-to-go minus value.
    #   rewards [1, 2, 3] -> reward-to-go [6, 5, 3]; values [0.5, 1, 1.5] -> A = [5.5, 4, 1.5]
    #   (deltas: d2 = 3 + 0 - 1.5 = 1.5, d1 = 2 + 1.5 - 1 = 2.5, d0 = 1 + 1 - 0.5 = 1.5; A = cumsum from the end)
    # Row 1, length 2 (last column is padding holding 100s): V after the last token counts as 0.
    #   d1 = 2 + 0 - 1 = 1, d0 = 1 + 1 - 0.5 = 1.5 -> A = [2.5, 1, 0], returns = A + V = [3, 2, 0]
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 100.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[5.5, 4.0, 1.5], [2.5, 1.0, 0.0]]
    assert ret.tolist() == [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]]
    # lam = 0: A_t = delta_t (one-step TD error).
    adv0, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert adv0.tolist() == [[1.5, 2.5, 1.5], [1.5, 1.0, 0.0]]


# ----------------------------------------------------------------------------- padding invariance

def test_padding_invariance_of_every_function():
    """Extra padding columns, and NaN/inf garbage at every masked position, change nothing valid."""
    B, T, extra = 5, 7, 4
    mask, _ = ragged(B, T, seed=7)
    pm = pad_mask(mask, extra)
    logp, old, ref = randn(B, T, seed=1) * 0.3 - 2, randn(B, T, seed=2) * 0.3 - 2, randn(B, T, seed=3) * 0.3 - 2
    rewards, values, old_values, adv = randn(B, T, seed=4), randn(B, T, seed=5), randn(B, T, seed=6), randn(B, T, seed=8)
    zero = lambda x: torch.where(mask, x, 0)  # noqa: E731
    clean = {k: zero(v) for k, v in dict(logp=logp, old=old, ref=ref, rewards=rewards, values=values,
                                         old_values=old_values, adv=adv).items()}
    dirty = {k: with_garbage(v, mask, extra) for k, v in clean.items()}
    scores, ended = randn(B, seed=9), torch.tensor([True, False, True, True, False])

    def everything(d, m):
        lp = d["logp"].clone().requires_grad_(True)
        v = d["values"].clone().requires_grad_(True)
        out = {}
        out["gae"] = gae(d["rewards"], d["values"], m, 1.0, 0.95)
        out["whiten"] = whiten(d["adv"], m)
        out["whiten_noshift"] = whiten(d["adv"], m, shift_mean=False)
        out["kl"] = {k: kl_estimate(lp.detach(), d["ref"], k, clamp=5.0, mask=m) for k in ("k1", "k2", "k3")}
        out["shaped"] = kl_shaped_rewards(scores, out["kl"]["k3"], m, 0.05, missing_eos_penalty=1.0, ended=ended)
        out["pg_token"] = ppo_policy_loss(lp, d["old"], d["adv"], m, 0.2, "token")
        out["pg_seq"] = ppo_policy_loss(lp, d["old"], d["adv"], m, 0.2, "sequence")
        out["vf"] = value_loss(v, d["old_values"], d["rewards"], m, 0.2)
        out["vf_seq"] = value_loss(v, d["old_values"], d["rewards"], m, None, "sequence")
        (out["pg_token"][0] + out["pg_seq"][0] + out["vf"][0] + out["vf_seq"][0]).backward()
        out["grads"] = (lp.grad, v.grad)
        out["ev"] = explained_variance(d["values"], d["rewards"], m)
        out["mean_var"] = (masked_mean(d["adv"], m), masked_var(d["adv"], m))
        return out

    a, b = everything(clean, mask), everything(dirty, pm)

    def same(x, y):
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            assert torch.isfinite(y[:, :T][mask]).all() and (y[:, T:] == 0).all() and (y[:, :T][~mask] == 0).all()
            torch.testing.assert_close(x, y[:, :T], rtol=0, atol=1e-12)
        elif isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                same(x[k], y[k])
        elif isinstance(x, tuple):
            for xi, yi in zip(x, y):
                same(xi, yi)
        else:
            assert x == pytest.approx(y, rel=0, abs=1e-12)

    same(a, b)


# ----------------------------------------------------------------------------- masked stats and whitening

def test_masked_mean_and_var_match_torch_on_valid_tokens():
    mask, _ = ragged(4, 6, seed=3)
    x = with_garbage(randn(4, 6, seed=4), mask, 0)
    valid = x[mask]
    assert masked_mean(x, mask).item() == pytest.approx(valid.mean().item(), abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(valid.var(unbiased=True).item(), abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(valid.var(unbiased=False).item(), abs=1e-12)
    with pytest.raises(ValueError, match="all-zero mask"):
        masked_mean(x, torch.zeros_like(mask))
    # bf16 inputs: counts and sums accumulate in float32 (3001 is not representable in bf16).
    assert masked_mean(torch.ones(1, 3001, dtype=torch.bfloat16), torch.ones(1, 3001)).item() == 1.0
    one_token = torch.zeros_like(mask)
    one_token[0, 0] = True
    with pytest.raises(ValueError, match="need at least 2"):
        masked_var(x, one_token)


@pytest.mark.parametrize("seed", [0, 1])
def test_whiten_has_zero_mean_unit_variance_on_valid_tokens(seed):
    mask, _ = ragged(5, 8, seed)
    x = randn(5, 8, seed=seed) * 3 + 10
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask] == 0).all()
    # shift_mean=False: only the scale changes, the mean stays.
    w2 = whiten(x, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-9)
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("at", [1, 3])
def test_whiten_on_two_ranks_equals_whole_batch(at):
    """docs/ppo.md item 10: ranks whiten with global statistics, not rank-local ones."""
    mask, _ = ragged(6, 8, seed=11, min_len=2)
    x = randn(6, 8, seed=12) * 2 + 1
    full = whiten(x, mask)
    halves = split_rows(x, mask, at)
    per_rank = on_ranks(2, lambda r, reduce: whiten(halves[r][0], halves[r][1], reduce=reduce))
    t1 = halves[1][0].shape[1]
    torch.testing.assert_close(per_rank[0], full[:at], rtol=0, atol=1e-6)
    torch.testing.assert_close(per_rank[1], full[at:, :t1], rtol=0, atol=1e-6)
    # ... and rank-local whitening would NOT match (the test can fail).
    assert not torch.allclose(whiten(*halves[0]), full[:at], atol=1e-3)


def test_sequence_advantages_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    out = sequence_advantages_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- KL

def test_kl_estimators_match_formulas():
    logp, ref = randn(3, 5, seed=1) - 1, randn(3, 5, seed=2) - 1
    d = logp - ref
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), d, rtol=0, atol=1e-12)
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), 0.5 * d**2, rtol=0, atol=1e-12)
    ratio = torch.exp(ref - logp)
    k3 = kl_estimate(logp, ref, "k3")
    torch.testing.assert_close(k3, (ratio - 1) - torch.log(ratio), rtol=1e-10, atol=1e-12)
    assert (k3 >= 0).all() and (kl_estimate(logp * 20, ref, "k3") >= 0).all()
    for kind in ("k1", "k2", "k3"):
        assert (kl_estimate(logp, logp.clone(), kind) == 0).all()
        clamped = kl_estimate(logp * 20, ref, kind, clamp=0.5)
        assert clamped.abs().max() <= 0.5
        unclamped = kl_estimate(logp * 20, ref, kind)
        inside = unclamped.abs() < 0.5
        assert torch.equal(clamped[inside], unclamped[inside])
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    masked = kl_estimate(logp, ref, "k3", mask=mask)
    assert (masked[~mask] == 0).all() and torch.equal(masked[mask], k3[mask])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_kl_estimates():
    # KL(p || q) for two categoricals, estimated from samples of p (the policy).
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=F64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=F64)
    exact = (p * (p / q).log()).sum().item()  # 0.2536...
    x = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[x][None], q.log()[x][None]
    assert kl_estimate(logp, ref, "k1").mean().item() == pytest.approx(exact, rel=0.02)
    assert kl_estimate(logp, ref, "k3").mean().item() == pytest.approx(exact, rel=0.02)


def test_policy_loss_stats_at_ratio_one():
    """docs/ppo.md item 14: first minibatch, logp == old logp -> ratio exactly 1."""
    mask, _ = ragged(4, 6, seed=5)
    logp = randn(4, 6, seed=6) - 2
    loss, stats = ppo_policy_loss(logp, logp.clone(), randn(4, 6, seed=7), mask, 0.2)
    assert stats == {"clipfrac": 0.0, "approx_kl_k2": 0.0, "approx_kl_k3": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0,
                     "ratio_max": 1.0}


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    c.update(current_kl=9.0, n_steps=256)  # error 9/6 - 1 = 0.5 -> clipped to 0.2: x (1 + 0.2 * 256 / 10000)
    assert c.value == pytest.approx(0.1 * 1.00512, rel=1e-12)
    c.update(current_kl=6.6, n_steps=256)  # error 0.1 (not clipped): x 1.00256
    assert c.value == pytest.approx(0.1 * 1.00512 * 1.00256, rel=1e-12)
    before = c.value
    c.update(current_kl=0.0, n_steps=100)  # error -1 -> -0.2: x (1 - 0.2 * 100 / 10000) = x 0.998
    assert c.value == pytest.approx(before * 0.998, rel=1e-12)
    c.update(current_kl=6.0, n_steps=512)  # on target: unchanged
    assert c.value == pytest.approx(before * 0.998, rel=1e-12)

    state = json.loads(json.dumps(c.state_dict()))  # plain, serialisable
    restored = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=10_000)
    restored.load_state_dict(state)
    assert restored.value == c.value
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 64)
    assert c.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert other.value == 0.05


# ----------------------------------------------------------------------------- policy loss

@pytest.mark.parametrize(
    "ratio,A,loss,clipfrac,grad",
    [
        # eps = 0.2. pg_loss1 = -A r, pg_loss2 = -A clip(r, 0.8, 1.2), loss = max(...); grad = d loss / d logp.
        (1.5, 1.0, -1.2, 1.0, 0.0),   # A > 0, r above 1 + eps: clipped at 1.2, no gradient
        (1.5, -1.0, 1.5, 0.0, 1.5),   # A < 0, r above 1 + eps: NOT clipped (max picks -A r = 1.5), grad -A r
        (0.5, 1.0, -0.5, 0.0, -0.5),  # A > 0, r below 1 - eps: not clipped, grad -A r
        (0.5, -1.0, 0.8, 1.0, 0.0),   # A < 0, r below 1 - eps: clipped at 0.8, no gradient
        (1.1, 2.0, -2.2, 0.0, -2.2),  # inside the range: plain -A r
        (0.9, -2.0, 1.8, 0.0, 1.8),
    ],
)
def test_ppo_policy_loss_one_token_by_hand(ratio, A, loss, clipfrac, grad):
    logp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
    out, stats = ppo_policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([[A]], dtype=F64),
                                 torch.ones(1, 1), clip_eps=0.2)
    assert out.item() == pytest.approx(loss, abs=1e-12)
    assert stats["clipfrac"] == clipfrac
    assert stats["ratio_mean"] == pytest.approx(ratio) and stats["ratio_max"] == pytest.approx(ratio)
    assert stats["approx_kl_k2"] == pytest.approx(0.5 * math.log(ratio) ** 2)
    assert stats["approx_kl"] == stats["approx_kl_k2"]  # the old name, kept for one release
    assert stats["approx_kl_k3"] == pytest.approx(ratio - 1 - math.log(ratio))
    out.backward()
    assert logp.grad.item() == pytest.approx(grad, abs=1e-12)


def ppo_loop(logp, old, adv, lengths, eps):
    """Per-token clipped losses as nested lists (rows cut to their lengths)."""
    rows = []
    for b, n in enumerate(lengths):
        row = []
        for t in range(n):
            r = math.exp(logp[b][t] - old[b][t])
            row.append(max(-adv[b][t] * r, -adv[b][t] * min(max(r, 1 - eps), 1 + eps)))
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_token_and_sequence_aggregation_match_loops(seed):
    mask, lengths = ragged(5, 8, seed)
    logp, old, adv = randn(5, 8, seed=seed) * 0.3, randn(5, 8, seed=seed + 1) * 0.3, randn(5, 8, seed=seed + 2)
    rows = ppo_loop(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2)
    token_ref = sum(sum(r) for r in rows) / sum(lengths)
    seq_ref = sum(sum(r) / len(r) for r in rows) / len(rows)
    token, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, "token")
    seq, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, "sequence")
    assert token.item() == pytest.approx(token_ref, abs=1e-12)
    assert seq.item() == pytest.approx(seq_ref, abs=1e-12)
    assert abs(token_ref - seq_ref) > 1e-4  # ragged lengths: the two choices really differ
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        ppo_policy_loss(logp, old, adv, mask, 0.2, "batch")


def test_ppo_gradient_is_zero_exactly_where_clipped():
    mask, lengths = ragged(6, 8, seed=4)
    old, adv = randn(6, 8, seed=5) * 0.1, randn(6, 8, seed=6)
    logp = (old + randn(6, 8, seed=7) * 0.4).requires_grad_(True)  # many ratios outside [0.8, 1.2]
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    ratio = torch.exp(logp.detach() - old)
    clipped = mask & (((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8)))
    assert 0 < clipped.sum() < mask.sum()
    assert (logp.grad[clipped] == 0).all() and (logp.grad[~mask] == 0).all()
    free = mask & ~clipped
    torch.testing.assert_close(logp.grad[free], (-adv * ratio)[free] / sum(lengths), rtol=1e-12, atol=0)
    assert stats["clipfrac"] == pytest.approx(clipped.sum().item() / sum(lengths), abs=1e-12)
    assert stats["ratio_max"] == pytest.approx(ratio[mask].max().item(), abs=1e-12)


def test_ppo_stats_on_two_ranks_equal_whole_batch():
    mask, _ = ragged(6, 7, seed=9)
    logp, old, adv = randn(6, 7, seed=1) * 0.3, randn(6, 7, seed=2) * 0.3, randn(6, 7, seed=3)
    _, full = ppo_policy_loss(logp, old, adv, mask, 0.2)
    stacked = torch.stack([logp, old, adv], dim=-1)
    halves = [(stacked[:2], mask[:2]), (stacked[2:], mask[2:])]
    per_rank = on_ranks(2, lambda r, reduce: ppo_policy_loss(*halves[r][0].unbind(-1), halves[r][1], 0.2, reduce=reduce)[1])
    for stats in per_rank:
        for key in ("clipfrac", "approx_kl_k2", "approx_kl_k3", "ratio_mean"):
            assert stats[key] == pytest.approx(full[key], abs=1e-12)
    assert max(s["ratio_max"] for s in per_rank) == pytest.approx(full["ratio_max"])  # ratio_max is rank-local


# ----------------------------------------------------------------------------- value loss

@pytest.mark.parametrize(
    "V,old_V,R,c,loss,clipfrac",
    [
        # V_clipped = old_V + clip(V - old_V, -c, c); loss = 0.5 * max((V - R)^2, (V_clipped - R)^2)
        (1.0, 0.0, 1.0, 0.2, 0.32, 1.0),    # unclipped 0, clipped (0.2 - 1)^2 = 0.64 -> 0.5 * 0.64
        (1.0, 0.0, 0.0, 0.2, 0.5, 0.0),     # unclipped 1, clipped 0.2^2 = 0.04 -> 0.5 * 1
        (0.1, 0.0, 1.0, 0.2, 0.405, 0.0),   # inside the range: both 0.81
        (-1.0, 0.0, -1.0, 0.2, 0.32, 1.0),  # same as the first, downwards
        (-1.0, 0.0, 0.0, 0.2, 0.5, 0.0),
        (1.0, 0.0, 1.0, None, 0.0, 0.0),    # no clipping: 0.5 * (V - R)^2
        (1.0, 0.0, 0.0, None, 0.5, 0.0),
    ],
)
def test_value_loss_by_hand(V, old_V, R, c, loss, clipfrac):
    t = lambda v: torch.tensor([[v]], dtype=F64)  # noqa: E731
    out, stats = value_loss(t(V), t(old_V), t(R), torch.ones(1, 1, dtype=torch.bool), clip_range=c)
    assert out.item() == pytest.approx(loss, abs=1e-12)
    assert stats == {"vf_clipfrac": clipfrac, "value_mean": V}


def test_value_loss_inside_the_clip_range_is_exactly_unclipped():
    """float32 values that moved less than the clip range: no clipping counted, not even from rounding
    (V_old + (V - V_old) need not equal V in the last bit; 1 and N processes would count differently)."""
    g = torch.Generator().manual_seed(0)
    old_v = 0.01 * (2 * torch.rand(64, 32, generator=g) - 1)  # |V - V_old| < 0.16, inside the range 0.2
    v = (0.15 * (2 * torch.rand(64, 32, generator=g) - 1)).requires_grad_()
    ret = torch.randn(64, 32, generator=g)
    assert not torch.equal(old_v + (v - old_v), v)  # the rounding this guards against does occur here
    mask = torch.ones(64, 32, dtype=torch.bool)
    out, stats = value_loss(v, old_v, ret, mask, clip_range=0.2)
    assert stats["vf_clipfrac"] == 0.0
    assert torch.equal(out, 0.5 * ((v - ret) ** 2).mean())


def test_value_loss_denominator_sums_micro_batches_to_the_whole_batch():
    mask, _ = ragged(6, 5, seed=7)
    v, old_v, ret = randn(6, 5, seed=8), randn(6, 5, seed=9), randn(6, 5, seed=10)
    for aggregation, count in (("token", float(mask.sum())), ("sequence", 6.0)):
        whole, _ = value_loss(v, old_v, ret, mask, 0.3, aggregation)
        parts = [value_loss(v[i:i + 2], old_v[i:i + 2], ret[i:i + 2], mask[i:i + 2], 0.3, aggregation, denominator=count)[0]
                 for i in (0, 2, 4)]
        assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-12)


def test_value_loss_sequence_aggregation_matches_loop():
    mask, lengths = ragged(4, 6, seed=2)
    v, old_v, ret = randn(4, 6, seed=3), randn(4, 6, seed=4), randn(4, 6, seed=5)
    out, _ = value_loss(v, old_v, ret, mask, 0.3, "sequence")
    V, V_old, R = v.tolist(), old_v.tolist(), ret.tolist()
    per_seq = []
    for b, n in enumerate(lengths):
        terms = [max((V[b][t] - R[b][t]) ** 2, (V_old[b][t] + min(max(V[b][t] - V_old[b][t], -0.3), 0.3) - R[b][t]) ** 2)
                 for t in range(n)]
        per_seq.append(sum(terms) / n)
    assert out.item() == pytest.approx(0.5 * sum(per_seq) / len(per_seq), abs=1e-12)


# ----------------------------------------------------------------------------- rewards

def test_kl_shaped_rewards_by_hand():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    kl = randn(3, 5, seed=1)
    scores = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    ended = torch.tensor([True, True, False])
    rewards, stats = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1, missing_eos_penalty=1.5, ended=ended)
    expected = torch.where(mask, -0.1 * kl, 0)
    expected[0, 1] += 1.0          # last valid token of row 0 gets the score
    expected[1, 4] += 2.0
    expected[2, 2] += 3.0 - 1.5    # row 2 never stopped: score minus the missing-EOS penalty
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-15)
    assert (rewards[~mask] == 0).all()
    per_row_kl = [kl[b][mask[b]].sum().item() for b in range(3)]
    assert stats["score"] == pytest.approx(2.0)
    assert stats["kl"] == pytest.approx(sum(per_row_kl) / 3, abs=1e-12)
    assert stats["non_score_reward"] == pytest.approx(-0.1 * sum(per_row_kl) / 3, abs=1e-12)
    assert stats["rlhf_reward"] == pytest.approx((6.0 - 1.5 - 0.1 * sum(per_row_kl)) / 3, abs=1e-12)
    # Without a penalty every row gets its plain score; the penalty needs `ended`.
    plain, _ = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    assert plain[2, 2].item() == pytest.approx(-0.1 * kl[2, 2].item() + 3.0)
    with pytest.raises(ValueError, match="needs `ended`"):
        kl_shaped_rewards(scores, kl, mask, 0.1, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="no valid token"):
        kl_shaped_rewards(scores, kl, mask & torch.tensor([[1], [1], [0]], dtype=torch.bool), 0.1)


def test_kl_shaped_reward_stats_on_two_ranks():
    mask, _ = ragged(4, 5, seed=3)
    kl, scores = randn(4, 5, seed=4).abs(), randn(4, seed=5)
    _, full = kl_shaped_rewards(scores, kl, mask, 0.2)
    per_rank = on_ranks(2, lambda r, reduce: kl_shaped_rewards(scores[2 * r:2 * r + 2], kl[2 * r:2 * r + 2],
                                                              mask[2 * r:2 * r + 2], 0.2, reduce=reduce)[1])
    for stats in per_rank:
        assert stats == pytest.approx(full, abs=1e-12)


@pytest.mark.parametrize(
    "ids,stop_ids,pad_id,out,lengths,ended",
    [
        # stop in the middle, at the end, absent (EOS = 2, pad = 0)
        ([[5, 2, 7, 8], [5, 6, 7, 2], [5, 6, 7, 8]], [2], 0,
         [[5, 2, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8]], [2, 4, 4], [True, True, False]),
        # pad == EOS == 2: generation already padded with 2s; the mask comes from lengths, not ids != pad
        ([[5, 2, 2, 2], [2, 2, 2, 2], [5, 6, 7, 8]], [2], 2,
         [[5, 2, 2, 2], [2, 2, 2, 2], [5, 6, 7, 8]], [2, 1, 4], [True, True, False]),
        # several stop tokens: the first of any ends the response; no stop ids: nothing ends
        ([[5, 3, 2, 8]], [2, 3], 0, [[5, 3, 0, 0]], [2], [True]),
        ([[5, 3, 2, 8]], [], 0, [[5, 3, 2, 8]], [4], [False]),
    ],
)
def test_first_stop_truncate(ids, stop_ids, pad_id, out, lengths, ended):
    response = torch.tensor(ids)
    new_ids, mask, lens, end = first_stop_truncate(response, stop_ids, pad_id)
    assert new_ids.tolist() == out
    assert lens.tolist() == lengths and lens.dtype == torch.long
    assert end.tolist() == ended
    assert mask.tolist() == [[t < n for t in range(len(ids[0]))] for n in lengths]
    assert response.tolist() == ids  # input untouched


def test_running_moments_combine_like_concatenation():
    x = randn(37, seed=1) * 4 + 3
    whole = RunningMoments()
    whole.update(x)
    assert whole.count == 37
    assert whole.mean == pytest.approx(x.mean().item(), abs=1e-12)
    assert whole.var == pytest.approx(x.var(unbiased=False).item(), abs=1e-12)

    two_updates = RunningMoments()
    two_updates.update(x[:10])
    two_updates.update(x[10:])

    def rank(r, reduce):
        moments = RunningMoments()
        moments.update(x[:20] if r == 0 else x[20:], reduce=reduce)
        return moments

    per_rank = on_ranks(2, rank)
    for m in (two_updates, *per_rank):
        assert (m.count, m.mean, m.var) == pytest.approx((whole.count, whole.mean, whole.var), abs=1e-12)

    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(two_updates.state_dict())))
    assert restored.state_dict() == two_updates.state_dict()


def test_normalize_scores():
    scores = torch.tensor([1.0, 3.0, 5.0, 100.0], dtype=F64)
    m = RunningMoments()
    m.update(torch.tensor([1.0, 3.0], dtype=F64))  # mean 2, population std 1
    out = normalize_scores(scores, m, clip=10.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, 3.0, 10.0], dtype=F64), rtol=1e-7, atol=0)
    assert normalize_scores(scores, None, clip=2.0).tolist() == [1.0, 2.0, 2.0, 2.0]
    same = normalize_scores(scores, None, None)
    assert torch.equal(same, scores) and same.data_ptr() != scores.data_ptr()
    with pytest.raises(ValueError, match="seen no scores"):
        normalize_scores(scores, RunningMoments(), None)


# ----------------------------------------------------------------------------- group baselines

def test_group_baseline_rloo_and_grpo_by_hand():
    # Two prompts, k = 4 samples each; the second group has identical scores.
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0], dtype=F64)
    # RLOO: s_i - mean of the other three, e.g. 1 - (2 + 3 + 4) / 3 = -2, 2 - (1 + 3 + 4) / 3 = -2/3
    rloo = group_baseline(scores, 4, "rloo")
    torch.testing.assert_close(rloo, torch.tensor([-2, -2 / 3, 2 / 3, 2, 0, 0, 0, 0], dtype=F64), rtol=0, atol=1e-12)
    # GRPO: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5 / 3) + 1e-4
    grpo = group_baseline(scores, 4, "grpo")
    expected = torch.tensor([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0, 0, 0, 0], dtype=F64)
    torch.testing.assert_close(grpo, expected, rtol=0, atol=1e-12)
    assert torch.isfinite(grpo).all()


@pytest.mark.parametrize("n,k,kind,match", [
    (6, 4, "rloo", "not a whole number of groups of group_size=4"),
    (4, 1, "grpo", "group_size must be an integer >= 2"),
    (4, 0, "rloo", "group_size must be an integer >= 2"),
    (4, 2, "ppo", "expected 'rloo' or 'grpo'"),
])
def test_group_baseline_rejects_bad_groups(n, k, kind, match):
    with pytest.raises(ValueError, match=match):
        group_baseline(torch.zeros(n), k, kind)


# ----------------------------------------------------------------------------- logits

def test_entropy_from_logits():
    logits = randn(2, 3, 11, seed=1) * 3
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-12)
    assert entropy_from_logits(torch.zeros(1, 1, 8, dtype=F64)).item() == pytest.approx(math.log(8))
    assert entropy_from_logits(torch.tensor([[[1e4, 0.0, -1e4]]], dtype=F64)).item() == pytest.approx(0.0, abs=1e-12)
    # A banned token (-inf logit) adds nothing: value and gradient stay finite.
    banned = torch.tensor([[[0.0, 0.0, -math.inf]]], dtype=F64, requires_grad=True)
    h = entropy_from_logits(banned)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2)) and torch.isfinite(banned.grad).all()


def test_logprobs_from_logits_with_temperature():
    logits, labels = randn(2, 4, 9, seed=2) * 2, torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.7):
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]
        loop = torch.tensor([[logits[b, t, labels[b, t]].item() / temperature
                              - torch.logsumexp(logits[b, t] / temperature, 0).item() for t in range(4)] for b in range(2)],
                            dtype=F64)
        got = logprobs_from_logits(logits, labels, temperature)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(got, loop, rtol=0, atol=1e-12)
    assert not torch.allclose(logprobs_from_logits(logits, labels, 0.7), logprobs_from_logits(logits, labels))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprobs_from_logits(logits, labels, 0.0)


def test_explained_variance():
    mask, _ = ragged(4, 6, seed=8, min_len=2)
    returns = randn(4, 6, seed=9)
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0, abs=1e-12)
    constant = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(constant, returns, mask) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(-returns, returns, mask) < 0
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))
    halves = [(returns[:2], mask[:2]), (returns[2:], mask[2:])]
    noisy = returns + randn(4, 6, seed=10) * 0.5
    full = explained_variance(noisy, returns, mask)
    per_rank = on_ranks(2, lambda r, reduce: explained_variance(noisy[2 * r:2 * r + 2], *halves[r], reduce=reduce))
    assert per_rank == pytest.approx([full, full], abs=1e-12)


# ----------------------------------------------------------------------------- purity

def test_functions_do_not_modify_their_inputs():
    mask, _ = ragged(3, 5, seed=1)
    tensors = {k: with_garbage(randn(3, 5, seed=i), mask, 0) for i, k in enumerate("abcd")}
    before = {k: v.clone() for k, v in tensors.items()}
    a, b, c, d = tensors.values()
    gae(a, b, mask, 1.0, 0.95)
    whiten(a, mask)
    ppo_policy_loss(a, b, c, mask, 0.2)
    value_loss(a, b, c, mask, 0.2)
    kl_shaped_rewards(torch.ones(3, dtype=F64), d, mask, 0.1)
    kl_estimate(a, b, "k3", clamp=1.0, mask=mask)
    for k in tensors:
        assert torch.equal(tensors[k].nan_to_num(), before[k].nan_to_num()), k
