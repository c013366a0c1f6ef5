"""Sampling responses for PPO: left-padded queries in, responses cut at their first stop token out.

    query_ids, query_mask = left_pad(prompt_token_lists, pad_id, device)                # docs/ppo.md item 1
    out = generate(policy, query_ids, query_mask, max_new_tokens=..., temperature=...,
                   stop_ids=stop_token_ids(tokenizer, [], False), pad_id=pad_id,
                   generator_seed=seed, record_logprobs=True)                          # items 3, 14, 16, 21, 22
    out.response_ids, out.response_mask, out.ended, out.logprobs, out.entropy           # one typed `Generation`

Conventions (docs/ppo.md items 1-4): queries are LEFT-padded ([B, Lq], every row's last column a real token, so
all rows start generating at the same column); responses are RIGHT-padded after truncation at their first stop
token ([B, T], generated tokens only, with a bool mask); valid tokens are known from the masks only, never from
``ids != pad_id`` (the pad token may be the EOS token); position ids are ``cumsum(mask) - 1`` clamped at 0, the
rule ``generate`` uses, so a sequence's outputs do not depend on its padding or its batch-mates. Scoring the
sampled responses (log-probabilities, values, reward scores): `rlhf_dist.rl.scoring`.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from rlhf_dist.rl.rewards import first_stop_truncate


@dataclass
class Generation:
    """Sampled responses, truncated at their first stop token: what `generate` returns, whatever it is asked to record."""

    response_ids: torch.Tensor
    """[B, T] long: generated tokens only; ``pad_id`` after each response's end."""
    response_mask: torch.Tensor
    """[B, T] bool: True on kept tokens (up to and including the first stop token)."""
    lengths: torch.Tensor
    """[B] long: kept tokens per row (``response_mask.sum(1)``)."""
    ended: torch.Tensor
    """[B] bool: the response contains a stop token; False = it ran to ``max_new_tokens`` (item 5)."""
    logprobs: torch.Tensor | None = None
    """[B, T] float32 with ``record_logprobs``: log softmax(logits / temperature) of each kept token, else None."""
    entropy: torch.Tensor | None = None
    """[B, T] float32 with ``record_logprobs``: the entropy of that distribution, else None."""
    hidden: torch.Tensor | None = None
    """[B, T, H] float32 with ``record_hidden``: the policy's last hidden state predicting each token, else None."""


def stop_token_ids(tokenizer, stop_tokens: list[str], ignore_eos: bool = False) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS (unless ``ignore_eos``) and ``stop_tokens``."""
    ids = [] if tokenizer.eos_token_id is None or ignore_eos else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab()
    for token in stop_tokens:
        if token not in vocab:
            raise ValueError(f"ppo.training.stop_tokens: '{token}' is not a single token of the policy's tokenizer")
        ids.append(int(vocab[token]))
    return sorted(set(ids))


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


def peft_inner(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose forward passes keyword arguments on), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config_of(model: nn.Module):
    """The (PEFT-unwrapped) model's language-model config: the text part of a composite config, else its config."""
    config = peft_inner(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether the (PEFT-unwrapped) model's ``forward`` takes the keyword ``name`` (``logits_to_keep``, ``cache``)."""
    try:
        return name in inspect.signature(peft_inner(model).forward).parameters
    except (TypeError, ValueError):
        return False


def concat_query_response(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
            response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of query + response, [B, Lq + T]; the mask as long."""
    check_left_padded(query_mask)
    if query_ids.shape != query_mask.shape:
        raise ValueError(f"query_ids {tuple(query_ids.shape)} and query_mask {tuple(query_mask.shape)} differ in shape")
    if response_ids.shape != response_mask.shape or response_ids.shape[0] != query_ids.shape[0]:
        raise ValueError(f"response_ids {tuple(response_ids.shape)} and response_mask {tuple(response_mask.shape)} "
                         f"must both be [B, T] with B = {query_ids.shape[0]} (the queries' batch size)")
    ids = torch.cat([query_ids, response_ids.to(query_ids.dtype)], dim=1)
    mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    return ids, mask


def check_left_padded(query_mask: torch.Tensor) -> None:
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


def check_generation_config(policy: nn.Module, generate_kwargs: dict[str, Any]) -> None:
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
             generator_seed: int | None = None, record_logprobs: bool = False, record_hidden: bool = False,
             **generate_kwargs: Any) -> Generation:
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
        record_logprobs: also record ``logprobs`` and ``entropy`` [B, T] float32 of every kept token under
            ``softmax(logits / temperature)``, recorded during generation (`_LogprobRecorder`): the
            policy's rollout log-probabilities without a second forward pass. They equal
            `forward_logprobs` up to floating-point differences between the cached one-token steps
            and a full forward (about 1e-6 in float32; more in 16-bit), so the first ratio is ~1,
            not exactly 1. Both are 0 after each response's end.
        record_hidden: with ``record_logprobs``, also record ``hidden``: the policy's final hidden state [B, T, H] at the
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
        a `Generation` on the policy's device: ``response_ids`` [B, T], ``response_mask`` [B, T] bool, ``lengths`` [B],
        ``ended`` [B], with ``T = lengths.max() <= max_new_tokens`` (trailing all-padding columns dropped); its
        ``logprobs``/``entropy`` and ``hidden`` are set only when recorded (else None).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    check_left_padded(query_mask)
    check_generation_config(policy, generate_kwargs)
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
    if record_logprobs:
        from transformers import LogitsProcessorList

        recorder = _LogprobRecorder(temperature)
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), recorder])
    hidden: list[torch.Tensor] = []
    hook = None
    if record_hidden:
        if recorder is None:
            raise ValueError("record_hidden needs record_logprobs")
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
    out = Generation(response_ids, response_mask, lengths, ended)
    if recorder is None:
        return out
    logprobs, entropy = recorder.finish(generated[:, -1])
    if logprobs.shape[1] != generated.shape[1]:
        raise RuntimeError(f"recorded {logprobs.shape[1]} steps for {generated.shape[1]} generated tokens")
    out.logprobs = torch.where(response_mask, logprobs[:, :width], 0.0)
    out.entropy = torch.where(response_mask, entropy[:, :width], 0.0)
    if record_hidden:
        if len(hidden) < width:  # (under synced_gpus a finished rank keeps stepping: extra calls come last)
            raise RuntimeError(f"captured {len(hidden)} hidden states for {width} response tokens")
        out.hidden = torch.where(response_mask[..., None], torch.stack(hidden[:width], dim=1), 0.0)
    return out
