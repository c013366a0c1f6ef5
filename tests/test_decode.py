"""Our decode loop (rlhf_dist.rl.decode): finished rows leave the batch and shared prompts are prefilled once, and
neither changes what is sampled or recorded; padding-free forwards (rlhf_dist.rl.packing) give the padded forward's
numbers and gradients. Models and helpers as in test_rollout.py (sharpened tiny Llama and
GPT-2: peaked attention, so a position or padding slip changes the numbers)."""

from __future__ import annotations

import pytest
import torch
from test_rollout import gpt2_config, load_policy, rand_ids, sharpen

from rlhf_dist.rl.decode import decode, distinct_rows
from rlhf_dist.rl.generation import left_pad
from rlhf_dist.rl.packing import Packing, bins_of, pack, packing_pays
from rlhf_dist.rl.scoring import forward_logprobs, packing_matches, sequence_scores, token_values


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def policies(tiny_model, tok):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return {"llama-sdpa": load_policy(tiny_model, "sdpa"), "llama-eager": load_policy(tiny_model, "eager"),
            "gpt2-sdpa": sharpen(GPT2LMHeadModel(gpt2_config(tok, "sdpa")), seed=3).eval()}


def grouped_queries(tok, k: int = 3):
    """Two prompts sampled k times each (a group estimator's rows) and two single prompts, all of other lengths."""
    prompts = [rand_ids(n, seed=70 + n) for n in (3, 9, 5, 1)]
    rows = [prompts[0]] * k + [prompts[2]] + [prompts[1]] * k + [prompts[3]]
    return left_pad(rows, tok.pad_token_id)


def stopping_kwargs(policy, tok, q_ids, q_mask) -> dict:
    """Settings under which rows stop at different steps: the stop tokens are ones that rows sample at steps 2-9 when
    nothing stops them (row 1 excepted, so that one row may run to the end)."""
    kwargs = dict(max_new_tokens=14, temperature=0.8, pad_id=tok.pad_token_id, generator_seed=11)
    free, _ = decode(policy, q_ids, q_mask, stop_ids=[], **kwargs)
    stops = {int(free.response_ids[b, 2 + b]) for b in range(len(q_ids)) if b != 1}
    return {**kwargs, "stop_ids": sorted(stops)}


@pytest.mark.parametrize("kind", ["llama-sdpa", "llama-eager", "gpt2-sdpa"])
def test_dropping_finished_rows_and_sharing_prefills_changes_nothing(policies, tok, kind):
    policy = policies[kind]
    q_ids, q_mask = grouped_queries(tok)
    kwargs = stopping_kwargs(policy, tok, q_ids, q_mask)
    fast, fast_work = decode(policy, q_ids, q_mask, record_logprobs=True, record_hidden=True, **kwargs)
    slow, slow_work = decode(policy, q_ids, q_mask, record_logprobs=True, record_hidden=True, compact=False,
                             share_prompts=False, **kwargs)
    assert len(set(fast.lengths.tolist())) > 2 and bool(fast.ended.any())  # rows ended at different steps
    for name in ("response_ids", "response_mask", "lengths", "ended"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.entropy, slow.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.hidden, slow.hidden, atol=1e-5, rtol=1e-5)
    # the same k samples of a prompt are not the same response (each row draws its own noise)
    assert not torch.equal(fast.response_ids[0], fast.response_ids[1])

    # the work, counted: 4 distinct prompts (3, 9, 5 and 1 tokens) prefilled once each, in groups of similar length
    # (here one each: no padding), instead of 8 rows padded to 9; no finished row computed
    assert fast_work.prefill_slots == 3 + 9 + 5 + 1 and fast_work.prefill_pad_slots == 0
    assert slow_work.prefill_slots == 8 * 9 and slow_work.prefill_pad_slots == 8 * 9 - (3 * 3 + 5 + 3 * 9 + 1)
    assert fast_work.decode_finished_slots == 0 and slow_work.decode_finished_slots > 0
    assert fast_work.decode_slots == int((fast.lengths - 1).sum())  # a row of length L is fed L - 1 tokens
    assert slow_work.decode_slots == 8 * (slow_work.steps - 1)
    assert fast_work.as_dict()["wasted_slot_share"] < slow_work.as_dict()["wasted_slot_share"]


def test_decode_records_what_the_forward_computes(policies, tok):
    policy = policies["llama-sdpa"]
    q_ids, q_mask = grouped_queries(tok)
    kwargs = stopping_kwargs(policy, tok, q_ids, q_mask)
    gen, _ = decode(policy, q_ids, q_mask, record_logprobs=True, **kwargs)
    with torch.no_grad():
        expected, expected_entropy = forward_logprobs(policy, q_ids, q_mask, gen.response_ids, gen.response_mask, 0.8,
                                                      return_entropy=True)
    torch.testing.assert_close(gen.logprobs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gen.entropy, expected_entropy, atol=1e-5, rtol=0)
    assert bool((gen.logprobs[~gen.response_mask] == 0).all())
    # a response is cut at its first stop token; padding after it
    stops = set(kwargs["stop_ids"])
    for b in range(len(gen.lengths)):
        row = gen.response_ids[b, :int(gen.lengths[b])].tolist()
        assert bool(gen.ended[b]) == bool(stops & set(row))
        assert not stops & set(row[:-1])  # cut at the first stop token
        assert bool((gen.response_ids[b, int(gen.lengths[b]):] == tok.pad_token_id).all())


def test_decode_samples_the_softmax_of_the_logits(policies, tok):
    """One prompt, 6000 rows, one token each: the first tokens' counts fit softmax(logits / T) (a chi-square test over
    the 15 likeliest tokens and the rest, at the 1e-4 level), and do not fit the softmax at another temperature; a seed
    fixes the draw without touching the global RNG."""
    policy, n = policies["llama-sdpa"], 6000
    prompt = rand_ids(6, seed=5)
    q_ids, q_mask = left_pad([prompt] * n, tok.pad_token_id)
    rng = torch.get_rng_state()
    gen, work = decode(policy, q_ids, q_mask, max_new_tokens=1, temperature=0.7, stop_ids=[], pad_id=tok.pad_token_id,
                       generator_seed=3)
    assert torch.equal(torch.get_rng_state(), rng) and work.prefill_slots == 6
    with torch.no_grad():
        logits = policy(input_ids=q_ids[:1], attention_mask=q_mask[:1]).logits[0, -1].double()
    counts = torch.bincount(gen.response_ids[:, 0], minlength=len(logits)).double()

    def chi_square(temperature: float) -> float:
        p = torch.softmax(logits / temperature, dim=-1)
        top = torch.argsort(p, descending=True)[:15]
        expected = torch.cat([p[top], (1 - p[top].sum())[None]]) * n
        observed = torch.cat([counts[top], (n - counts[top].sum())[None]])
        return float(((observed - expected) ** 2 / expected).sum())

    assert chi_square(0.7) < 44.3, chi_square(0.7)  # 15 degrees of freedom: P(chi2 > 44.3) = 1e-4
    assert chi_square(0.8) > 100 and chi_square(0.6) > 100  # the test can tell a temperature 0.1 off
    same, _ = decode(policy, q_ids[:50], q_mask[:50], max_new_tokens=1, temperature=0.7, stop_ids=[],
                     pad_id=tok.pad_token_id, generator_seed=3)
    other, _ = decode(policy, q_ids[:50], q_mask[:50], max_new_tokens=1, temperature=0.7, stop_ids=[],
                      pad_id=tok.pad_token_id, generator_seed=4)
    assert torch.equal(same.response_ids, gen.response_ids[:50])
    assert not torch.equal(same.response_ids, other.response_ids)


def test_distinct_rows_maps_each_row_to_its_prompt():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [1, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])  # row 3 = row 0 (its pad differs)
    first, inverse = distinct_rows(ids, mask)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 0, 1]


# ----------------------------------------------------------------------------- padding-free forwards

def ragged_batch(policy, tok):
    q_ids, q_mask = grouped_queries(tok)
    kwargs = stopping_kwargs(policy, tok, q_ids, q_mask)
    gen, _ = decode(policy, q_ids, q_mask, **kwargs)
    assert len(set(gen.lengths.tolist())) > 2
    return q_ids, q_mask, gen.response_ids, gen.response_mask


@pytest.mark.parametrize("kind", ["llama-sdpa", "llama-eager", "gpt2-sdpa"])
def test_packed_forward_equals_the_padded_one_values_and_gradients(policies, tok, kind):
    """The real tokens packed into one row (positions restarting per row, no mask), in one forward or in bins of a few
    sequences (one bin per sequence at capacity 1): the same log-probabilities and entropies as the padded forward, and
    the same gradients, to fp32 rounding; `packing_matches` agrees."""
    policy = policies[kind]
    q_ids, q_mask, r_ids, r_mask = ragged_batch(policy, tok)
    assert packing_matches(policy, len(tok), "cpu", 0.8)
    lengths = (q_mask.sum(1) + r_mask.sum(1)).tolist()
    assert len(bins_of(lengths, 1)) == len(lengths) and 1 < len(bins_of(lengths, 2 * max(lengths))) <= len(lengths) / 2
    for packed in (Packing(1), Packing(2 * max(lengths))):
        compare_packed_and_padded(policy, q_ids, q_mask, r_ids, r_mask, packed)
    compare_packed_and_padded(policy, q_ids, q_mask, r_ids, r_mask, Packing())  # one forward


def compare_packed_and_padded(policy, q_ids, q_mask, r_ids, r_mask, packing):
    results = {}
    for packed in (None, packing):
        policy.zero_grad()
        logprobs, entropy = forward_logprobs(policy, q_ids, q_mask, r_ids, r_mask, 0.8, return_entropy=True,
                                             packed=packed)
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        results[packed] = (logprobs.detach(), entropy.detach(),
                           {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    policy.zero_grad()
    (lp0, en0, g0), (lp1, en1, g1) = results[None], results[packing]
    torch.testing.assert_close(lp1, lp0, atol=2e-5, rtol=0)
    torch.testing.assert_close(en1, en0, atol=2e-5, rtol=0)
    assert bool((lp1[~r_mask] == 0).all()) and float(lp0[r_mask].std()) > 0.1
    assert g0.keys() == g1.keys() and len(g0) > 5
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-4, rtol=1e-3, msg=name)
    assert max(float(g.abs().max()) for g in g0.values()) > 0.1  # gradients worth comparing


def test_packing_is_refused_where_the_attention_would_mix_the_sequences(policies, tok, monkeypatch):
    """With transformers' detection of packed sequences switched off, packed rows attend to each other: the check
    sees other numbers and says no (the loop then keeps padded forwards)."""
    import transformers.masking_utils as masking

    policy = policies["llama-sdpa"]
    assert packing_matches(policy, len(tok), "cpu")
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_matches(policy, len(tok), "cpu")


def test_actor_critic_packed_pass_equals_the_padded_one(policies, tok, monkeypatch):
    """The actor-critic's policy pass with a value head on it, packed (forced, whatever `packing_pays` would say) and
    padded: the same log-probabilities, entropies and values."""
    from rlhf_dist.rl import actor_critic
    from rlhf_dist.rl.actor_critic import ActorCritic, ValueHead

    packs = []
    monkeypatch.setattr(actor_critic, "packing_for", lambda packing, *a: packing)  # packed whatever it costs
    monkeypatch.setattr(actor_critic, "pack", lambda *a: packs.append(len(pack(*a).bins)) or pack(*a))

    policy = policies["llama-eager"]
    q_ids, q_mask, r_ids, r_mask = ragged_batch(policy, tok)
    model = ActorCritic(policy, 0.8, value_head=ValueHead(policy.config.hidden_size, seed=1))
    with torch.no_grad():
        padded = model(q_ids, q_mask, r_ids, r_mask)
        for packing in (Packing(), Packing(1)):  # one forward, a forward per sequence
            model.packed = packing
            packed = model(q_ids, q_mask, r_ids, r_mask)
            for a, b in zip(padded, packed):
                torch.testing.assert_close(b, a, atol=2e-5, rtol=0)
    assert float(packed[2][r_mask].abs().mean()) > 0.01 and packs == [1, len(q_ids)]


def test_packing_is_chosen_where_it_costs_fewer_flops():
    """One packed row of N tokens under sdpa computes N^2 attention pairs against B x W^2 padded: packing pays for a
    wide model with few rows, not for a narrow one with many; with flash-attention (per-sequence kernels) always. In
    bins whose attention costs at most 5% of their linear layers' it pays wherever there is padding to save."""
    from types import SimpleNamespace

    def model(hidden: int, inter: int, attn: str = "sdpa"):
        return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden, intermediate_size=inter,
                                                      _attn_implementation=attn))

    def masks(rows: int, prompt: int, response: int, real: float):
        q = torch.zeros(rows, prompt, dtype=torch.long)
        q[:, prompt - int(prompt * real):] = 1
        r = torch.zeros(rows, response, dtype=torch.bool)
        r[:, :int(response * real)] = True
        return q, r

    wide, narrow = model(4096, 11008), model(64, 256)
    assert packing_pays(wide, *masks(8, 256, 512, 0.5))  # 7B-like, 8 rows half padding: linear layers dominate
    assert not packing_pays(narrow, *masks(128, 64, 128, 0.5))  # 128 rows in one row: N^2 attention dominates
    assert not packing_pays(wide, *masks(8, 256, 512, 1.0))  # nothing to save
    assert packing_pays(model(64, 256, "flash_attention_2"), *masks(128, 64, 128, 0.5))

    # in bins (`Packing.for_model`): at most capacity tokens, where attention per token is 5% of the linear layers'
    linear = 2 * (4 * 512 * 512 + 3 * 512 * 1792)
    assert Packing.for_model(model(512, 1792)).capacity == int(0.05 * linear / (4 * 512)) == 185
    assert Packing.for_model(model(512, 1792, "flash_attention_2")).capacity is None  # per-sequence kernels
    assert Packing.for_model(model(512, 1792), one_forward=True).capacity is None  # ZeRO-3 across processes
    small = Packing.for_model(narrow)
    assert small.capacity == 128  # the rule says 25 tokens: too small a forward, so the floor
    assert packing_pays(narrow, *masks(128, 64, 128, 0.5), small)  # 128 rows in bins of 1: no N^2 left
    assert not packing_pays(narrow, *masks(128, 64, 128, 1.0), small)  # nothing to save
    assert bins_of([5, 3, 4, 9, 1, 1], 8) == [(0, 8), (8, 12), (12, 21), (21, 23)]
    assert bins_of([5, 3, 4], None) == [(0, 12)] and bins_of([], 8) == [(0, 0)]


def test_reward_and_value_scores_packed_equal_the_padded_ones(tiny_model, tok):
    """A one-label classifier (reward or value model): its score of each sequence and of every response position,
    packed and padded, agree; `packing_matches(classifier=True)` says so."""
    from test_rollout import load_classifier

    classifier = load_classifier(tiny_model, "sdpa")
    policy = load_policy(tiny_model, "sdpa")
    q_ids, q_mask, r_ids, r_mask = ragged_batch(policy, tok)
    assert packing_matches(classifier, len(tok), "cpu", classifier=True)
    with torch.no_grad():
        for fn in (sequence_scores, token_values):
            padded = fn(classifier, q_ids, q_mask, r_ids, r_mask)
            for packing in (Packing(), Packing(1), Packing(20)):  # one forward, one per sequence, bins of a few
                packed = fn(classifier, q_ids, q_mask, r_ids, r_mask, packed=packing)
                torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-5)
            assert float(padded.std()) > 0.01
