"""One model on held-out prompts: greedy and sampled completions, their scores, the KL to the reference, the
held-out perplexity, and optional lm-eval tasks. Used by the eval stage (`rlhf_dist.stages.eval`); knows no stage.

Completions come from `rlhf_dist.rl.generation.generate` (left-padded prompts, responses cut at their first stop
token) and are scored by `rlhf_dist.rl.scoring.score_responses` (a reward model, re-tokenised if its tokenizer
differs, or a reward function), exactly as the PPO stage samples and scores. Sampled completions use seeds derived
from (seed, chunk index): every model gets the same seeds, so their comparison is paired. The reference's
log-probabilities are computed on each model's own samples at the sampling temperature (the PPO stage's KL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_dist import watchdog
from rlhf_dist.evaluation.metrics import degeneration, kl_k1
from rlhf_dist.rl.generation import generate, left_pad
from rlhf_dist.rl.sampler import derived_seed
from rlhf_dist.rl.scoring import RewardSource, forward_logprobs, score_responses


@dataclass
class Completion:
    """One completion of prompt `prompt` (its index): tokens without the stop token, and what was measured on it."""

    prompt: int
    ids: list[int]
    text: str
    length: int  # kept tokens, the stop token included (the PPO stage's response_length)
    ended: bool  # stopped at a stop token (else it ran to max_new_tokens)
    score: float | None = None
    kl: float | None = None
    flags: list[str] = field(default_factory=list)


@torch.no_grad()
def complete(model, prompts: list[list[int]], tokenizer, *, greedy: bool, settings, stop_ids: list[int], device,
             reward: RewardSource | None = None, reference=None) -> list[Completion]:
    """Greedy (one per prompt, degeneration flagged) or sampled (settings.samples_per_prompt per prompt, with the KL
    to `reference` when given) completions of `prompts`, scored by `reward` when given."""
    s, pad = settings, tokenizer.pad_token_id
    k = 1 if greedy else s.samples_per_prompt
    work = [i for i in range(len(prompts)) for _ in range(k)]
    out: list[Completion] = []
    for chunk, start in enumerate(range(0, len(work), s.generation_batch_size)):
        rows = work[start:start + s.generation_batch_size]
        with watchdog.phase("evaluate"):
            q_ids, q_mask = left_pad([prompts[i] for i in rows], pad, device)
            # greedy: argmax; temperature and top_k at transformers' defaults, which greedy decoding ignores without a warning
            kw = {"temperature": 1.0, "top_k": 50} if greedy else {"temperature": s.temperature}
            gen = generate(model, q_ids, q_mask, max_new_tokens=s.max_new_tokens, stop_ids=stop_ids, pad_id=pad,
                           generator_seed=None if greedy else derived_seed(s.seed, chunk), do_sample=not greedy, **kw)
            r_ids, r_mask = gen.response_ids, gen.response_mask
            scores = score_responses(reward, tokenizer, q_ids, q_mask, r_ids, r_mask, gen.ended) if reward else None
            if isinstance(scores, tuple):  # (total, per-component scores of a composite reward)
                scores = scores[0]
            kl = None
            if reference is not None and not greedy:
                logp = forward_logprobs(model, q_ids, q_mask, r_ids, r_mask, s.temperature)
                ref = logp if reference is model else forward_logprobs(reference, q_ids, q_mask, r_ids, r_mask, s.temperature)
                kl = kl_k1(logp, ref, r_mask.float())
        for b, i in enumerate(rows):
            n, ended = int(gen.lengths[b]), bool(gen.ended[b])
            ids = r_ids[b, :n].tolist()
            body = ids[:-1] if ended else ids
            text = tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            c = Completion(i, body, text, n, ended, None if scores is None else float(scores[b]),
                           None if kl is None else float(kl[b]))
            if greedy:
                c.flags = degeneration(body, text)
            out.append(c)
    return out


def per_prompt(completions: list[Completion], prompts: int) -> list[float]:
    """Each prompt's mean score over its completions."""
    sums, counts = [0.0] * prompts, [0] * prompts
    for c in completions:
        sums[c.prompt] += c.score
        counts[c.prompt] += 1
    return [s / n for s, n in zip(sums, counts)]


def perplexity_rows(rows: list[dict], tokenizer, limit: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, scored ids) per held-out row: an SFT row's prompt and its completion + EOS (what SFT's loss
    reads), or a text's first token and the rest; rows cut to `limit` tokens, rows with nothing left to score dropped."""
    from rlhf_dist.lengths import token_ids

    out = []
    for row in rows:
        if "prompt" in row and row.get("completion") is not None:
            prompt, completion = row["prompt"], row["completion"]
            messages = isinstance(prompt, list)
            context = token_ids(tokenizer, prompt, generation_prompt=messages)
            if messages:
                full = token_ids(tokenizer, prompt + completion)
            else:
                eos = tokenizer.eos_token or ""
                full = token_ids(tokenizer, prompt + completion + ("" if completion.endswith(eos) else eos))
            if full[:len(context)] != context:  # the template renders the prompt differently inside the chat
                context = full[:len(context)]
        elif isinstance(row.get("text"), str):
            full = token_ids(tokenizer, row["text"])
            context = full[:1]
        else:
            continue
        full = full[:limit]
        if 0 < len(context) < len(full):
            out.append((context, full[len(context):]))
    return out


@torch.no_grad()
def perplexity(model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, device) -> float | None:
    """exp(mean negative log-likelihood per scored token), over all rows' scored tokens together (token-weighted)."""
    if not rows:
        return None
    nll, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        with watchdog.phase("evaluate"):
            q_ids, q_mask = left_pad([c for c, _ in batch], pad_id, device)
            width = max(len(r) for _, r in batch)
            r_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            r_mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for b, (_, r) in enumerate(batch):
                r_ids[b, :len(r)] = torch.tensor(r)
                r_mask[b, :len(r)] = True
            logp = forward_logprobs(model, q_ids, q_mask, r_ids.to(device), r_mask.to(device), 1.0)
        nll -= float(logp.sum())
        tokens += int(r_mask.sum())
    mean = nll / tokens
    return math.exp(mean) if mean < 50 else float("inf")


def lm_eval_results(model_path: str | Path, tasks: list[str], args: dict[str, Any], include_path: str | None,
                    device, dtype: str = "auto", base: str | None = None) -> dict[str, dict[str, float]]:
    """lm-eval's tasks on a saved model through its Python API (`lm_eval.simple_evaluate`, model "hf"): {task: {metric:
    value}}, numbers only. `include_path`: a folder of local task YAML files (lm-eval's TaskManager include_path);
    `base`: for a LoRA adapter `model_path`, its base model (lm-eval's peft argument)."""
    import lm_eval

    manager = None
    if include_path:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_path))
    model_args = {"pretrained": str(model_path), "dtype": dtype} if base is None else \
        {"pretrained": str(base), "peft": str(model_path), "dtype": dtype}
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args,
                                      tasks=list(tasks), task_manager=manager, device=str(device), **args)
    return {task: {metric: float(value) for metric, value in figures.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, figures in (results or {}).get("results", {}).items()}
