"""Model-level rollout helpers for PPO: sample responses, then score them with the four models.

The PPO loop's first phases, one helper each::

    query_ids, query_mask = left_pad(prompt_token_lists, pad_id, device)                 # item 1
    rollout = generate(policy, query_ids, query_mask, max_new_tokens=..., temperature=...,
                       stop_ids=[eos_id], pad_id=pad_id, generator_seed=seed + rank)    # items 3, 14, 16, 21, 22
    logprobs = forward_logprobs(policy, query_ids, query_mask, rollout.response_ids,
                                rollout.response_mask, temperature)                      # items 13, 14
    with policy.disable_adapter():                                                     # or a separate reference
        ref_logprobs = forward_logprobs(policy, ...)
    values = token_values(value_model, query_ids, query_mask, rollout.response_ids, rollout.response_mask)
    scores = sequence_scores(reward_model, query_ids, query_mask, rollout.response_ids, rollout.response_mask)  # item 6

Shapes and conventions (docs/ppo.md items 1-4):

* Queries are LEFT-padded: ``query_ids``/``query_mask`` [B, Lq], every row's last column is a real
  token, so all rows start generating at the same column.
* Responses are RIGHT-padded after truncation at their first stop token: ``response_ids`` [B, T]
  (generated tokens only), ``response_mask`` [B, T] bool.
* Valid tokens are known from the masks only, never from ``ids != pad_id`` (the pad token may be
  the EOS token, item 2).
* Position ids are ``cumsum(mask) - 1`` clamped at 0, the rule ``generate`` uses, so a sequence's
  outputs do not depend on how much padding it has or on its batch-mates. Padding invariance
  holds for both ``"eager"`` and ``"sdpa"`` attention (tested); the causal + padding mask keeps
  padded keys out of every valid position.
* Per-token outputs ([B, T]) are aligned with ``response_ids``: entry ``t`` belongs to the model
  position that PREDICTS response token ``t`` (the last query token for ``t = 0``), and is 0 where
  ``response_mask`` is False.
* Every tensor lives on the model's device; pass tensors already there.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from rlhf_dist.rl.losses import entropy_from_logits, logprobs_from_logits
from rlhf_dist.rl.rewards import first_stop_truncate


class Rollout(NamedTuple):
    """Sampled responses, truncated at their first stop token (output of `generate`)."""

    response_ids: torch.Tensor
    """[B, T] long: generated tokens only; ``pad_id`` after each response's end."""
    response_mask: torch.Tensor
    """[B, T] bool: True on kept tokens (up to and including the first stop token)."""
    lengths: torch.Tensor
    """[B] long: kept tokens per row (``response_mask.sum(1)``)."""
    ended: torch.Tensor
    """[B] bool: the response contains a stop token; False = it ran to ``max_new_tokens`` (item 5)."""


# ---------------------------------------------------------------------------------------------
# Padding, positions, model modes
# ---------------------------------------------------------------------------------------------

def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into a left-padded batch (docs/ppo.md item 1).

    Returns ``(input_ids, attention_mask)``, both LongTensor [B, L] with L the longest sequence;
    row ``b`` is ``[pad_id] * (L - len_b) + sequences[b]`` and its mask ``[0] * (L - len_b) + [1] * len_b``.
    Every sequence needs at least one token (a response is predicted from the last prompt token).
    """
    if len(sequences) == 0:
        raise ValueError("left_pad got no sequences; a batch needs at least one")
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"sequence {i} is empty; every prompt needs at least one token "
                             "(e.g. BOS) to generate or score a response from")
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, length - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, length - len(seq):] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: position 0 at each row's first valid token, whatever padding precedes it."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def _check_left_padded(query_mask: torch.Tensor) -> None:
    if query_mask.dim() != 2:
        raise ValueError(f"query_mask must be [B, Lq], got shape {tuple(query_mask.shape)}")
    if query_mask.shape[1] == 0 or not bool(query_mask[:, -1].bool().all()):
        raise ValueError("queries must be left-padded, with a real token in the last column of every row "
                         "(docs/ppo.md item 1); build them with rollout.left_pad")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn every dropout of ``model`` off for good, in train mode too (docs/ppo.md item 16).

    Sets ``p = 0`` on every ``nn.Dropout``-family module (LoRA dropout included), and 0.0 on every
    float attribute whose name ends in ``dropout``, both in the model's config(s) (``attention_dropout``,
    ``hidden_dropout``, ...) and on modules: attention layers copy the config value at
    construction (``LlamaAttention.attention_dropout``), so changing the config alone is not enough.
    Call it once on the policy, reference, reward and value models before training: then the
    rollout forward and the training forward compute the same function and the first ratio is 1.
    Returns ``model``.
    """
    configs = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict") and hasattr(config, "__dict__") and all(config is not c for c in configs):
            configs.append(config)
    for config in configs:
        subconfigs = [config]
        if hasattr(config, "get_text_config"):
            text_config = config.get_text_config()
            if text_config is not config:
                subconfigs.append(text_config)
        for cfg in subconfigs:
            for name, value in list(vars(cfg).items()):
                if name.endswith("dropout") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(cfg, name, 0.0)
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards every submodule gets back its own previous mode.

    Restoring per submodule (not ``model.train(was_training)``) keeps modules that were
    deliberately in eval mode (e.g. a frozen part of a train-mode model) as they were.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

class _LogprobRecorder:
    """A logits processor that records, step by step, what `forward_logprobs` would compute afterwards.

    ``generate`` calls it with the raw next-token logits (custom processors run before the temperature
    warper) and the tokens so far. It keeps ``log_softmax(logits / temperature)`` of the previous step only,
    and gathers the log-probability of the token that step sampled when it sees it at the next call (the
    last step's in `finish`). Memory: one [B, V] buffer, not the [B, T, V] of ``output_logits``. Returns
    the logits unchanged: sampling is not affected.
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.previous: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        p = logp.exp()
        self.entropy.append(-(p * torch.where(p > 0, logp, 0)).sum(dim=-1))
        self.previous = logp
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log-probabilities and entropies; ``last_tokens`` [B] = the last step's samples."""
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
            self.previous = None
        return torch.stack(self.logprobs, dim=1), torch.stack(self.entropy, dim=1)


# Explicit neutral values for the generation settings that would change the sampling distribution:
# without them a checkpoint's generation_config.json (repetition_penalty, top_k=50 by default, ...)
# would silently apply, and the rollout would sample from a distribution that `forward_logprobs`
# does not compute (docs/ppo.md item 14).
_NEUTRAL_SAMPLING: dict[str, Any] = {
    "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_new_tokens": 0,
    "encoder_repetition_penalty": 1.0,
}
# Settings that have no neutral value other than None, which `generate` does not let a caller
# impose over the model's generation_config: refuse them there (a caller may still pass them).
_DISTRIBUTION_CHANGING = ("min_p", "top_h", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                          "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
                          "exponential_decay_length_penalty", "watermarking_config")


def _check_generation_config(policy: nn.Module, generate_kwargs: dict[str, Any]) -> None:
    gen_config = getattr(policy, "generation_config", None)
    if gen_config is None:
        return
    bad = [name for name in _DISTRIBUTION_CHANGING
           if getattr(gen_config, name, None) is not None and name not in generate_kwargs]
    guidance = getattr(gen_config, "guidance_scale", None)
    if guidance is not None and guidance != 1 and "guidance_scale" not in generate_kwargs:
        bad.append("guidance_scale")
    if bad:
        raise ValueError(f"the policy's generation_config sets {', '.join(bad)}, which would change the sampling "
                         "distribution so the rollout log-probabilities no longer match forward_logprobs "
                         f"(docs/ppo.md item 14); set policy.generation_config.{bad[0]} = None (and the others)")


def generate(policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float, top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int], pad_id: int,
             generator_seed: int | None = None, return_logprobs: bool = False, return_hidden: bool = False,
             **generate_kwargs: Any) -> Rollout | tuple[Rollout, torch.Tensor, torch.Tensor] | tuple[Rollout, torch.Tensor,
                                                                                              torch.Tensor, torch.Tensor]:
    """Sample one response per query with the KV cache, then cut each at its first stop token.

    Calls ``policy.generate(do_sample=True, temperature, top_k, top_p, max_new_tokens,
    pad_token_id=pad_id, eos_token_id=stop_ids, attention_mask=query_mask)`` in eval mode (dropout
    off; the previous train/eval modes are restored afterwards, docs/ppo.md item 16), then
    `first_stop_truncate` on the generated part (items 2, 3). Other settings that would reshape the
    sampling distribution (repetition penalty, ...) are pinned to neutral values, so that with the
    defaults ``top_k=0, top_p=1`` the tokens are drawn from ``softmax(logits / temperature)``,
    exactly what `forward_logprobs` computes (items 13, 14).

    Args:
        policy: a ``*ForCausalLM`` (or PEFT) model; ``query_ids`` must be on its device.
        query_ids, query_mask: [B, Lq] left-padded queries (`left_pad`); raises if not left-padded.
        max_new_tokens: T_max; responses that never stop have exactly this many tokens.
        temperature: > 0; the same value must be passed to `forward_logprobs`.
        top_k, top_p: 0 and 1.0 disable them (the default, item 14). Anything else samples from a
            truncated distribution that `forward_logprobs` does not reproduce: ratios will not be 1.
        stop_ids: tokens that end a response (EOS, end-of-turn); may be empty (no stopping).
        pad_id: written after each response's end.
        generator_seed: if given, sampling uses ``torch.manual_seed(generator_seed)`` inside a forked
            RNG, so the same seed gives the same rollout and the global RNG state is left untouched.
            Give every data-parallel rank a different seed (e.g. ``seed + rank``, item 22).
        return_logprobs: also return ``(logprobs, entropy)`` [B, T] float32 of every kept token under
            ``softmax(logits / temperature)``, recorded during generation (`_LogprobRecorder`): the
            policy's rollout log-probabilities without a second forward pass. They equal
            `forward_logprobs` up to floating-point differences between the cached one-token steps
            and a full forward (about 1e-6 in float32; more in 16-bit), so the first ratio is ~1,
            not exactly 1. Both are 0 after each response's end.
        return_hidden: with ``return_logprobs``, also the policy's final hidden state [B, T, H] at the
            position that predicts each response token (the vocabulary head's input, captured by a
            pre-hook on ``get_output_embeddings()``): what a value head on the policy reads, so its
            rollout values need no forward pass either. 0 after each response's end.
        **generate_kwargs: passed to ``policy.generate`` and override the above. Under DeepSpeed
            ZeRO-3 (sharded parameters) pass ``synced_gpus=True`` (item 21): every rank then keeps
            stepping (gathering each layer's parameters) until all ranks have finished, so no rank
            waits forever in a collective. transformers also switches it on when it detects ZeRO-3
            or FSDP with more than one process, but say so explicitly rather than rely on detection.
            The alternative, gathering all parameters once around the call
            (``deepspeed.zero.GatheredParameters``), is faster but needs the full model in memory.
    Returns:
        `Rollout` ``(response_ids [B, T], response_mask [B, T] bool, lengths [B], ended [B])`` on the
        policy's device, with ``T = lengths.max() <= max_new_tokens`` (trailing all-padding columns dropped);
        with ``return_logprobs``, ``(rollout, logprobs, entropy)``, and ``hidden`` last with ``return_hidden``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    _check_left_padded(query_mask)
    _check_generation_config(policy, generate_kwargs)
    stop_ids = [int(s) for s in stop_ids]
    kwargs: dict[str, Any] = {
        **_NEUTRAL_SAMPLING,
        "do_sample": True, "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p),
        "max_new_tokens": int(max_new_tokens), "pad_token_id": int(pad_id),
        "eos_token_id": stop_ids or None,  # None (not the model's EOS): no stopping at all
        "use_cache": True,
        **generate_kwargs,
    }
    device = query_ids.device
    on_accelerator = device.type != "cpu"
    fork = torch.random.fork_rng(devices=[device] if on_accelerator else [], enabled=generator_seed is not None,
                                 device_type=device.type if on_accelerator else "cuda")
    recorder = None
    if return_logprobs:
        from transformers import LogitsProcessorList

        recorder = _LogprobRecorder(temperature)
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), recorder])
    hidden: list[torch.Tensor] = []
    hook = None
    if return_hidden:
        if recorder is None:
            raise ValueError("return_hidden needs return_logprobs")
        head = policy.get_output_embeddings()  # each call: [B, positions, H]; its last position predicts the next token
        hook = head.register_forward_pre_hook(lambda module, args: hidden.append(args[0][:, -1].float()))
    try:
        with eval_mode(policy), torch.no_grad(), fork:
            if generator_seed is not None:
                torch.manual_seed(generator_seed)
            sequences = policy.generate(input_ids=query_ids, attention_mask=query_mask, **kwargs)
    finally:
        if hook is not None:
            hook.remove()
    if not isinstance(sequences, torch.Tensor):  # return_dict_in_generate=True was passed through
        sequences = sequences.sequences
    generated = sequences[:, query_ids.shape[1]:]
    response_ids, response_mask, lengths, ended = first_stop_truncate(generated, stop_ids, pad_id)
    width = int(lengths.max())  # >= 1: every row has at least one generated token
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
    if recorder is None:
        return Rollout(response_ids, response_mask, lengths, ended)
    logprobs, entropy = recorder.finish(generated[:, -1])
    if logprobs.shape[1] != generated.shape[1]:
        raise RuntimeError(f"recorded {logprobs.shape[1]} steps for {generated.shape[1]} generated tokens")
    logprobs = torch.where(response_mask, logprobs[:, :width], 0.0)
    entropy = torch.where(response_mask, entropy[:, :width], 0.0)
    rollout = Rollout(response_ids, response_mask, lengths, ended)
    if not return_hidden:
        return rollout, logprobs, entropy
    if len(hidden) < width:  # (under synced_gpus a finished rank keeps stepping: extra calls come last)
        raise RuntimeError(f"captured {len(hidden)} hidden states for {width} response tokens")
    states = torch.stack(hidden[:width], dim=1)
    return rollout, logprobs, entropy, torch.where(response_mask[..., None], states, 0.0)


# ---------------------------------------------------------------------------------------------
# Log-probabilities (policy, reference)
# ---------------------------------------------------------------------------------------------

def _concat(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
            response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of query + response, [B, Lq + T]; the mask as long."""
    _check_left_padded(query_mask)
    if query_ids.shape != query_mask.shape:
        raise ValueError(f"query_ids {tuple(query_ids.shape)} and query_mask {tuple(query_mask.shape)} differ in shape")
    if response_ids.shape != response_mask.shape or response_ids.shape[0] != query_ids.shape[0]:
        raise ValueError(f"response_ids {tuple(response_ids.shape)} and response_mask {tuple(response_mask.shape)} "
                         f"must both be [B, T] with B = {query_ids.shape[0]} (the queries' batch size)")
    ids = torch.cat([query_ids, response_ids.to(query_ids.dtype)], dim=1)
    mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    return ids, mask


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_logprobs(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                     response_mask: torch.Tensor, temperature: float, *,
                     return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
    Returns:
        logprobs [B, T] float32, 0 where ``response_mask`` is False (item 4); with
        ``return_entropy``, ``(logprobs, entropy)``, the entropy also [B, T] and 0 there.
    """
    ids, mask = _concat(query_ids, query_mask, response_ids, response_mask)
    T = response_ids.shape[1]
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
                              "use_cache": False}
    if _accepts_logits_to_keep(model):
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


def sequence_scores(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score of prompt + truncated response: [B] (docs/ppo.md items 3 and 6).

    The per-token score (`forward_token_scores`) at the last valid token of query + response,
    found from the masks (not from ``ids != pad_id``, item 2). Equals ``model(ids).logits[:, 0]``
    for an unpadded sequence. For a reward model with another tokenizer, build the inputs with
    `decode_pairs` and `retokenize`, and pass them as the query with an empty response.
    """
    ids, mask = _concat(query_ids, query_mask, response_ids, response_mask)
    scores = forward_token_scores(model, ids, mask)
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    return scores.gather(1, last[:, None]).squeeze(1)


def token_values(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor) -> torch.Tensor:
    """Value estimates V(s_t) for the response tokens: [B, T], aligned with `forward_logprobs`.

    ``V[:, t]`` is the value model's score at the position that predicts response token ``t``
    (position ``Lq - 1 + t``), i.e. of the state before emitting token ``t``: the prompt alone for
    ``t = 0``. 0 where ``response_mask`` is False (docs/ppo.md item 4). Grad flows if enabled.
    """
    ids, mask = _concat(query_ids, query_mask, response_ids, response_mask)
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
