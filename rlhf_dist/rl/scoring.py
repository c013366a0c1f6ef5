"""Scoring sampled responses with the PPO models: per-token log-probabilities (policy, reference), values (value
model), and one score per response (reward model, or a reward function), the reward model possibly with a
tokenizer of its own (decode, re-encode).

Per-token outputs ([B, T]) are aligned with ``response_ids``: entry ``t`` belongs to the model position that
PREDICTS response token ``t`` (the last query token for ``t = 0``), and is 0 where ``response_mask`` is False
(docs/ppo.md items 3, 4, 6). Queries left-padded, responses right-padded, as `rlhf_dist.rl.generation` makes them;
every tensor on the model's device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from rlhf_dist.rl.generation import (
    concat_query_response,
    eval_mode,
    forward_accepts,
    left_pad,
    position_ids_from_mask,
)
from rlhf_dist.rl.losses import entropy_from_logits, logprobs_from_logits
from rlhf_dist.rl.packing import Packing, causal_lm_outputs, pack, packing_for
from rlhf_dist.rl.reward_fn import call_reward_fn

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Log-probabilities (policy, reference)
# ---------------------------------------------------------------------------------------------

def accepts_logits_to_keep(model: nn.Module) -> bool:
    return forward_accepts(model, "logits_to_keep")


def forward_logprobs(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                     response_mask: torch.Tensor, temperature: float, *, return_entropy: bool = False,
                     packed: Packing | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the response under ``model``, in one batched forward.

    ::

        x      = concat(query, response),  m = concat(query_mask, response_mask),  pos = cumsum(m) - 1
        logits = model(x, attention_mask=m, position_ids=pos).logits          # [B, Lq + T, V]
        logp_t = log_softmax(logits[:, Lq - 1 + t] / temperature)[response_t]   # position Lq-1+t predicts token t

    Dividing by the sampling temperature (docs/ppo.md item 13) makes this the log-probability
    that `generate` sampled with, so at the first PPO step ``exp(logp - old_logp) = 1`` (item 14).
    The same call serves the policy (with grad, in train mode with `disable_dropout` applied), the
    reference, and a PEFT policy inside the caller's ``with model.disable_adapter():``. The mode
    (train/eval) and grad are the caller's: this function changes neither. Logits are cast to
    float32 before the softmax.

    Args:
        query_ids, query_mask: [B, Lq] left-padded.
        response_ids, response_mask: [B, T] right-padded (from `generate`).
        temperature: > 0, the sampling temperature.
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per position.
        packed: padding-free forwards over the real tokens (`rlhf_dist.rl.packing`): the same numbers to float
            rounding, with the linear layers on the real tokens only, in the `Packing`'s bins (None: padded).
    Returns:
        logprobs [B, T] float32, 0 where ``response_mask`` is False (item 4); with
        ``return_entropy``, ``(logprobs, entropy)``, the entropy also [B, T] and 0 there.
    """
    if packed:
        p = pack(query_ids, query_mask, response_ids, response_mask, packed.capacity)
        logits = causal_lm_outputs(model, p, accepts_logits_to_keep(model))[0].float()  # [K, V]
        logprobs = p.unpack(logprobs_from_logits(logits, p.targets, temperature))
        return (logprobs, p.unpack(entropy_from_logits(logits / temperature))) if return_entropy else logprobs
    ids, mask = concat_query_response(query_ids, query_mask, response_ids, response_mask)
    T = response_ids.shape[1]
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
                              "use_cache": False}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = T + 1  # only positions Lq-1 .. Lq+T-1; skips the prompt's [B, Lq, V] logits
    logits = model(**kwargs).logits
    logits = logits[:, -(T + 1):-1].float()  # [B, T, V]: position Lq-1+t predicts response token t
    valid = response_mask.bool()
    logprobs = logprobs_from_logits(logits, response_ids, temperature)
    logprobs = torch.where(valid, logprobs, 0.0)
    if not return_entropy:
        return logprobs
    entropy = torch.where(valid, entropy_from_logits(logits / temperature), 0.0)
    return logprobs, entropy


@torch.no_grad()
def packing_matches(model: nn.Module, vocab_size: int, device, temperature: float = 1.0, classifier: bool = False,
                    name: str = "the policy") -> bool:
    """Whether ``model`` gives the same outputs packed as padded (`rlhf_dist.rl.packing`) on two rows of other lengths
    (prompts of 3 and 6 tokens, responses of 5 and 2): log-probabilities of a causal LM, per-position scores of a
    one-label classifier (``classifier``). An attention that let the packed sequences see each other would not."""
    generator = torch.Generator().manual_seed(0)
    high = max(min(vocab_size, 200), 4)

    def draw(n: int) -> list[int]:
        return torch.randint(3, high, (n,), generator=generator).tolist()

    q_ids, q_mask = left_pad([draw(3), draw(6)], 0, device)
    r_ids = torch.tensor([draw(5), draw(2) + [0] * 3], device=device)
    r_mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3], device=device)
    with eval_mode(model):
        if classifier:
            padded, packed = (token_values(model, q_ids, q_mask, r_ids, r_mask, packed=p) for p in (None, Packing()))
        else:
            padded, packed = (forward_logprobs(model, q_ids, q_mask, r_ids, r_mask, temperature, packed=p)
                              for p in (None, Packing()))
    sixteen_bit = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    gap = float((padded - packed).abs().max())
    if gap <= (0.1 if sixteen_bit else 1e-3):
        return True
    log.warning("training.padding_free: %s's attention does not keep packed sequences apart (packed and padded "
                "outputs differ by %.3g); its forwards stay padded", name, gap)
    return False


# ---------------------------------------------------------------------------------------------
# Reward and value models (sequence classifiers with one label)
# ---------------------------------------------------------------------------------------------

def _score_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(backbone, head)`` of a one-label ``*ForSequenceClassification`` model (PEFT unwrapped)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(inner).__name__
    prefix = getattr(inner, "base_model_prefix", None)
    backbone = getattr(inner, prefix, None) if prefix else None
    if backbone is None:
        raise ValueError(f"{name} has no backbone at `base_model_prefix`; expected a transformers "
                         "*ForSequenceClassification model (unwrap DDP/DeepSpeed wrappers first)")
    head = getattr(inner, "score", None)
    if head is None:
        head = getattr(inner, "classifier", None)
    if head is None:
        raise ValueError(f"{name} has neither a `score` nor a `classifier` head; reward and value models must be "
                         "*ForSequenceClassification models (AutoModelForSequenceClassification, num_labels=1)")
    num_labels = getattr(inner.config, "num_labels", None)
    if num_labels != 1:
        raise ValueError(f"{name} has config.num_labels={num_labels}; a reward or value model needs num_labels=1 "
                         "(load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1))")
    return backbone, head


def forward_token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score head of a one-label sequence classifier applied at EVERY position: [B, L].

    ``model(...).logits`` reads the score at one position only (the last non-pad token); here the
    backbone (``getattr(model, model.base_model_prefix)``) runs once with position ids from the
    mask and the head (``model.score``, else ``model.classifier``) is applied to every hidden
    state, giving the reward or value model's score of every prefix. Values at padded positions
    are meaningless; `sequence_scores` and `token_values` pick the valid ones. The head must act
    per position (a Linear, as in decoder-only classifiers).

    Calls submodules directly, so a DDP-wrapped model must be unwrapped (wrap policy and value
    model in one module if the value model trains under DDP); PEFT models work (their LoRA layers
    live inside the backbone; use ``disable_adapter()`` as usual). Raises ValueError naming the class
    if there is no score head or ``config.num_labels != 1``. Returns float32.
    """
    backbone, head = _score_head(model)
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "differ in shape")
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return head(hidden).squeeze(-1).float()


def packed_token_scores(model: nn.Module, p, positions: torch.Tensor) -> torch.Tensor:
    """`forward_token_scores` on a packed row (`rlhf_dist.rl.packing`), bin by bin, the head only at ``positions``:
    [len(positions)]."""
    backbone, head = _score_head(model)

    def run(input_ids, position_ids, local):
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return head(hidden[0, local]).squeeze(-1).float()

    return p.forward_bins(positions, run)[0]


def sequence_scores(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                    response_mask: torch.Tensor, packed: Packing | None = None) -> torch.Tensor:
    """Reward-model score of prompt + truncated response: [B] (docs/ppo.md items 3 and 6).

    The per-token score (`forward_token_scores`) at the last valid token of query + response,
    found from the masks (not from ``ids != pad_id``, item 2). Equals ``model(ids).logits[:, 0]``
    for an unpadded sequence. For a reward model with another tokenizer, build the inputs with
    `decode_pairs` and `retokenize`, and pass them as the query with an empty response. ``packed``: padding-free
    passes in the `Packing`'s bins (`rlhf_dist.rl.packing`; None: padded).
    """
    if packed:
        p = pack(query_ids, query_mask, response_ids, response_mask, packed.capacity)
        return packed_token_scores(model, p, p.ends)
    ids, mask = concat_query_response(query_ids, query_mask, response_ids, response_mask)
    scores = forward_token_scores(model, ids, mask)
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    return scores.gather(1, last[:, None]).squeeze(1)


def token_values(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor, packed: Packing | None = None) -> torch.Tensor:
    """Value estimates V(s_t) for the response tokens: [B, T], aligned with `forward_logprobs`.

    ``V[:, t]`` is the value model's score at the position that predicts response token ``t``
    (position ``Lq - 1 + t``), i.e. of the state before emitting token ``t``: the prompt alone for
    ``t = 0``. 0 where ``response_mask`` is False (docs/ppo.md item 4). Grad flows if enabled. ``packed``: as in
    `sequence_scores`.
    """
    if packed:
        p = pack(query_ids, query_mask, response_ids, response_mask, packed.capacity)
        return p.unpack(packed_token_scores(model, p, p.keep))
    ids, mask = concat_query_response(query_ids, query_mask, response_ids, response_mask)
    T = response_ids.shape[1]
    scores = forward_token_scores(model, ids, mask)
    values = scores[:, -(T + 1):-1]
    return torch.where(response_mask.bool(), values, 0.0)


# ---------------------------------------------------------------------------------------------
# A reward model with another tokenizer: decode, re-encode
# ---------------------------------------------------------------------------------------------

def decode_pairs(tokenizer: Any, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor, *, skip_special_tokens: bool = True) -> tuple[list[str], list[str]]:
    """Decode each (prompt, response) pair to text, reading only the tokens the masks mark valid.

    With ``skip_special_tokens=True`` (the default) BOS, EOS and other special tokens are left out:
    plain text for a reward model whose tokenizer adds its own (see `retokenize`'s ``append_eos``).
    With False the text keeps them verbatim (e.g. chat markers), for a reward tokenizer that knows
    the same special tokens. No clean-up of spaces, so the text re-encodes to the same tokens.
    """
    prompts, responses = [], []
    q_valid, r_valid = query_mask.bool().cpu(), response_mask.bool().cpu()
    q_ids, r_ids = query_ids.cpu(), response_ids.cpu()
    for b in range(q_ids.shape[0]):
        for ids, valid, out in ((q_ids[b], q_valid[b], prompts), (r_ids[b], r_valid[b], responses)):
            out.append(tokenizer.decode(ids[valid].tolist(), skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False))
    return prompts, responses


def retokenize(texts_prompt: Sequence[str], texts_response: Sequence[str], tokenizer: Any, max_length: int | None, *,
               append_eos: Sequence[bool] | torch.Tensor | None = None, add_special_tokens: bool = True,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompt + response texts with a reward model's own tokenizer: left-padded ``(ids, mask)`` [B, L].

    For a reward model whose tokenizer differs from the policy's: decode the rollout with
    `decode_pairs`, re-encode here, then score with ``sequence_scores(rm, ids, mask, empty, empty)``
    (an empty [B, 0] response) or ``forward_token_scores``. Each row is ``tokenizer(prompt + response)``,
    encoded as one string as the reward stage does, with the tokenizer's own special tokens
    (BOS) when ``add_special_tokens``. ``append_eos[b]`` adds ``tokenizer.eos_token`` to response b:
    pass the rollout's ``ended`` so that a response that stopped ends in the reward model's EOS,
    as its training texts did (TRL appends EOS to non-conversational preference texts), and a
    truncated one does not. Padding uses ``tokenizer.pad_token_id`` (mask from lengths, not ids).

    ``max_length`` (None = no limit) keeps the LAST ``max_length`` tokens of a longer row: the
    score is read at the last token, so the end of the response must survive.
    """
    if len(texts_prompt) != len(texts_response):
        raise ValueError(f"{len(texts_prompt)} prompts but {len(texts_response)} responses")
    if append_eos is not None:
        append_eos = [bool(e) for e in (append_eos.tolist() if isinstance(append_eos, torch.Tensor) else append_eos)]
        if len(append_eos) != len(texts_response):
            raise ValueError(f"append_eos has {len(append_eos)} entries for {len(texts_response)} responses")
        if any(append_eos) and tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has no eos_token to append; set tokenizer.eos_token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id  # safe: the mask, not the ids, marks valid tokens
    if pad_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither pad_token_id nor eos_token_id to pad with")
    texts = [p + r + (tokenizer.eos_token if append_eos and append_eos[i] else "")
             for i, (p, r) in enumerate(zip(texts_prompt, texts_response))]
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    if max_length is not None:
        encoded = [ids[-max_length:] for ids in encoded]
    return left_pad(encoded, pad_id, device=device)


# ---------------------------------------------------------------------------------------------
# One score per response: a reward model (any tokenizer) or a reward function
# ---------------------------------------------------------------------------------------------

@dataclass
class RewardSource:
    """Where scores come from: a reward model (with its own tokenizer, or None = the policy's), a function, or a
    composite of functions and/or the reward model (`rlhf_dist.rewards.Composite`, ppo.rewards)."""

    model: nn.Module | None = None
    tokenizer: Any = None
    max_length: int | None = None
    fn: Callable | None = None
    fn_name: str = "reward_fn"
    composite: Any = None
    packed: Packing | None = None  # the reward model's forwards padding-free (training.padding_free, once checked)

    @property
    def labels(self) -> list[str]:
        """The composite's components, in order (what `score_responses` returns a column for); none otherwise."""
        return [c.label for c in self.composite.components] if self.composite is not None else []


def model_scores(reward: RewardSource, tokenizer: Any, query_ids: torch.Tensor, query_mask: torch.Tensor,
                 response_ids: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """[B] reward-model scores of prompt + truncated response. With the policy's tokenizer the model scores the very
    tokens the policy produced; with its own it gets the decoded text, re-encoded (`retokenize`, EOS where the
    response ended)."""
    if reward.tokenizer is None:
        packed = packing_for(reward.packed, reward.model, query_mask, response_mask)
        return sequence_scores(reward.model, query_ids, query_mask, response_ids, response_mask, packed)
    prompts, completions = decode_pairs(tokenizer, query_ids, query_mask, response_ids, response_mask)
    ids, mask = retokenize(prompts, completions, reward.tokenizer, reward.max_length, append_eos=ended,
                           device=query_ids.device)
    empty = ids.new_zeros((ids.shape[0], 0))
    return sequence_scores(reward.model, ids, mask, empty, empty.bool(),
                           packing_for(reward.packed, reward.model, mask, empty))


def score_responses(reward: RewardSource, tokenizer: Any, query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor,
                    columns: dict[str, list] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scores [B], components [B, C] or None) of prompt + truncated response (docs/ppo.md item 3).

    ``tokenizer`` is the policy's. A reward model scores as `model_scores`; a function gets the decoded prompts and
    completions; a composite sums its components with their weights (the reward model's among them) and also returns
    each component's own scores, in the order of `RewardSource.labels`. ``columns``: the prompt rows' other columns
    (one value per response) for functions that read them."""
    if reward.fn is None and reward.composite is None:
        return model_scores(reward, tokenizer, query_ids, query_mask, response_ids, response_mask, ended), None
    prompts, completions = decode_pairs(tokenizer, query_ids, query_mask, response_ids, response_mask)
    if reward.fn is not None:
        values = call_reward_fn(reward.fn, prompts, completions, reward.fn_name, columns)
        return torch.tensor(values, dtype=torch.float32, device=query_ids.device), None
    from_model = None
    if reward.composite.needs_model:
        from_model = model_scores(reward, tokenizer, query_ids, query_mask, response_ids, response_mask, ended).tolist()
    out = reward.composite(prompts, completions, columns, from_model)
    components = torch.tensor([out.components[label] for label in reward.labels], dtype=torch.float32).T
    return torch.tensor(out.total, dtype=torch.float32, device=query_ids.device), components.to(query_ids.device)
