"""The eval stage's figures as pure functions: paired win rate with a bootstrap interval, distinct-n, the degeneration
flags of one greedy completion, and the k1 KL estimate. No model, no torch import (the KL takes torch or numpy arrays).

Win rate of A over B (`win_rate`): on each prompt i, A's score a_i and B's score b_i (the reward model's, or a
reward function's; with several samples per prompt, the mean over them) give an outcome w_i = 1 if A wins, 0 if it
loses, 1/2 on a tie (|a_i - b_i| <= tie_margin + 1e-6 * max(1, |a_i|, |b_i|): equal up to float rounding, or within
a margin the caller gives, default 0); the win rate is the mean of the w_i.
Its interval is a paired percentile bootstrap over prompts: `resamples` times, n prompts are drawn with replacement
(numpy's PCG64 generator, seeded with `seed`, so the same inputs give the same interval) and the mean outcome of the
draw is taken; the interval is the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those means (numpy's
default linear interpolation). Defaults: 1000 resamples, seed 0, 95%.

Distinct-n (`distinct_n`, Li et al. 2016): over ALL completions of a model together, the number of distinct n-grams
divided by the number of n-grams (n = 1, 2); low values mean the model says the same few things.

Degeneration (`degeneration`): the reasons a greedy completion stopped being text, from its tokens (the stop token
left out) and its decoded text; an empty list means none. The rules and their thresholds (module constants):

* ``empty``: no token, or only whitespace.
* ``not_text``: under ``TEXT_SHARE`` (1/2) of the non-space characters are letters or digits (``str.isalnum``):
  "....." , "?!?! ..".
* ``repeated_token``: at least ``MIN_TOKENS`` (8) tokens, and one token id makes up ``TOKEN_SHARE`` (1/2) or more of
  them, wherever they are.
* ``loop``: at least ``MIN_TOKENS`` tokens, and one contiguous stretch made of ``MIN_REPEATS`` (3) or more
  back-to-back copies of a unit of 1 to ``MAX_PERIOD`` (6) tokens covers ``LOOP_SHARE`` (1/2) or more of them:
  "the the the the ...", "a b c a b c a b c ...".

A sensible two-sentence answer ("The people of Orin raise goats. Have a lovely day!") trips none of them; the
repeated sentence rule needs three copies, so an answer that says one thing twice is not flagged.
"""

from __future__ import annotations

import collections
from typing import Hashable, Sequence

import numpy as np

# --- win rate
RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95
ROUNDING = 1e-6  # relative: scores this close are equal (the same text scored in another batch)

# --- degeneration thresholds
MIN_TOKENS = 8
TOKEN_SHARE = 0.5
MAX_PERIOD = 6
MIN_REPEATS = 3
LOOP_SHARE = 0.5
TEXT_SHARE = 0.5


def outcomes(a: Sequence[float], b: Sequence[float], tie_margin: float = 0.0) -> np.ndarray:
    """Per prompt: 1.0 where a wins, 0.0 where b wins, 0.5 on a tie (|a - b| <= tie_margin + 1e-6 * max(1, |a|, |b|))."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two equally long lists, got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("no paired scores: a win rate needs at least one prompt")
    if not tie_margin >= 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    tie = np.abs(a - b) <= tie_margin + ROUNDING * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
    return np.where(tie, 0.5, np.where(a > b, 1.0, 0.0))


def bootstrap_interval(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, seeded; see the module)."""
    values = np.asarray(values, dtype=np.float64)
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples must be >= 1 and confidence within (0, 1), got {resamples} and {confidence}")
    rng = np.random.default_rng(seed)
    n, means, chunk = len(values), [], max(1, 1_000_000 // max(len(values), 1))
    for start in range(0, resamples, chunk):  # bounded memory: at most ~1e6 indices at once
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means.append(values[idx].mean(axis=1))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [alpha, 1 - alpha])
    return float(low), float(high)


def win_rate(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
             confidence: float = CONFIDENCE, tie_margin: float = 0.0) -> dict:
    """Paired win rate of A over B from per-prompt scores (ties count one half) with its bootstrap interval.

    Returns {win_rate, ci_low, ci_high, wins, ties, losses, prompts}."""
    w = outcomes(a, b, tie_margin)
    low, high = bootstrap_interval(w, resamples, seed, confidence)
    return {"win_rate": float(w.mean()), "ci_low": low, "ci_high": high, "wins": int((w == 1).sum()),
            "ties": int((w == 0.5).sum()), "losses": int((w == 0).sum()), "prompts": int(len(w))}


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams / all n-grams over every sequence together (0.0 when there is no n-gram at all)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen, total = set(), 0
    for seq in sequences:
        seq = list(seq)
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def longest_loop(tokens: Sequence[Hashable], max_period: int = MAX_PERIOD) -> tuple[int, int]:
    """(tokens covered, period) of the longest contiguous stretch of >= MIN_REPEATS copies of a 1..max_period-token
    unit; (0, 0) if there is none."""
    best = (0, 0)
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - p] else 0
            span = run + p  # a stretch of k copies of a p-token unit: run = (k - 1) * p
            if run >= (MIN_REPEATS - 1) * p and span > best[0]:
                best = (span, p)
    return best


def degeneration(tokens: Sequence[Hashable], text: str) -> list[str]:
    """The reasons (`empty`, `not_text`, `repeated_token`, `loop`; see the module) a greedy completion is degenerate;
    [] if it is not. `tokens`: its token ids without the stop token; `text`: the same tokens decoded."""
    tokens = list(tokens)
    chars = [c for c in text if not c.isspace()]
    if not tokens or not chars:
        return ["empty"]
    reasons = []
    if sum(c.isalnum() for c in chars) < TEXT_SHARE * len(chars):
        reasons.append("not_text")
    if len(tokens) >= MIN_TOKENS:
        if collections.Counter(tokens).most_common(1)[0][1] >= TOKEN_SHARE * len(tokens):
            reasons.append("repeated_token")
        if longest_loop(tokens)[0] >= LOOP_SHARE * len(tokens):
            reasons.append("loop")
    return reasons


def kl_k1(logprobs, ref_logprobs, mask):
    """Per-response KL estimate to the reference on responses sampled from the policy: sum over the response's tokens
    of log pi(token) - log pi_ref(token) (k1; the PPO stage's held-out KL). [B, T] tensors or arrays -> [B]."""
    return ((logprobs - ref_logprobs) * mask).sum(1)
