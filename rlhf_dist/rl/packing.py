"""Padding-free forwards (`ppo.training.padding_free`): the real tokens of a padded [B, Lq + T] batch packed into one
row [1, N], positions restarting at 0 for each sequence, no attention mask.

transformers then attends within each sequence only (its mask builder finds the sequences from the position ids that
restart; flash-attention kernels do the same by design), so the linear layers, which are most of a forward's FLOPs,
run on the N real tokens instead of B x (Lq + T) slots. The vocabulary head runs only on the K positions that predict a
response token (``logits_to_keep`` as indices), and the results go back to the [B, T] layout of the padded forward::

    p = pack(query_ids, query_mask, response_ids, response_mask)
    logits = model(input_ids=p.input_ids, position_ids=p.position_ids, logits_to_keep=p.keep).logits[0]   # [K, V]
    logprobs = p.unpack(logprobs_from_logits(logits, p.targets))                                          # [B, T]

An attention implementation that ignored the restarts would let sequences see each other and give other numbers, so
`packing_matches` compares a packed and a padded forward of the model once, before training, and the loop falls back
to padded forwards (with a warning) when they differ (`rlhf_dist.rl.scoring.packing_matches`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_dist.rl.generation import concat_query_response, peft_inner, position_ids_from_mask


@dataclass
class Packed:
    input_ids: torch.Tensor      # [1, N] the real tokens, row after row
    position_ids: torch.Tensor   # [1, N] 0, 1, ... within each row
    keep: torch.Tensor           # [K] packed positions that predict a response token (row after row, t increasing)
    targets: torch.Tensor        # [K] the response token each of them predicts
    valid: torch.Tensor          # [B, T] bool: the response mask (K = valid.sum())
    ends: torch.Tensor           # [B] packed position of each row's last real token

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[K, ...] -> [B, T, ...], 0 where the response mask is False."""
        out = values.new_zeros((*self.valid.shape, *values.shape[1:]))
        out[self.valid] = values
        return out


def pack(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
         response_mask: torch.Tensor) -> Packed:
    """Pack left-padded queries + right-padded responses (joined, and checked, by `concat_query_response`)."""
    ids, mask = concat_query_response(query_ids, query_mask, response_ids, response_mask)
    real = mask.bool()
    packed_index = (real.reshape(-1).cumsum(0) - 1).reshape(real.shape)  # of each real (row, column)
    lq, t = query_ids.shape[1], response_ids.shape[1]
    valid = response_mask.bool()
    predictors = packed_index[:, lq - 1:lq - 1 + t]  # column Lq-1+t predicts response token t
    return Packed(ids[real][None], position_ids_from_mask(mask)[real][None], predictors[valid], response_ids[valid],
                  valid, real.sum(1).cumsum(0) - 1)


def causal_lm_outputs(model: nn.Module, p: Packed, accepts_keep: bool, hidden: bool = False):
    """``(logits [K, V], last hidden state [K, H] or None)`` of a causal LM on the packed row."""
    kwargs = {"input_ids": p.input_ids, "position_ids": p.position_ids, "use_cache": False}
    if hidden:
        kwargs["output_hidden_states"] = True
    if accepts_keep:
        kwargs["logits_to_keep"] = p.keep
    out = model(**kwargs)
    logits = out.logits[0] if accepts_keep else out.logits[0, p.keep]
    states = out.hidden_states[-1][0, p.keep] if hidden else None
    return logits, states


def _text_config(model: nn.Module):
    config = peft_inner(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def packing_pays(model: nn.Module, query_mask: torch.Tensor, response_mask: torch.Tensor) -> bool:
    """Whether one packed row costs fewer FLOPs than the padded batch: always with a variable-length (flash) attention;
    otherwise when ``linear x N + attention x N^2 < linear x B x W + attention x B x W^2`` (N real tokens, B rows of
    width W; ``linear`` = 2 x (4 h^2 + 3 h i) per token and layer, ``attention`` = 4 h per (query, key) pair)."""
    config = _text_config(model)
    if "flash" in str(getattr(config, "_attn_implementation", "") or ""):
        return True
    h = int(getattr(config, "hidden_size", 0) or 0)
    if h == 0:
        return False
    inter = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    linear, attention = 2 * (4 * h * h + 3 * h * inter), 4 * h
    rows, width = query_mask.shape[0], query_mask.shape[1] + response_mask.shape[1]
    n = float(query_mask.sum() + response_mask.sum())
    return linear * n + attention * n * n < linear * rows * width + attention * rows * width * width
