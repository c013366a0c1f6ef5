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

With flash-attention each sequence attends only to itself, whatever the row holds. sdpa and eager compute every
(query, key) pair of the packed row and mask the pairs across sequences: N^2 pairs for N tokens, against the
sum of n_i^2 needed. So under them the packed row is cut into bins of consecutive sequences, each bin a forward of its
own, of at most `Packing.capacity` tokens: the most tokens whose attention per token costs no more than
`ATTENTION_SHARE` of the linear layers' (a sequence longer than that is a bin alone), but at least `MIN_BIN_TOKENS`
(for a narrow model the rule would give forwards of a few dozen tokens, whose fixed per-call cost outweighs the
FLOPs saved). For models of hidden size 512 and up the FLOPs spent on pairs across sequences stay under 5 % of a
forward's (on the 64-wide test model, ~3 % measured), and no slot is padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf_dist.rl.generation import concat_query_response, position_ids_from_mask, text_config_of


@dataclass
class Packed:
    input_ids: torch.Tensor      # [1, N] the real tokens, row after row
    position_ids: torch.Tensor   # [1, N] 0, 1, ... within each row
    keep: torch.Tensor           # [K] packed positions that predict a response token (row after row, t increasing)
    targets: torch.Tensor        # [K] the response token each of them predicts
    valid: torch.Tensor          # [B, T] bool: the response mask (K = valid.sum())
    ends: torch.Tensor           # [B] packed position of each row's last real token
    bins: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) of each forward (whole sequences)

    def forward_bins(self, positions: torch.Tensor, fn) -> tuple[torch.Tensor, ...]:
        """``fn(input_ids [1, n], position_ids [1, n], local positions)`` on each bin, for the ``positions`` (packed
        positions, increasing, e.g. `keep` or `ends`) that fall in it; each of fn's outputs joined over the bins:
        what one forward over the whole row gives at ``positions``."""
        n = self.input_ids.shape[1]
        bins = self.bins or [(0, n)]
        starts = torch.tensor([start for start, _ in bins] + [n], device=positions.device)
        cuts = torch.searchsorted(positions, starts).tolist()
        outs = [fn(self.input_ids[:, a:b], self.position_ids[:, a:b], positions[lo:hi] - a)
                for (a, b), lo, hi in zip(bins, cuts, cuts[1:])]
        outs = [out if isinstance(out, tuple) else (out,) for out in outs]
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[K, ...] -> [B, T, ...], 0 where the response mask is False."""
        out = values.new_zeros((*self.valid.shape, *values.shape[1:]))
        out[self.valid] = values
        return out


ATTENTION_SHARE = 0.05  # a bin's attention per token at most this share of the linear layers' (sdpa / eager)
MIN_BIN_TOKENS = 128  # but bins of at least this many tokens: a smaller forward is mostly its fixed per-call cost


@dataclass(frozen=True)
class Packing:
    """How a model's forwards run padding-free: in bins of at most ``capacity`` tokens (None: one forward for all)."""

    capacity: int | None = None

    @classmethod
    def for_model(cls, model: nn.Module, one_forward: bool = False) -> "Packing":
        """Bins sized by `ATTENTION_SHARE` (at least `MIN_BIN_TOKENS`) under sdpa / eager; one forward with
        flash-attention, or where every process must run the same number of forwards (``one_forward``: ZeRO-3
        across processes)."""
        if one_forward or _flash(model):
            return cls(None)
        linear, attention = _flops(model)
        return cls(max(MIN_BIN_TOKENS, int(ATTENTION_SHARE * linear / attention)) if attention else None)


def bins_of(lengths: list[int], capacity: int | None) -> list[tuple[int, int]]:
    """[start, stop) token ranges of consecutive sequences of ``lengths``, each range at most ``capacity`` tokens or
    one sequence."""
    bins, start, size = [], 0, 0
    for n in lengths:
        if size and capacity is not None and size + n > capacity:
            bins.append((start, start + size))
            start, size = start + size, 0
        size += n
    return bins + [(start, start + size)]


def pack(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
         response_mask: torch.Tensor, capacity: int | None = None) -> Packed:
    """Pack left-padded queries + right-padded responses (joined, and checked, by `concat_query_response`), in bins
    of at most ``capacity`` tokens (`bins_of`; None: one)."""
    ids, mask = concat_query_response(query_ids, query_mask, response_ids, response_mask)
    real = mask.bool()
    packed_index = (real.reshape(-1).cumsum(0) - 1).reshape(real.shape)  # of each real (row, column)
    lq, t = query_ids.shape[1], response_ids.shape[1]
    valid = response_mask.bool()
    predictors = packed_index[:, lq - 1:lq - 1 + t]  # column Lq-1+t predicts response token t
    lengths = real.sum(1)
    return Packed(ids[real][None], position_ids_from_mask(mask)[real][None], predictors[valid], response_ids[valid],
                  valid, lengths.cumsum(0) - 1, bins_of(lengths.tolist(), capacity))


def causal_lm_outputs(model: nn.Module, p: Packed, accepts_keep: bool, hidden: bool = False):
    """``(logits [K, V], last hidden state [K, H] or None)`` of a causal LM on the packed row, bin by bin."""

    def run(input_ids, position_ids, keep):
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if hidden:
            kwargs["output_hidden_states"] = True
        if accepts_keep:
            kwargs["logits_to_keep"] = keep
        out = model(**kwargs)
        return (out.logits[0] if accepts_keep else out.logits[0, keep],
                out.hidden_states[-1][0, keep] if hidden else None)

    return p.forward_bins(p.keep, run)


def _flash(model: nn.Module) -> bool:
    return "flash" in str(getattr(text_config_of(model), "_attn_implementation", "") or "")


def _flops(model: nn.Module) -> tuple[int, int]:
    """``(linear, attention)``: 2 x (4 h^2 + 3 h i) FLOPs per token and layer (q, k, v, o and a gated MLP), 4 h per
    (query, key) pair (QK^T and AV); (0, 0) for a config without ``hidden_size``."""
    config = text_config_of(model)
    h = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    return 2 * (4 * h * h + 3 * h * inter), 4 * h


def packing_pays(model: nn.Module, query_mask: torch.Tensor, response_mask: torch.Tensor,
                 packing: Packing | None = None) -> bool:
    """Whether the packed forwards cost fewer FLOPs than the padded batch: always with a variable-length (flash)
    attention; otherwise when ``linear x N + attention x sum(N_b^2) < linear x B x W + attention x B x W^2`` (N real
    tokens in bins of N_b (`Packing.capacity`; one bin without ``packing``), B rows of width W)."""
    if _flash(model):
        return True
    linear, attention = _flops(model)
    if linear == 0:
        return False
    rows, width = query_mask.shape[0], query_mask.shape[1] + response_mask.shape[1]
    lengths = (query_mask.sum(1) + response_mask.sum(1)).tolist()
    n = float(sum(lengths))
    pairs = sum(float(b - a) ** 2 for a, b in bins_of(lengths, packing.capacity if packing else None))
    return linear * n + attention * pairs < linear * rows * width + attention * rows * width * width


def packing_for(packing: Packing | None, model: nn.Module, query_mask: torch.Tensor,
                response_mask: torch.Tensor) -> Packing | None:
    """``packing`` where the model's forwards are packed (it is set) and that pays for these rows; else None."""
    return packing if packing is not None and packing_pays(model, query_mask, response_mask, packing) else None
