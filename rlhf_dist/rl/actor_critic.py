"""The trainable half of PPO as ONE module: the policy, and the value model or a value head on it.

DDP and DeepSpeed synchronise gradients through the wrapped module's ``forward``; calling a
sub-model directly would bypass them. So the policy and the value function live in one
`ActorCritic` whose ``forward`` returns everything the update needs from one call::

    logprobs, entropy, values = actor_critic(query_ids, query_mask, response_ids, response_mask)

The same call (without grad) also produces the rollout's ``old_logprobs`` and ``old_values``, so the
rollout and training forwards are one function and the first minibatch's ratio is exactly 1
(docs/ppo.md item 14).

Two value functions (item 18):

* ``value_model``: a separate one-label ``*ForSequenceClassification`` initialised from the reward
  model (the default), scored at every position by `rollout.token_values`;
* ``value_head``: a `ValueHead` (a linear layer) on the policy's last hidden state, sharing the
  policy's forward pass (less memory and compute; the value loss then also shapes the policy's trunk);
* ``value_head`` with ``value_adapter``: the head reads the last hidden state of a second pass through
  the policy's (LoRA) base with the value function's own adapter (`rlhf_dist.rl.adapters`): one base
  for policy, value and reference, and the value loss does not touch the policy's weights.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from rlhf_dist.rl.adapters import POLICY, use_adapter
from rlhf_dist.rl.generation import concat_query_response, position_ids_from_mask, text_config_of
from rlhf_dist.rl.losses import entropy_from_logits, logprobs_from_logits
from rlhf_dist.rl.packing import Packing, causal_lm_outputs, pack, packing_for
from rlhf_dist.rl.scoring import accepts_logits_to_keep, token_values


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` on the policy's final hidden state ``h_t`` ([B, T, H] -> [B, T]).

    Initialised with a small normal (std ``1 / sqrt(H + 1)``, lm-human-preferences) and zero bias,
    kept in float32 whatever the policy's dtype.
    """

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.summary.weight.copy_(torch.randn(1, hidden_size, generator=generator) / (hidden_size + 1) ** 0.5)
            self.summary.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 unless DeepSpeed cast the whole model to 16 bit; the values come back as float32
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def _quant_state_key(key: str, frozen: set[str]) -> bool:
    """bitsandbytes stores a 4-bit weight's constants next to it (`...weight.absmax`, `...weight.quant_map`, ...)."""
    head, sep, _ = key.partition(".weight.")
    return bool(sep) and head + ".weight" in frozen


def hidden_size_of(model: nn.Module) -> int:
    return int(text_config_of(model).hidden_size)


class ActorCritic(nn.Module):
    """Policy + value function; ``forward`` -> ``(logprobs, entropy, values)``, each [B, T].

    Args:
        policy: a ``*ForCausalLM`` (or PEFT) model.
        temperature: the sampling temperature; every log-probability divides the logits by it (item 13).
        value_model: a one-label sequence classifier, or None.
        value_head: a `ValueHead`, or None. At most one of the two; neither = no value function
            (the critic-free RLOO/GRPO estimators), and ``values`` is None.
        value_adapter: with ``value_head`` on a PEFT policy: the name of the adapter the value pass uses
            (the policy pass then uses the adapter `adapters.POLICY`).
    """

    def __init__(self, policy: nn.Module, temperature: float, value_model: nn.Module | None = None,
                 value_head: ValueHead | None = None, value_adapter: str | None = None):
        super().__init__()
        if value_model is not None and value_head is not None:
            raise ValueError("ActorCritic takes a value_model or a value_head, not both")
        if value_adapter is not None and (value_head is None or not hasattr(policy, "peft_config")):
            raise ValueError("value_adapter needs a value_head and a PEFT policy")
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head
        self.value_adapter = value_adapter
        self.temperature = float(temperature)
        # the policy's pass padding-free (training.padding_free, once `packing_matches` says so), and the value model's
        self.packed: Packing | None = None
        self.packed_values: Packing | None = None

    def state_dict(self, *args, **kwargs):
        """With a PEFT policy, only what trains (adapters, value head, value model): the frozen base -- 4-bit weights
        that would not load back, gigabytes per checkpoint -- is loaded from the stage's model again on resume."""
        state = super().state_dict(*args, **kwargs)
        if not hasattr(self.policy, "peft_config"):
            return state
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        frozen = {prefix + name for name, p in self.policy.named_parameters(prefix="policy") if not p.requires_grad}
        return type(state)((k, v) for k, v in state.items() if k not in frozen and not _quant_state_key(k, frozen))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not hasattr(self.policy, "peft_config"):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = {name for name, p in self.policy.named_parameters(prefix="policy") if not p.requires_grad}
        missing = [k for k in result.missing_keys if k not in frozen and not _quant_state_key(k, frozen)]
        if missing or result.unexpected_keys:  # checked whatever `strict` says: callers pass strict=False for the base
            raise RuntimeError(f"ActorCritic checkpoint: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        return result

    @property
    def has_value(self) -> bool:
        return self.value_model is not None or self.value_head is not None

    @property
    def values_need_policy_pass(self) -> bool:
        """A value head on the policy's own pass: the values come only with the policy's forward."""
        return self.value_head is not None and self.value_adapter is None

    def values(self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
               response_mask: torch.Tensor) -> torch.Tensor | None:
        """The values alone ([B, T], as `forward` returns them), without the policy's vocabulary logits.

        For a rollout whose log-probabilities came from generation. None without a value function;
        a value head on the policy's own pass needs `forward` (`values_need_policy_pass`).
        """
        if self.values_need_policy_pass:
            raise ValueError("the value head reads the policy's own pass: call forward()")
        if self.value_model is not None:
            return token_values(self.value_model, query_ids, query_mask, response_ids, response_mask,
                                packed=packing_for(self.packed_values, self.value_model, query_mask, response_mask))
        if self.value_adapter is None:
            return None
        packing = packing_for(self.packed, self.policy, query_mask, response_mask)
        if packing:
            return self._values(pack(query_ids, query_mask, response_ids, response_mask, packing.capacity),
                                query_ids, query_mask, response_ids, response_mask)
        ids, mask = concat_query_response(query_ids, query_mask, response_ids, response_mask)
        return self._adapter_values(ids, mask, position_ids_from_mask(mask), response_mask)

    def _adapter_values(self, ids, mask, position_ids, response_mask) -> torch.Tensor:
        """The value adapter's pass through the base's body (no vocabulary logits) and the head."""
        T = response_mask.shape[1]
        inner = self.policy.get_base_model()
        backbone = getattr(inner, inner.base_model_prefix)
        with use_adapter(self.policy, self.value_adapter):
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state[:, -(T + 1):-1]
        return torch.where(response_mask.bool(), self.value_head(hidden), 0.0)

    def forward(self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                response_mask: torch.Tensor, with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probabilities and entropy of the response under the policy, and the values (item 4: 0 at padding).

        ``with_values=False`` skips a value function that has its own pass (values None); see `values`.

        Shapes: queries [B, Lq] left-padded, responses [B, T] right-padded; outputs [B, T]
        float32, aligned as in `rollout.forward_logprobs` / `rollout.token_values`.
        """
        packing = packing_for(self.packed, self.policy, query_mask, response_mask)
        if packing:
            return self._packed_forward(query_ids, query_mask, response_ids, response_mask, with_values, packing)
        ids, mask = concat_query_response(query_ids, query_mask, response_ids, response_mask)
        T = response_ids.shape[1]
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                  "position_ids": position_ids_from_mask(mask), "use_cache": False}
        shared_pass = self.value_head is not None and self.value_adapter is None
        if shared_pass:
            kwargs["output_hidden_states"] = True
        elif accepts_logits_to_keep(self.policy):
            kwargs["logits_to_keep"] = T + 1  # no [B, Lq, V] logits for the prompt
        if self.value_adapter is not None:
            with use_adapter(self.policy, POLICY):
                out = self.policy(**kwargs)
        else:
            out = self.policy(**kwargs)
        logits = out.logits[:, -(T + 1):-1].float() / self.temperature  # position Lq-1+t predicts token t
        valid = response_mask.bool()
        logprobs = torch.where(valid, logprobs_from_logits(logits, response_ids), 0.0)
        entropy = torch.where(valid, entropy_from_logits(logits), 0.0)
        values = None
        if not with_values and not self.values_need_policy_pass:
            return logprobs, entropy, None
        if self.value_adapter is not None:  # the backbone only: no vocabulary logits for the value pass
            values = self._adapter_values(ids, mask, kwargs["position_ids"], response_mask)
        elif self.value_head is not None:
            hidden = out.hidden_states[-1][:, -(T + 1):-1]
            values = torch.where(valid, self.value_head(hidden), 0.0)
        elif self.value_model is not None:
            values = token_values(self.value_model, query_ids, query_mask, response_ids, response_mask)
        return logprobs, entropy, values

    def _packed_forward(self, query_ids, query_mask, response_ids, response_mask, with_values: bool, packing):
        """`forward` with the policy's (and a value adapter's) pass padding-free (`rlhf_dist.rl.packing`); a value
        model's too where `packed_values`."""
        p = pack(query_ids, query_mask, response_ids, response_mask, packing.capacity)
        shared = self.values_need_policy_pass
        with use_adapter(self.policy, POLICY) if self.value_adapter is not None else contextlib.nullcontext():
            logits, hidden = causal_lm_outputs(self.policy, p, accepts_logits_to_keep(self.policy), hidden=shared)
        logits = logits.float() / self.temperature
        logprobs, entropy = p.unpack(logprobs_from_logits(logits, p.targets)), p.unpack(entropy_from_logits(logits))
        if shared:
            return logprobs, entropy, p.unpack(self.value_head(hidden))
        if not with_values or not self.has_value:
            return logprobs, entropy, None
        return logprobs, entropy, self._values(p, query_ids, query_mask, response_ids, response_mask)

    def _values(self, p, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        """A value function with a pass of its own: the value model, or the value adapter's pass (packed)."""
        if self.value_model is not None:
            return token_values(self.value_model, query_ids, query_mask, response_ids, response_mask,
                                packed=packing_for(self.packed_values, self.value_model, query_mask, response_mask))
        inner = self.policy.get_base_model()
        backbone = getattr(inner, inner.base_model_prefix)

        def run(input_ids, position_ids, keep):
            hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            return self.value_head(hidden[0, keep])

        with use_adapter(self.policy, self.value_adapter):
            return p.unpack(p.forward_bins(p.keep, run)[0])
