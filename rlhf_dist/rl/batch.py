"""The rollouts of one PPO step as one typed batch, and the two ways batches are combined: concatenated (a
process's generation chunks) and gathered (every process's share, so each holds the whole step).

Rows are prompt + response; queries left-padded, responses right-padded (docs/ppo.md item 1). Combining pads the
narrower parts to the widest (queries on the left, responses on the right), so the order of rows is the order
of the parts: gathered in process order, a step's batch is the one-process batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class RolloutBatch:
    """Rollouts of one step (rows = prompt + response). Queries left-padded, responses right-padded."""

    query_ids: torch.Tensor      # [N, Lq] long
    query_mask: torch.Tensor     # [N, Lq] long
    response_ids: torch.Tensor   # [N, T] long
    response_mask: torch.Tensor  # [N, T] bool
    ended: torch.Tensor          # [N] bool: the response stopped (else it hit max_new_tokens)
    logprobs: torch.Tensor       # [N, T] policy at rollout time (= "old" log-probs)
    ref_logprobs: torch.Tensor   # [N, T] reference
    entropy: torch.Tensor        # [N, T] of the sampling distribution
    values: torch.Tensor | None  # [N, T] value estimates (None without a value function)
    scores: torch.Tensor         # [N] raw reward-model / reward-function scores
    components: torch.Tensor | None = None  # [N, C] a composite reward's components (RewardSource.labels), unweighted

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The given rows, with all-padding columns trimmed (left of the queries, right of the responses)."""
        picked = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows]) for f in fields(self)}
        q_keep = int(picked["query_mask"].sum(1).max())
        t_keep = max(int(picked["response_mask"].sum(1).max()), 1)
        for name in ("query_ids", "query_mask"):
            picked[name] = picked[name][:, picked[name].shape[1] - q_keep:]
        for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "entropy", "values"):
            if picked[name] is not None:
                picked[name] = picked[name][:, :t_keep]
        return RolloutBatch(**picked)


def _pad_columns(t: torch.Tensor, width: int, value: Any, left: bool) -> torch.Tensor:
    missing = width - t.shape[1]
    if missing <= 0:
        return t
    pad = torch.full((t.shape[0], missing), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def concat_batches(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Stack chunks of rollouts: queries left-padded, responses right-padded to the widest."""
    lq = max(p.query_ids.shape[1] for p in parts)
    t = max(p.response_ids.shape[1] for p in parts)
    out = {}
    for f in fields(RolloutBatch):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            out[f.name] = None
        elif f.name in ("query_ids", "query_mask"):
            out[f.name] = torch.cat([_pad_columns(v, lq, pad_id if f.name == "query_ids" else 0, True) for v in values])
        elif values[0].dim() == 2 and f.name != "components":  # per response token
            fill = pad_id if f.name == "response_ids" else (False if f.name == "response_mask" else 0.0)
            out[f.name] = torch.cat([_pad_columns(v, t, fill, False) for v in values])
        else:
            out[f.name] = torch.cat(values)
    return RolloutBatch(**out)


def gather_batch(accelerator, local: RolloutBatch, pad_id: int) -> RolloutBatch:
    """Every process gets every process's rollouts, in process order (= the one-process order)."""
    if accelerator.num_processes == 1:
        return local
    out = {}
    for f in fields(RolloutBatch):
        t = getattr(local, f.name)
        if t is None:
            out[f.name] = None
            continue
        is_bool = t.dtype == torch.bool
        t = t.long() if is_bool else t
        if t.dim() == 2 and f.name != "components":
            left = f.name in ("query_ids", "query_mask")
            fill = pad_id if f.name in ("query_ids", "response_ids") else 0
            t = accelerator.pad_across_processes(t, dim=1, pad_index=fill, pad_first=left)
        t = accelerator.gather(t.contiguous())
        out[f.name] = t.bool() if is_bool else t
    return RolloutBatch(**out)
