"""Per-token KL estimators against the reference model, and the KL coefficient controllers.

docs/ppo.md items 6 and 7: the KL penalty goes into the per-token reward with a named estimator,
clamped; its coefficient is fixed or adaptive (Ziegler et al. 2019). Shapes are [B, T] over
response tokens, as in `rlhf_dist.rl.advantages`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from rlhf_dist.rl.advantages import as_bool_mask

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind, clamp: float | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probabilities of tokens sampled from pi.

    J. Schulman, "Approximating KL Divergence" (2020), with ``log r = logp_ref - logp``::

        k1 = -log r          = logp - logp_ref          unbiased, can be negative
        k2 = 0.5 * (log r)^2                            biased, >= 0, low variance
        k3 = (r - 1) - log r                            unbiased, >= 0, low variance

    Args:
        logprobs: [B, T] log pi(y_t | ...) of the sampled tokens under the policy.
        ref_logprobs: [B, T] the same under the reference model.
        kind: "k1", "k2" or "k3" (docs/ppo.md item 6: the estimator is named in the config).
        clamp: if given, the estimate is clamped to [-clamp, clamp] (k2/k3 are >= 0, so to [0, clamp]).
        mask: optional [B, T]; the estimate is 0 at masked positions (whatever the inputs hold there).
    Returns:
        [B, T] in the promoted dtype of the inputs; differentiable in both inputs.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape")
    if mask is not None:
        m = as_bool_mask(mask, logprobs)
        logprobs, ref_logprobs = torch.where(m, logprobs, 0), torch.where(m, ref_logprobs, 0)
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        kl = -log_r
    elif kind == "k2":
        kl = 0.5 * log_r**2
    else:
        kl = torch.expm1(log_r) - log_r
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


class FixedKLController:
    """A constant KL coefficient beta (docs/ppo.md item 7). ``update`` does nothing."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op, so the PPO loop can call ``update`` whatever the controller."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019; docs/ppo.md item 7).

    After a batch whose mean (summed-over-tokens) KL is ``current_kl``::

        e_t      = clip(current_kl / target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + e_t * n_steps / horizon)

    so beta rises while the policy drifts further than ``target`` and falls while it stays closer,
    by at most a factor ``1 +- 0.2 * n_steps / horizon`` per update. ``n_steps`` is the number of
    samples in the batch (lm-human-preferences uses the rollout batch size), ``horizon`` sets
    how fast beta reacts.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Only beta: ``target`` and ``horizon`` come from the config on resume."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
