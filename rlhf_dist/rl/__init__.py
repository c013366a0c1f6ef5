"""The RL math of the PPO stage: pure functions on [B, T] tensors over response tokens.

* `rewards`    — `first_stop_truncate` (responses end at their first stop token), `RunningMoments`
  and `normalize_scores` (score normalisation and clipping), `fit_gain_bias` / `apply_gain_bias` (a
  fixed gain and bias, lm-human-preferences), `kl_shaped_rewards` (per-token reward: KL penalty on
  every token, score on the last), `overlong_penalty` and `overlong_filter_mask` (DAPO's overlong
  reward shaping and filtering).
* `kl`         — `kl_estimate` (k1/k2/k3 estimators), `FixedKLController`, `AdaptiveKLController`.
* `advantages` — `masked_mean`, `masked_var`, `whiten` (global over ranks via ``reduce``), `gae`,
  `group_baseline` (RLOO/GRPO/Dr. GRPO), `informative_groups` (DAPO's dynamic-sampling filter),
  `discounted_returns`, `reinforce_pp_advantages` (REINFORCE++ and REINFORCE++-baseline),
  `sequence_advantages_to_tokens`.
* `losses`     — `ppo_policy_loss` (with DAPO's decoupled clip range), `gspo_policy_loss` and
  `sequence_importance_ratio` (GSPO), `aggregate` ("token", "sequence", or Dr. GRPO's "constant"),
  `value_loss`, `logprobs_from_logits`, `entropy_from_logits`, `explained_variance`.

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
    discounted_returns,
    gae,
    group_baseline,
    informative_groups,
    masked_mean,
    masked_var,
    reinforce_pp_advantages,
    sequence_advantages_to_tokens,
    whiten,
)
from rlhf_dist.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_dist.rl.losses import (
    aggregate,
    entropy_from_logits,
    explained_variance,
    gspo_policy_loss,
    logprobs_from_logits,
    ppo_policy_loss,
    sequence_importance_ratio,
    value_loss,
)
from rlhf_dist.rl.rewards import (
    RunningMoments,
    apply_gain_bias,
    first_stop_truncate,
    fit_gain_bias,
    kl_shaped_rewards,
    normalize_scores,
    overlong_filter_mask,
    overlong_penalty,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "aggregate",
    "apply_gain_bias",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "first_stop_truncate",
    "fit_gain_bias",
    "gae",
    "group_baseline",
    "gspo_policy_loss",
    "informative_groups",
    "kl_estimate",
    "kl_shaped_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "normalize_scores",
    "overlong_filter_mask",
    "overlong_penalty",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "sequence_advantages_to_tokens",
    "sequence_importance_ratio",
    "value_loss",
    "whiten",
]
