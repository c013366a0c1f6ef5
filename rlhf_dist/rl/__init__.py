"""The RL math of the PPO stage: pure functions on [B, T] tensors over response tokens.

* `rewards`    — `first_stop_truncate` (responses end at their first stop token), `RunningMoments`
  and `normalize_scores` (score normalisation and clipping), `kl_shaped_rewards` (per-token reward:
  KL penalty on every token, score on the last).
* `kl`         — `kl_estimate` (k1/k2/k3 estimators), `FixedKLController`, `AdaptiveKLController`.
* `advantages` — `masked_mean`, `masked_var`, `whiten` (global over ranks via ``reduce``), `gae`,
  `group_baseline` (RLOO/GRPO), `sequence_advantages_to_tokens`.
* `losses`     — `ppo_policy_loss`, `value_loss`, `logprobs_from_logits`, `entropy_from_logits`,
  `explained_variance`.

The model-facing modules (import from them; they are not re-exported here):

* `generation` — `left_pad`, `generate` (sampling with the KV cache, truncated at the first stop token; one
  typed `Generation`), `stop_token_ids`, `disable_dropout`.
* `scoring`    — `forward_logprobs` (policy and reference, same temperature), `sequence_scores` /
  `token_values` (reward and value models), `decode_pairs` / `retokenize` (a reward model with another
  tokenizer), `RewardSource` and `score_responses`.
* `actor_critic`, `adapters` — the policy and its value function as one module; several LoRA adapters on one base.
* `sources`, `models` — where the PPO models come from (configs only), and `build_ppo` / `save_ppo`.
* `batch`, `sampler`, `trainer` — the step's `RolloutBatch`; phase 1 (`RolloutSampler`); the loop (`PPOLoop`).
* `optim`, `checkpoint`, `guardrails`, `tracking`, `distributed`, `batching`, `reward_fn` — its optimizer and
  schedule, checkpoints, health rules, logs, Accelerator and reductions, batch arithmetic, reward functions.

Conventions: ``mask`` [B, T] is True (or 1) on valid response tokens; padding never affects an
output at a valid position. ``reduce`` sums a tensor over data-parallel ranks, e.g.
``lambda t: accelerator.reduce(t, "sum")``; None means one process. Statistics are plain floats.
Docstrings cite, as "item N", the numbered items of the PPO checklist in docs/ppo.md that they
implement.
"""

from rlhf_dist.rl.advantages import (
    gae,
    group_baseline,
    masked_mean,
    masked_var,
    sequence_advantages_to_tokens,
    whiten,
)
from rlhf_dist.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_dist.rl.losses import (
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    ppo_policy_loss,
    value_loss,
)
from rlhf_dist.rl.rewards import RunningMoments, first_stop_truncate, kl_shaped_rewards, normalize_scores

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "entropy_from_logits",
    "explained_variance",
    "first_stop_truncate",
    "gae",
    "group_baseline",
    "kl_estimate",
    "kl_shaped_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "normalize_scores",
    "ppo_policy_loss",
    "sequence_advantages_to_tokens",
    "value_loss",
    "whiten",
]
