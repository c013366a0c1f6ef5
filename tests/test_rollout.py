"""Sampling and scoring helpers (rlhf_dist.rl.generation, .scoring) on the tiny Llama: padding invariance, rollout
vs training forward.

Models are float32 on CPU. Their weights are re-drawn with a larger spread (`sharpen`) so that
attention is peaked and outputs depend visibly on positions and context: a test that a wrong
position-id scheme or a padding leak would change the numbers is part of the padding test.
Padded slots are filled with garbage token ids (EOS, random tokens), never only with the pad
token, because the helpers must find valid tokens from the masks alone (docs/ppo.md item 2).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf_dist.rl.generation import disable_dropout, generate, left_pad
from rlhf_dist.rl.rewards import first_stop_truncate
from rlhf_dist.rl.scoring import decode_pairs, forward_logprobs, forward_token_scores, retokenize, sequence_scores, token_values

ATTN = ("sdpa", "eager")
# Llama has rotary positions, which only see position DIFFERENCES: a sequence shifted by its left
# padding gives the same outputs whatever its position ids. GPT-2 learns absolute position
# embeddings, so it also checks that position ids are computed from the mask.
KINDS = ("llama-sdpa", "llama-eager", "gpt2-sdpa", "gpt2-eager")


# ----------------------------------------------------------------------------- helpers

def same_sample(a, b) -> bool:
    """Two `Generation`s hold the same responses (ids, masks, lengths, ended)."""
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("response_ids", "response_mask", "lengths", "ended"))


def sharpen(model: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Re-draw every matrix N(0, std^2): peaked attention and logits instead of near-uniform ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def load_policy(path, attn: str = "sdpa", **config_overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn, **config_overrides)
    return sharpen(model, seed=1).eval()


def load_classifier(path, attn: str = "sdpa", num_labels: int = 1):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, attn_implementation=attn,
                                                               num_labels=num_labels)
    model.config.pad_token_id = 0  # '<pad>' in the tiny tokenizer
    return sharpen(model, seed=2).eval()


def right_pad(rows: list[list[int]], width: int, fill: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, width] ids with GARBAGE (cycled from ``fill``) in the padding, and the bool mask."""
    ids = torch.tensor([row + [fill[(i + j) % len(fill)] for j in range(width - len(row))] for i, row in enumerate(rows)])
    mask = torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
    return ids, mask


def garbage_left(ids: torch.Tensor, mask: torch.Tensor, fill: int) -> torch.Tensor:
    """Replace the left padding of a left-padded batch by ``fill`` (e.g. EOS): only the mask may mark it."""
    return torch.where(mask.bool(), ids, fill)


def rand_ids(n: int, seed: int, low: int = 7, high: int = 700) -> list[int]:
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def gpt2_config(tok, attn: str, **overrides):
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **overrides)
    config._attn_implementation = attn
    return config


def model_zoo(load_llama, gpt2_class, tok, seed: int, **gpt2_overrides) -> dict:
    """The tiny Llama (rotary positions) and a tiny GPT-2 (absolute positions), each with eager and
    sdpa attention; "sdpa" names the Llama default."""
    models = {f"llama-{attn}": load_llama(attn) for attn in ATTN}
    for attn in ATTN:
        torch.manual_seed(0)
        models[f"gpt2-{attn}"] = sharpen(gpt2_class(gpt2_config(tok, attn, **gpt2_overrides)), seed=seed).eval()
    models["sdpa"] = models["llama-sdpa"]
    return models


@pytest.fixture(scope="module")
def policies(tiny_model, tok):
    from transformers import GPT2LMHeadModel

    return model_zoo(lambda attn: load_policy(tiny_model, attn), GPT2LMHeadModel, tok, seed=3)


@pytest.fixture(scope="module")
def classifiers(tiny_model, tok):
    from transformers import GPT2ForSequenceClassification

    return model_zoo(lambda attn: load_classifier(tiny_model, attn), GPT2ForSequenceClassification, tok, seed=4,
                     num_labels=1)


# ----------------------------------------------------------------------------- padding

def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        left_pad([[5], []], pad_id=0)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_invariance(policies, classifiers, tok, kind):
    """The checklist's padding-invariance test: one query+response, four batch layouts, same numbers (atol 1e-5)."""
    policy, clf = policies[kind], classifiers[kind]
    eos, temperature = tok.eos_token_id, 0.7
    q, r = rand_ids(5, seed=10), rand_ids(4, seed=11)
    long_q, other_r = rand_ids(9, seed=12), rand_ids(6, seed=13)
    short_q, short_r = rand_ids(3, seed=14), rand_ids(2, seed=15)

    def all_outputs(query_ids, query_mask, resp_ids, resp_mask):
        with torch.no_grad():
            return (forward_logprobs(policy, query_ids, query_mask, resp_ids, resp_mask, temperature),
                    token_values(clf, query_ids, query_mask, resp_ids, resp_mask),
                    sequence_scores(clf, query_ids, query_mask, resp_ids, resp_mask))

    # 1. alone in the batch, no padding at all
    qa, qma = left_pad([q], tok.pad_token_id)
    ra, rma = right_pad([r], 4, [eos])
    lp0, v0, s0 = all_outputs(qa, qma, ra, rma)

    # 2. left-padded next to a longer query (and a longer response: right padding after r)
    qb, qmb = left_pad([q, long_q], tok.pad_token_id)
    qb = garbage_left(qb, qmb, eos)
    rb, rmb = right_pad([r, other_r], 6, [eos, 3, 500])
    lp_b, v_b, s_b = all_outputs(qb, qmb, rb, rmb)

    # 3. next to a different, shorter batch-mate, in the second row
    qc, qmc = left_pad([short_q, q], tok.pad_token_id)
    qc = garbage_left(qc, qmc, 321)
    rc, rmc = right_pad([short_r, r], 4, [eos, 99])
    lp_c, v_c, s_c = all_outputs(qc, qmc, rc, rmc)

    # 4. layout 2 with three extra right-padding columns on the responses
    rd, rmd = right_pad([r, other_r], 9, [17, eos])
    lp_d, v_d, s_d = all_outputs(qb, qmb, rd, rmd)

    assert lp0.shape == v0.shape == (1, 4) and s0.shape == (1,)
    assert bool((lp0 < 0).all()) and float(lp0.std()) > 0.1  # real, non-uniform log-probabilities
    for lp, v, s, row in ((lp_b, v_b, s_b, 0), (lp_c, v_c, s_c, 1), (lp_d, v_d, s_d, 0)):
        torch.testing.assert_close(lp[row, :4], lp0[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(v[row, :4], v0[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(s[row], s0[0], atol=1e-5, rtol=0)
        assert bool((lp[row, 4:] == 0).all()) and bool((v[row, 4:] == 0).all())  # masked positions are 0
    # The batch-mates' own numbers are unaffected by the extra columns either.
    torch.testing.assert_close(lp_d[1, :6], lp_b[1, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(s_d, s_b, atol=1e-5, rtol=0)

    # Controls: the test can fail. Attending to the left padding changes the numbers; so, for GPT-2's
    # absolute positions, do positions 0..L-1 that count the padding (transformers' default).
    ids = torch.cat([qb, rb], 1)
    mask = torch.cat([qmb, rmb.long()], 1)

    def row0_logprobs(**kwargs):
        with torch.no_grad():
            logits = policy(input_ids=ids, **kwargs).logits[0, -(6 + 1):-1][:4]
        return torch.log_softmax(logits / temperature, -1).gather(-1, rb[0, :4, None]).squeeze(-1)

    assert float((row0_logprobs() - lp0[0]).abs().max()) > 1e-3
    if kind.startswith("gpt2"):
        assert float((row0_logprobs(attention_mask=mask) - lp0[0]).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- rollout vs training forward

@pytest.mark.parametrize("kind", KINDS)
def test_rollout_logprobs_match_generation_scores(policies, tok, monkeypatch, kind):
    """forward_logprobs on a sampled rollout = log-softmax of the (temperature-scaled) scores generate sampled
    from, so the first PPO ratio is 1 (docs/ppo.md items 13, 14)."""
    policy = policies[kind]
    temperature = 0.7
    captured = {}
    original = policy.generate

    def recording_generate(**kwargs):
        out = original(**kwargs, output_scores=True, return_dict_in_generate=True)
        captured["scores"] = torch.stack(out.scores, dim=1)  # [B, steps, V], after the temperature warper
        return out.sequences

    monkeypatch.setattr(policy, "generate", recording_generate)
    queries = [rand_ids(n, seed=20 + n) for n in (3, 8, 5, 1)]
    query_ids, query_mask = left_pad(queries, tok.pad_token_id)
    # Stop at a token the model is likely to emit: the greedy next token of the second query.
    with torch.no_grad():
        stop = int(policy(input_ids=torch.tensor([queries[1]])).logits[0, -1].argmax())
    rollout = generate(policy, query_ids, query_mask, max_new_tokens=12, temperature=temperature,
                       stop_ids=[stop, tok.eos_token_id], pad_id=tok.pad_token_id, generator_seed=0)
    ids, mask = rollout.response_ids, rollout.response_mask
    scores = captured["scores"][:, :ids.shape[1]]
    expected = torch.log_softmax(scores, -1).gather(-1, ids[..., None]).squeeze(-1)

    with torch.no_grad():
        logprobs, entropy = forward_logprobs(policy, query_ids, query_mask, ids, mask, temperature, return_entropy=True)
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-4, rtol=0)
    ratio = torch.exp(logprobs - torch.where(mask, expected, 0))
    assert float((ratio[mask] - 1).abs().max()) < 1e-4
    assert bool((logprobs[~mask] == 0).all()) and bool((entropy[~mask] == 0).all())
    p = torch.softmax(scores, -1)
    torch.testing.assert_close(entropy[mask], -(p * torch.log_softmax(scores, -1)).sum(-1)[mask], atol=1e-4, rtol=0)
    assert int(mask.sum()) >= 8 and float(logprobs[mask].std()) > 0.1  # enough real, varied tokens compared
    # Sampling at temperature 0.7 is not sampling at 1: the scaled logits are what was sampled from.
    with torch.no_grad():
        at_one = forward_logprobs(policy, query_ids, query_mask, ids, mask, 1.0)
    assert float((at_one - logprobs)[mask].abs().max()) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_recorded_while_sampling_equal_the_forward(policies, tok, kind):
    """generate(record_logprobs=True) samples the same rollout (same seed) and records what forward_logprobs computes
    afterwards, to float rounding; 0 after each response's end, where rows stopped at different steps."""
    policy = policies[kind]
    queries = [rand_ids(n, seed=60 + n) for n in (3, 8, 5, 1)]
    query_ids, query_mask = left_pad(queries, tok.pad_token_id)
    kwargs = dict(max_new_tokens=12, temperature=0.7, pad_id=tok.pad_token_id, generator_seed=3)
    free = generate(policy, query_ids, query_mask, stop_ids=[], **kwargs)
    kwargs["stop_ids"] = [int(free.response_ids[0, 4])]  # a token row 0 samples: it stops there (the others may not)
    plain = generate(policy, query_ids, query_mask, **kwargs)
    rollout = generate(policy, query_ids, query_mask, record_logprobs=True, **kwargs)
    logprobs, entropy = rollout.logprobs, rollout.entropy
    assert plain.logprobs is None and plain.entropy is None and plain.hidden is None and rollout.hidden is None
    assert same_sample(plain, rollout)  # recording does not change the sampling
    mask = rollout.response_mask
    assert bool(rollout.ended.any()) and len(set(rollout.lengths.tolist())) > 1  # rows ended at different steps
    with torch.no_grad():
        expected, expected_entropy = forward_logprobs(policy, query_ids, query_mask, rollout.response_ids, mask, 0.7,
                                                      return_entropy=True)
    assert logprobs.shape == entropy.shape == mask.shape and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)
    assert bool((logprobs[~mask] == 0).all()) and bool((entropy[~mask] == 0).all())
    assert float(logprobs[mask].std()) > 0.1

    # record_hidden: the vocabulary head's input at each predicting position = the forward's last hidden state there
    again = generate(policy, query_ids, query_mask, record_logprobs=True, record_hidden=True, **kwargs)
    hidden = again.hidden
    assert same_sample(plain, again) and torch.equal(again.logprobs, logprobs)
    ids, full_mask = torch.cat([query_ids, rollout.response_ids], 1), torch.cat([query_mask, mask.long()], 1)
    with torch.no_grad():
        states = policy(input_ids=ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp_min(0),
                        output_hidden_states=True).hidden_states[-1]
    T = mask.shape[1]
    expected_hidden = torch.where(mask[..., None], states[:, -(T + 1):-1], 0.0)
    assert hidden.shape == expected_hidden.shape
    torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=1e-5)
    assert float(hidden[mask].abs().mean()) > 0.1


# ----------------------------------------------------------------------------- generate

def test_generate_stops_pads_and_masks(policies, tok):
    policy = policies["sdpa"]
    pad = tok.pad_token_id
    query_ids, query_mask = left_pad([rand_ids(n, seed=30 + n) for n in (4, 7, 2)], pad)
    query_ids = garbage_left(query_ids, query_mask, tok.eos_token_id)

    # No stop ids: every row runs to max_new_tokens.
    free = generate(policy, query_ids, query_mask, max_new_tokens=10, temperature=1.0, stop_ids=[], pad_id=pad,
                    generator_seed=5)
    assert free.response_ids.shape == (3, 10)
    assert free.lengths.tolist() == [10, 10, 10] and not bool(free.ended.any()) and bool(free.response_mask.all())

    # Stop at a token row 0 really samples (its 5th token): row 0 must end at that token's first occurrence.
    stop = int(free.response_ids[0, 4])
    first = free.response_ids[0].tolist().index(stop)
    stopped = generate(policy, query_ids, query_mask, max_new_tokens=10, temperature=1.0, stop_ids=[stop], pad_id=pad,
                       generator_seed=5)
    ids, mask, lengths, ended = stopped.response_ids, stopped.response_mask, stopped.lengths, stopped.ended
    assert bool(ended[0]) and int(lengths[0]) == first + 1
    assert ids.shape[1] == int(lengths.max())  # trailing all-padding columns dropped
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths.tolist()
    assert bool((mask == (torch.arange(ids.shape[1])[None] < lengths[:, None])).all())
    assert bool((ids[~mask] == pad).all())
    for b in range(3):
        row = ids[b, :int(lengths[b])].tolist()
        assert bool(ended[b]) == (stop in row)
        if ended[b]:
            assert row[-1] == stop and stop not in row[:-1]
    # Each row samples from its own exponential draws (torch.multinomial), so stopping one row does not
    # change the others: the stopped rollout is the free one cut at the first stop.
    ref_ids, ref_mask, ref_lengths, ref_ended = first_stop_truncate(free.response_ids, [stop], pad)
    width = ids.shape[1]
    assert torch.equal(ids, ref_ids[:, :width]) and torch.equal(mask, ref_mask[:, :width])
    assert torch.equal(lengths, ref_lengths) and torch.equal(ended, ref_ended)

    # pad == stop (pad token is EOS): the masks still come from the lengths.
    same = generate(policy, query_ids, query_mask, max_new_tokens=10, temperature=1.0, stop_ids=[stop], pad_id=stop,
                    generator_seed=5)
    assert torch.equal(same.response_mask, mask) and torch.equal(same.lengths, lengths)

    with pytest.raises(ValueError, match="left-padded"):
        generate(policy, query_ids.flip(1), query_mask.flip(1), max_new_tokens=3, temperature=1.0, stop_ids=[],
                 pad_id=pad)


def test_same_seed_same_rollout(policies, tok):
    policy = policies["sdpa"]
    query_ids, query_mask = left_pad([rand_ids(n, seed=40 + n) for n in (3, 6)], tok.pad_token_id)
    kwargs = dict(max_new_tokens=8, temperature=1.0, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    rng_before = torch.get_rng_state()
    a = generate(policy, query_ids, query_mask, generator_seed=7, **kwargs)
    b = generate(policy, query_ids, query_mask, generator_seed=7, **kwargs)
    c = generate(policy, query_ids, query_mask, generator_seed=8, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the seed is applied in a forked RNG
    assert same_sample(a, b)
    assert not torch.equal(a.response_ids, c.response_ids[:, :a.response_ids.shape[1]])


def test_generation_config_cannot_reshape_sampling(tiny_model, tok):
    policy = load_policy(tiny_model)
    query_ids, query_mask = left_pad([rand_ids(4, seed=50)], tok.pad_token_id)
    policy.generation_config.top_k = 5  # overridden by generate's top_k=0
    policy.generation_config.repetition_penalty = 1.3  # pinned to 1.0
    out = generate(policy, query_ids, query_mask, max_new_tokens=3, temperature=1.0, stop_ids=[], pad_id=0,
                   generator_seed=0)
    assert out.response_ids.shape == (1, 3)
    policy.generation_config.min_p = 0.1  # no neutral value to pin: refused
    with pytest.raises(ValueError, match="min_p"):
        generate(policy, query_ids, query_mask, max_new_tokens=3, temperature=1.0, stop_ids=[], pad_id=0)


# ----------------------------------------------------------------------------- dropout and modes

def test_disable_dropout_and_eval_during_generation(tiny_model, tok):
    from peft import LoraConfig, get_peft_model

    base = load_policy(tiny_model, attention_dropout=0.3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([rand_ids(12, seed=60)])
    model.train()
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live

    assert disable_dropout(model) is model
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    assert base.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in base.model.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # train mode, deterministic

    # generate runs in eval mode and restores each submodule's own mode afterwards.
    frozen = base.model.layers[0]
    frozen.eval()
    seen = []
    handle = base.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    query_ids, query_mask = left_pad([rand_ids(3, seed=61)], tok.pad_token_id)
    generate(model, query_ids, query_mask, max_new_tokens=4, temperature=1.0, stop_ids=[], pad_id=0, generator_seed=0)
    handle.remove()
    assert seen and not any(seen)
    assert model.training and base.training and base.model.layers[1].training
    assert not frozen.training


# ----------------------------------------------------------------------------- reward and value models

def test_scores_match_classifier_logits(classifiers, tok):
    clf = classifiers["sdpa"]
    q, r = rand_ids(6, seed=70), rand_ids(5, seed=71)
    query_ids, query_mask = left_pad([q], tok.pad_token_id)
    resp_ids, resp_mask = torch.tensor([r]), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        score = sequence_scores(clf, query_ids, query_mask, resp_ids, resp_mask)
        values = token_values(clf, query_ids, query_mask, resp_ids, resp_mask)
        full = clf(input_ids=torch.tensor([q + r])).logits[:, 0]
        # V[t] is the score of the state before token t: the classifier on query + r[:t].
        prefixes = torch.stack([clf(input_ids=torch.tensor([q + r[:t]])).logits[0, 0] for t in range(5)])
    torch.testing.assert_close(score, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(values[0], prefixes, atol=1e-5, rtol=0)
    assert float(prefixes.std()) > 1e-2  # the values really differ from token to token

    # Right-padded batch as transformers reads it (last non-pad token) = our left/right layout.
    r2 = rand_ids(2, seed=72)
    batch = torch.tensor([q + r, q + r2 + [0, 0, 0]])
    with torch.no_grad():
        expected = clf(input_ids=batch, attention_mask=(batch != 0).long()).logits[:, 0]
        resp_ids, resp_mask = right_pad([r, r2], 5, [tok.eos_token_id])
        got = sequence_scores(clf, *left_pad([q, q], tok.pad_token_id), resp_ids, resp_mask)
        per_token = forward_token_scores(clf, batch, (batch != 0).long())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_token[1, len(q) + 1], expected[1], atol=1e-5, rtol=0)


def test_score_head_errors(tiny_model, tok, policies):
    two = load_classifier(tiny_model, num_labels=2)
    query_ids, query_mask = left_pad([rand_ids(3, seed=80)], tok.pad_token_id)
    resp_ids, resp_mask = torch.tensor([[9, 10]]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_labels=2"):
        sequence_scores(two, query_ids, query_mask, resp_ids, resp_mask)
    with pytest.raises(ValueError, match="LlamaForCausalLM has neither a `score` nor a `classifier`"):
        token_values(policies["sdpa"], query_ids, query_mask, resp_ids, resp_mask)


def test_peft_reference_is_the_adapter_disabled_policy(tiny_model, tok):
    from peft import LoraConfig, get_peft_model

    policy = load_policy(tiny_model)
    query_ids, query_mask = left_pad([rand_ids(n, seed=90 + n) for n in (4, 2)], tok.pad_token_id)
    resp_ids, resp_mask = right_pad([rand_ids(5, seed=95), rand_ids(3, seed=96)], 5, [tok.eos_token_id])
    with torch.no_grad():
        base_lp = forward_logprobs(policy, query_ids, query_mask, resp_ids, resp_mask, 1.0)
    torch.manual_seed(0)
    peft_model = get_peft_model(policy, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                                                   target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        adapted = forward_logprobs(peft_model, query_ids, query_mask, resp_ids, resp_mask, 1.0)
        with peft_model.disable_adapter():
            reference = forward_logprobs(peft_model, query_ids, query_mask, resp_ids, resp_mask, 1.0)
    torch.testing.assert_close(reference, base_lp, atol=1e-6, rtol=0)
    assert float((adapted - base_lp)[resp_mask].abs().max()) > 1e-3


# ----------------------------------------------------------------------------- another tokenizer: decode, re-encode

def test_decode_retokenize_round_trip(tok, classifiers):
    prompts = ["Question: what grows in Oakvale?\nAnswer:", "Tell me about the harvest festival.\n"]
    answers = [" Wheat and barley grow there.", "It is held in the autumn"]
    query_lists = [tok(p)["input_ids"] for p in prompts]  # BOS + prompt
    resp_lists = [tok(answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],  # stopped
                  tok(answers[1], add_special_tokens=False)["input_ids"]]  # ran out of tokens, no EOS
    ended = torch.tensor([True, False])
    query_ids, query_mask = left_pad(query_lists, tok.pad_token_id)
    query_ids = garbage_left(query_ids, query_mask, tok.eos_token_id)
    width = max(map(len, resp_lists)) + 2
    resp_ids, resp_mask = right_pad(resp_lists, width, [tok.eos_token_id, 42])
    expected = left_pad([qq + rr for qq, rr in zip(query_lists, resp_lists)], tok.pad_token_id)

    # Plain text (special tokens dropped), re-encoded with the tokenizer's BOS and EOS for responses that ended.
    texts_p, texts_r = decode_pairs(tok, query_ids, query_mask, resp_ids, resp_mask)
    assert texts_p == prompts and texts_r == answers
    ids, mask = retokenize(texts_p, texts_r, tok, max_length=None, append_eos=ended)
    assert torch.equal(ids, expected[0]) and torch.equal(mask, expected[1])

    # Special tokens kept verbatim, re-encoded without adding any: the same ids.
    texts_p, texts_r = decode_pairs(tok, query_ids, query_mask, resp_ids, resp_mask, skip_special_tokens=False)
    assert texts_p[0].startswith(tok.bos_token) and texts_r[0].endswith(tok.eos_token)
    ids2, mask2 = retokenize(texts_p, texts_r, tok, max_length=None, add_special_tokens=False)
    assert torch.equal(ids2, expected[0]) and torch.equal(mask2, expected[1])

    # max_length keeps the end of each row, where the score is read.
    ids3, mask3 = retokenize(texts_p, texts_r, tok, max_length=6, add_special_tokens=False)
    assert ids3.shape == (2, 6) and ids3.tolist() == [(qq + rr)[-6:] for qq, rr in zip(query_lists, resp_lists)]

    # Scoring the re-encoded text (as the query, with an empty response) = scoring the rollout.
    clf = classifiers["sdpa"]
    empty_ids, empty_mask = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool)
    with torch.no_grad():
        direct = sequence_scores(clf, query_ids, query_mask, resp_ids, resp_mask)
        via_text = sequence_scores(clf, ids, mask, empty_ids, empty_mask)
    torch.testing.assert_close(via_text, direct, atol=1e-5, rtol=0)
