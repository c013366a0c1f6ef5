"""Phase 1 of a PPO step: sample responses for this process's prompts and run the batched forwards that score
them (policy log-probabilities and values, reference log-probabilities, reward), in chunks of
generation_batch_size, into one `RolloutBatch`.

Sampling randomness belongs to a chunk, not to a process: chunk c is sampled with a seed derived from the step's
seed parts and c's index over all processes, so chunk c is the same whichever process generates it
(docs/ppo.md item 22), and 2 processes sample exactly what 1 does.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from rlhf_dist import watchdog
from rlhf_dist.rl.adapters import REFERENCE, no_adapter, use_adapter
from rlhf_dist.rl.advantages import informative_groups
from rlhf_dist.rl.batch import RolloutBatch, concat_batches, gather_batch
from rlhf_dist.rl.decode import decode
from rlhf_dist.rl.generation import generate, left_pad, stop_token_ids
from rlhf_dist.rl.packing import Packing, packing_for
from rlhf_dist.rl.scoring import RewardSource, forward_logprobs, packing_matches, score_responses


def derived_seed(*parts: int) -> int:
    """A seed from integers (seed, step, chunk...): the same on every process, different per tuple."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).hexdigest()
    return int(digest[:15], 16)


class RolloutSampler:
    """Samples and scores prompts with the PPO models. `model` is the prepared `ActorCritic` (unwrapped on use);
    `reference` a frozen model, or None: the policy with its LoRA adapter disabled (or the frozen SFT adapter)."""

    def __init__(self, args, accelerator, model, reference, reward: RewardSource, tokenizer, zero_stage: int):
        self.args, self.accelerator, self.model = args, accelerator, model
        self.reference, self.reward, self.tokenizer = reference, reward, tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer, args.stop_tokens, args.ignore_eos)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.synced = zero_stage == 3 and self.world > 1  # every process steps until all have finished (item 21)
        # our decode loop (finished rows leave the batch, shared prompts prefilled once) unless it cannot be used
        self.compact = args.decoding == "compact" and not self.synced and args.top_k == 0 and args.top_p == 1.0
        unwrapped = accelerator.unwrap_model(model)
        device, free = accelerator.device, bool(args.padding_free)

        def packing(model, vocab_size: int, **check) -> Packing | None:
            """The model's packed forwards once `packing_matches` says so: bins, or one forward per process under
            ZeRO-3 (each forward gathers the weights on every process)."""
            if not (free and model is not None and packing_matches(model, vocab_size, device, **check)):
                return None
            return Packing.for_model(model, one_forward=self.synced)

        self.packed = packing(unwrapped.policy, len(tokenizer), temperature=args.temperature)
        unwrapped.packed = self.packed  # the actor-critic's policy pass (rollout and update) alike
        unwrapped.packed_values = packing(unwrapped.value_model, len(tokenizer), classifier=True,
                                          name="the value model")
        reward.packed = packing(reward.model, len(reward.tokenizer or tokenizer), classifier=True,
                                name="the reward model")

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], seed_parts: tuple[int, ...], step: int,
                columns: dict[str, list] | None = None) -> RolloutBatch:
        """Sample and score ``prompts`` (this process's share) in chunks of generation_batch_size. ``columns``: the
        prompt rows' other columns, one value per prompt, for reward functions that read them."""
        size, device = self.args.generation_batch_size, self.accelerator.device
        chunks = len(prompts) // size
        parts = []
        for j in range(chunks):
            chunk = slice(j * size, (j + 1) * size)
            mine = {name: values[chunk] for name, values in (columns or {}).items()}
            with watchdog.phase("rollout", step):  # each chunk on its own clock
                parts.append(self._chunk(prompts[chunk], mine, derived_seed(*seed_parts, self.rank * chunks + j), device,
                                         step))
        return concat_batches(parts, self.pad_id)

    @torch.no_grad()
    def evaluate(self, prompts: list[list[int]], step: int, columns: dict[str, list] | None = None) -> dict[str, float]:
        """Mean score, KL to the reference (sum over tokens of logp - logp_ref), length and EOS rate of responses
        sampled for the held-out `prompts`, with fixed seeds (the same before and after training); with a composite
        reward, each component's mean too (reward/<label>)."""
        with watchdog.phase("evaluate"):
            quantum = self.world * self.args.generation_batch_size  # equal, whole chunks on every process (item 20)
            extra = -len(prompts) % quantum
            padded = prompts + [prompts[0]] * extra
            columns = {name: values + values[:1] * extra for name, values in (columns or {}).items()}
            per_process = len(padded) // self.world
            mine = slice(self.rank * per_process, (self.rank + 1) * per_process)
            local = self.rollout(padded[mine], (self.args.seed, -1), step, {k: v[mine] for k, v in columns.items()})
            batch = gather_batch(self.accelerator, local, self.pad_id)
        n = len(prompts)
        mask = batch.response_mask[:n]
        kl = ((batch.logprobs - batch.ref_logprobs)[:n] * mask).sum(1)
        out = {"score": float(batch.scores[:n].float().mean()), "kl": float(kl.mean()),
               "response_length": float(mask.sum(1).float().mean()), "eos_rate": float(batch.ended[:n].float().mean())}
        return {**out, **component_means(self.reward, batch.components, n)}

    def _chunk(self, prompts: list[list[int]], columns: dict[str, list], seed: int, device, step: int) -> RolloutBatch:
        a, model = self.args, self.accelerator.unwrap_model(self.model)
        q_ids, q_mask = left_pad(prompts, self.pad_id, device)
        extra = {"synced_gpus": True} if self.synced else {}
        with self.accelerator.autocast():
            recorded = a.rollout_logprobs == "generate"
            head_on_policy = recorded and model.values_need_policy_pass  # the head reads the sampling pass's states
            if self.compact:
                out, _ = decode(model.policy, q_ids, q_mask, max_new_tokens=a.max_new_tokens,
                                temperature=a.temperature, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                generator_seed=seed, record_logprobs=recorded, record_hidden=head_on_policy)
            else:
                out = generate(model.policy, q_ids, q_mask, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                               top_k=a.top_k, top_p=a.top_p, stop_ids=self.stop_ids, pad_id=self.pad_id,
                               generator_seed=seed, record_logprobs=recorded, record_hidden=head_on_policy, **extra)
            r_ids, r_mask = out.response_ids, out.response_mask
            if head_on_policy:  # no second policy pass at all
                logprobs, entropy, values = out.logprobs, out.entropy, torch.where(r_mask, model.value_head(out.hidden), 0.0)
            elif recorded:  # no second policy pass: the values alone (none for RLOO/GRPO)
                logprobs, entropy, values = out.logprobs, out.entropy, model.values(q_ids, q_mask, r_ids, r_mask)
            else:
                logprobs, entropy, values = model(q_ids, q_mask, r_ids, r_mask)  # the training forward, without grad
            ref_logprobs = self._ref_logprobs(model, q_ids, q_mask, r_ids, r_mask)
            with watchdog.phase("score", step):
                scores, components = score_responses(self.reward, self.tokenizer, q_ids, q_mask, r_ids, r_mask, out.ended,
                                                     columns)
        return RolloutBatch(q_ids, q_mask, r_ids, r_mask, out.ended, logprobs, ref_logprobs, entropy, values, scores,
                            components)

    def _ref_logprobs(self, model, q_ids, q_mask, r_ids, r_mask) -> torch.Tensor:
        if self.reference is not None:
            packed = packing_for(self.packed, self.reference, q_mask, r_mask)
            return forward_logprobs(self.reference, q_ids, q_mask, r_ids, r_mask, self.args.temperature, packed=packed)
        policy = model.policy
        reference = use_adapter(policy, REFERENCE) if REFERENCE in policy.peft_config else no_adapter(policy)
        with reference:  # the SFT model: the base (SFT merged into it), or the frozen SFT adapter (item 19)
            packed = packing_for(self.packed, policy, q_mask, r_mask)
            return forward_logprobs(policy, q_ids, q_mask, r_ids, r_mask, self.args.temperature, packed=packed)

    def dynamic_sampling(self, batch: RolloutBatch, refill: Callable[[int], tuple[list[list[int]], dict[str, list]]],
                         seed_parts: tuple[int, ...], step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """DAPO's dynamic sampling (Yu et al. 2025) on a gathered step: groups whose scores are all equal carry no
        signal for a group estimator; they are dropped, and groups of new prompts (`refill(round)`: this process's
        share of another draw of rollout_batch_size prompts, and their columns) are sampled until rollout_batch_size
        informative groups
        are there, for at most dynamic_sampling_max_rounds rounds; a step still short is topped up with dropped
        groups (their advantages are 0). Every process decides on the same gathered scores and generates the same
        number of chunks per round, so no process waits in a collective another skipped (docs/ppo.md item 20)."""
        a = self.args
        k, need = a.samples_per_prompt, a.rollout_batch_size
        kept, dropped = [], []

        def sort(b: RolloutBatch) -> None:
            for g, informative in enumerate(informative_groups(b.scores.float(), k).tolist()):
                (kept if informative else dropped).append((b, g))

        sort(batch)
        rounds = 0
        while len(kept) < need and rounds < a.dynamic_sampling_max_rounds:
            rounds += 1
            prompts, columns = refill(rounds)
            more = self.rollout(prompts, (*seed_parts, rounds), step, columns)
            with watchdog.phase("gather", step):
                sort(gather_batch(self.accelerator, more, self.pad_id))
        filled = max(need - len(kept), 0)
        groups = (kept + dropped[:filled])[:need]
        parts = [b.select(torch.arange(g * k, (g + 1) * k)) for b, g in groups]
        return concat_batches(parts, self.pad_id), {"rollout/dynamic_rounds": float(rounds),
                                                    "rollout/groups_dropped": float(len(dropped)),
                                                    "rollout/groups_filled": float(filled)}


def component_means(reward: RewardSource, components: torch.Tensor | None, n: int | None = None) -> dict[str, float]:
    """``{reward/<label>: mean}`` of a composite reward's components over the first `n` rows (all by default)."""
    if components is None:
        return {}
    return {f"reward/{label}": float(components[:n, i].float().mean()) for i, label in enumerate(reward.labels)}
