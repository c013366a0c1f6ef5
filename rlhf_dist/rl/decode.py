"""Sampling with a batch that shrinks: our own decode loop, used for PPO/GRPO rollouts (`ppo.training.decoding`).

HF ``generate`` keeps every row of the batch until the longest response ends: a row that stopped at its EOS
after 5 tokens is fed a pad token and computed for the remaining steps, and its KV cache stays. A group
estimator's k samples of a prompt are k copies of it, prefilled k times. `decode` does neither:

- **finished rows leave the batch**: after each step the rows that sampled a stop token are dropped from the
  next forward and from the KV cache (``Cache.batch_select_indices``), so a step costs what its unfinished rows
  cost and the cache shrinks with them;
- **each distinct prompt is prefilled once**: identical rows (GRPO/RLOO's k samples, `samples_per_prompt`) share
  one prefill, whose cache is then copied to each of its rows; prompts of very different lengths are prefilled in
  groups of similar length (`_prefill`), so that left padding costs little there either.

It samples exactly from ``softmax(logits / temperature)`` (the distribution `forward_logprobs` computes: the
default ``top_k=0, top_p=1`` of docs/ppo.md item 14), by the Gumbel-max trick: ``argmax(logp + g)`` with
``g = -log(E)``, ``E ~ Exp(1)`` drawn for the unfinished rows only, in row order. So the tokens do not depend on
whether finished rows are computed or dropped, nor on whether prompts share their prefill (up to floating-point
differences between batch shapes): ``compact=False`` and ``share_prompts=False`` compute the same rollout the
slow way, and tests/test_decode.py compares them. The draw differs from ``torch.multinomial``'s, so the same seed
gives other tokens than HF ``generate`` (the same distribution).

`decode` also counts its work (`DecodeWork`): token slots and attention (query, key) pairs computed, and the
part of them that fell on padding or finished rows, for the benchmarks (benchmarks/ragged_rollouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rlhf_dist.rl.generation import (
    Generation,
    check_left_padded,
    eval_mode,
    forward_accepts,
    peft_inner,
    position_ids_from_mask,
)


@dataclass
class DecodeWork:
    """What a decode computed, in token slots (one row's one position through every layer) and attention pairs
    (one query position attending one cached key position, masked or not), and how much of it was wasted."""

    prefill_slots: int = 0
    prefill_pad_slots: int = 0
    decode_slots: int = 0
    decode_finished_slots: int = 0   # rows already finished (HF generate computes them; `decode` drops them)
    attention_pairs: int = 0
    attention_pad_pairs: int = 0     # a query attending a padding position (masked, still computed)
    steps: int = 0

    def as_dict(self) -> dict[str, float]:
        slots = self.prefill_slots + self.decode_slots
        wasted = self.prefill_pad_slots + self.decode_finished_slots
        return {"prefill_slots": self.prefill_slots, "prefill_pad_slots": self.prefill_pad_slots,
                "decode_slots": self.decode_slots, "decode_finished_slots": self.decode_finished_slots,
                "attention_pairs": self.attention_pairs, "attention_pad_pairs": self.attention_pad_pairs,
                "wasted_slot_share": wasted / max(slots, 1),
                "wasted_attention_share": self.attention_pad_pairs / max(self.attention_pairs, 1)}


def _cache_argument(model: nn.Module) -> str:
    """The keyword a causal LM takes its KV cache by: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


def _new_cache(model: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=peft_inner(model).config)
    except TypeError:  # an older transformers
        return DynamicCache()


def distinct_rows(query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, inverse)``: the first row of each distinct prompt (its tokens and padding) and, for every row, the
    index of its distinct prompt in ``first``; row b is ``first[inverse[b]]``'s prompt."""
    key = torch.where(query_mask.bool(), query_ids, -1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    order = torch.argsort(first)  # distinct prompts in order of first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return first[order], rank[inverse]


def _prefill(policy: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache_kw: str, work: DecodeWork,
             group: bool = True):
    """Prefill the distinct prompts ``ids``/``mask`` ([U, L], left-padded): ``(cache, last logits [U, V], mask, back)``.

    With ``group``, where left padding would be more than 5% of the prefill, the prompts go in up to 4 groups of
    similar length (sorted), each cut to its own longest prompt, and the groups' caches are joined, left-padded with
    zeros to
    the longest (masked positions, as padding is); this needs plain `DynamicLayer` caches (else one group). The
    returned mask is ``mask`` cut to the joined cache's width; ``back`` orders the forward calls' rows (concatenated)
    as the prompts. Adds the slots and attention pairs to `work`.
    """
    real = mask.sum(1)
    width = int(real.max())
    ids, mask = ids[:, ids.shape[1] - width:], mask[:, mask.shape[1] - width:]
    padded_share = 1 - float(real.sum()) / max(ids.numel(), 1)
    groups = [torch.arange(len(ids), device=ids.device)]
    layers = getattr(_new_cache(policy), "layers", [])
    plain = bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)
    if group and padded_share > 0.05 and len(ids) > 1 and plain:
        groups = list(torch.argsort(real, stable=True).tensor_split(min(4, len(ids))))
    keep_last = {"logits_to_keep": 1} if forward_accepts(policy, "logits_to_keep") else {}
    caches, logits = [], []
    for rows in groups:
        w = int(real[rows].max())
        g_ids, g_mask = ids[rows][:, width - w:], mask[rows][:, width - w:]
        cache = _new_cache(policy)
        out = policy(input_ids=g_ids, attention_mask=g_mask, position_ids=position_ids_from_mask(g_mask),
                     use_cache=True, **keep_last, **{cache_kw: cache})
        caches.append((cache, w))
        logits.append(out.logits[:, -1])
        g_real = real[rows]
        work.prefill_slots += g_ids.numel()
        work.prefill_pad_slots += int(g_ids.numel() - g_real.sum())
        work.attention_pairs += len(rows) * w * (w + 1) // 2  # causal: position i sees i + 1 keys
        work.attention_pad_pairs += int(sum(int(p) * (2 * w - int(p) + 1) // 2 for p in (w - g_real).tolist()))
    if len(groups) == 1:
        return caches[0][0], logits[0], mask, groups[0]
    joined = caches[0][0]
    for i, layer in enumerate(joined.layers):
        for name in ("keys", "values"):
            parts = [torch.nn.functional.pad(getattr(c.layers[i], name), (0, 0, width - w, 0)) for c, w in caches]
            setattr(layer, name, torch.cat(parts))
    back = torch.argsort(torch.cat(groups))  # the groups' rows back in the prompts' order
    joined.batch_select_indices(back)
    return joined, torch.cat(logits)[back], mask, back


@torch.no_grad()
def decode(policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, stop_ids: Sequence[int], pad_id: int, generator_seed: int | None = None,
           record_logprobs: bool = False, record_hidden: bool = False, compact: bool = True,
           share_prompts: bool = True) -> tuple[Generation, DecodeWork]:
    """Sample one response per query from ``softmax(logits / temperature)``, cut at its first stop token.

    Same contract as `rlhf_dist.rl.generation.generate` (left-padded queries in; a `Generation` with right-padded
    responses, ``ended``, and the recorded log-probabilities, entropies and hidden states), without ``top_k`` /
    ``top_p`` and without ZeRO-3's ``synced_gpus`` (the caller falls back to ``generate`` for those). With
    ``generator_seed`` the draw comes from a ``torch.Generator`` seeded with it (the global RNG is not touched).
    ``compact=False`` keeps finished rows in the batch and prefills in one padded batch, and ``share_prompts=False``
    prefills every row: the same tokens, computed the way ``generate`` does (for tests and the benchmark's counts).
    Returns the generation and the work it took (`DecodeWork`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if record_hidden and not record_logprobs:
        raise ValueError("record_hidden needs record_logprobs")
    check_left_padded(query_mask)
    device, rows = query_ids.device, query_ids.shape[0]
    stops = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=device)
    generator = None
    if generator_seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(generator_seed))
    work = DecodeWork()

    if share_prompts:
        first, inverse = distinct_rows(query_ids, query_mask)
    else:
        first, inverse = torch.arange(rows, device=device), torch.arange(rows, device=device)
    p_ids, p_mask = query_ids[first], query_mask[first]
    hidden: list[torch.Tensor] = []
    hook = None
    if record_hidden:
        hook = policy.get_output_embeddings().register_forward_pre_hook(lambda m, args: hidden.append(args[0][:, -1].float()))
    cache_kw = _cache_argument(policy)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    entropy = torch.zeros_like(logprobs)
    states: torch.Tensor | None = None
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    try:
        with eval_mode(policy):
            cache, logits, p_mask, back = _prefill(policy, p_ids, p_mask, cache_kw, work, group=compact)
            last_state = torch.cat(hidden)[back][inverse] if record_hidden else None
            hidden.clear()
            if len(first) != rows:  # each row gets its prompt's cache
                cache.batch_select_indices(inverse)
            logits = logits[inverse]
            mask = p_mask[inverse]
            position = position_ids_from_mask(mask)[:, -1]
            active = torch.arange(rows, device=device)  # the unfinished rows, in row order
            computed = torch.arange(rows, device=device)  # the rows the last forward computed (all, or the active)
            for t in range(max_new_tokens):
                work.steps += 1
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                noise = torch.empty_like(logp).exponential_(generator=generator)
                token = (logp - noise.log()).argmax(dim=-1)  # Gumbel-max: a draw from softmax(logp)
                tokens[active, t] = token
                if record_logprobs:
                    logprobs[active, t] = logp.gather(1, token[:, None]).squeeze(1)
                    p = logp.exp()
                    entropy[active, t] = -(p * torch.where(p > 0, logp, 0)).sum(dim=-1)
                    if record_hidden:
                        if states is None:
                            states = torch.zeros((rows, max_new_tokens, last_state.shape[-1]), device=device)
                        states[active, t] = last_state
                stopped = torch.isin(token, stops) if len(stops) else torch.zeros_like(token, dtype=torch.bool)
                lengths[active[stopped]] = t + 1
                ended[active[stopped]] = True
                keep = ~stopped
                if t + 1 == max_new_tokens or not bool(keep.any()):
                    break
                if compact:
                    kept = keep.nonzero().squeeze(1)
                    if len(kept) != len(active):
                        cache.batch_select_indices(kept)
                        mask, position = mask[kept], position[kept]
                    active = active[kept]
                    computed = active
                    step_ids = token[kept]
                else:  # every row, finished or not, as generate does (a finished row is fed the pad token)
                    step_ids = tokens[:, t]
                    active = active[keep]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                n, keys = len(computed), mask.shape[1]
                work.decode_slots += n
                work.decode_finished_slots += n - len(active)
                work.attention_pairs += n * keys
                live = mask if compact else mask[active]  # a finished row's pairs are all wasted, an active one's pads
                work.attention_pad_pairs += (n - len(active)) * keys + int((live == 0).sum())
                out = policy(input_ids=step_ids[:, None], attention_mask=mask, position_ids=position[:, None],
                             use_cache=True, **{cache_kw: cache})
                logits = out.logits[:, -1]
                if record_hidden:
                    last_state = hidden.pop()
                if not compact:
                    logits = logits[active]
                    last_state = last_state[active] if record_hidden else None
    finally:
        if hook is not None:
            hook.remove()
    width = int(lengths.max())
    columns = torch.arange(width, device=device)
    response_mask = columns[None, :] < lengths[:, None]
    response_ids = torch.where(response_mask, tokens[:, :width], pad_id)
    gen = Generation(response_ids, response_mask, lengths, ended)
    if record_logprobs:
        gen.logprobs = torch.where(response_mask, logprobs[:, :width], 0.0)
        gen.entropy = torch.where(response_mask, entropy[:, :width], 0.0)
        if record_hidden:
            gen.hidden = torch.where(response_mask[..., None], states[:, :width], 0.0)
    return gen, work
