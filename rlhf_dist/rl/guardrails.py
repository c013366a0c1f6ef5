"""Training-health guardrails of the PPO loop: rules on each step's metrics, and what to do when one fires.

Every RL framework logs KL, entropy and ratios; a run that blows up burns its allocation until someone looks.
Here every step's metrics (the same on every process: they are reduced over all of them) go through these rules
(recipe section ``ppo.guardrails``, `rlhf_dist.config.ppo.GuardrailsConfig`):

    rule        fires when, for `patience` steps in a row
    kl          objective/kl > limit                        (nats per response)
    entropy     policy/entropy < limit                      (nats per token: the policy stopped exploring)
    ratio       policy/ratio_max > limit                    (a token's new / old probability)
    value_loss  value/loss > limit
    length      rollout/response_length >= limit * max_new_tokens   (responses run to the limit; off with ignore_eos)
    heldout     every `heldout_every` steps: the held-out score fell more than `limit` below its best while the
                training score (mean since the last evaluation) rose above its value at that best (reward hacking)

A value that is not finite breaks every rule. Each rule's action: ``warn`` (log it), ``stop`` (end the run with a
diagnosis, exit status GUARD_STOPPED), ``rollback`` (restore the last healthy checkpoint, multiply the learning
rate by ``rollback.lr_factor`` and the KL coefficient by ``rollback.kl_factor``, continue; after
``rollback.max_rollbacks`` of them, stop). While a stop or rollback rule is firing no regular checkpoint is
saved, so every checkpoint on disk is healthy and the newest one from before the rule began is the one to go
back to. Non-finite gradients (a NaN or Inf loss makes them so on every process alike: DDP averages them) skip
that optimizer step on every process and are counted; ``max_skipped`` in a row stop the run.

Every event goes to log.jsonl (a row with "event"), TensorBoard (text and scalar `guardrails/<rule>`) and, for a
completed stage, metrics.json. Warnings never change a run, nor does a skipped step of a run that has none: the
defaults (warn only) leave a healthy run exactly as it was.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from rlhf_dist import rundir
from rlhf_dist.errors import StageStopped
from rlhf_dist.rl import checkpoint

log = logging.getLogger("rlhf_dist")

GUARD_STOPPED = 3  # the exit status of a run a guardrail stopped

# rule -> (metric, comparison); `length` compares against limit * max_new_tokens
RULES = {
    "kl": ("objective/kl", ">"),
    "entropy": ("policy/entropy", "<"),
    "ratio": ("policy/ratio_max", ">"),
    "value_loss": ("value/loss", ">"),
    "length": ("rollout/response_length", ">="),
    "heldout": ("heldout/score", "drop"),
}
SEVERITY = {"warn": 0, "skip": 0, "rollback": 1, "stop": 2}


@dataclass
class Event:
    """One guardrail firing: what, when, and what was done."""

    n: int  # 1-based number of the event in the run
    step: int
    rule: str
    metric: str
    value: float | None
    limit: float | None
    action: str
    message: str

    def as_dict(self) -> dict:
        return {"n": self.n, "step": self.step, "rule": self.rule, "metric": self.metric, "value": self.value,
                "limit": self.limit, "action": self.action, "message": self.message}


def _violated(value: float, threshold: float, comparison: str) -> bool:
    if not math.isfinite(value):
        return True
    return {">": value > threshold, "<": value < threshold, ">=": value >= threshold}[comparison]


class Guardrails:
    """The rules' state over a run (streaks, counters, the held-out best), checkpointed with the loop's state."""

    def __init__(self, cfg, max_new_tokens: int, ignore_eos: bool = False):
        self.cfg, self.max_new_tokens, self.ignore_eos = cfg, max_new_tokens, ignore_eos
        self.streak = {name: 0 for name in RULES}
        self.since = {name: 0 for name in RULES}  # the step each streak began
        self.events: list[dict] = []
        self.skipped_total = self.skipped_in_a_row = self.rollbacks = 0
        self.lr_scale = self.kl_scale = 1.0
        self.heldout_best: dict | None = None  # {"score", "train", "step"}
        self.train_scores: list[float] = []  # objective/scores since the last held-out evaluation

    # -- the rules -------------------------------------------------------------------------------------------
    def acting_rules(self) -> list[str]:
        return [name for name, rule in self.cfg.rules().items() if rule.limit is not None and rule.action != "warn"]

    def may_roll_back(self) -> bool:
        return any(self.cfg.rules()[name].action == "rollback" for name in self.acting_rules())

    def healthy(self) -> bool:
        """No stop or rollback rule is firing (a checkpoint saved now is one to go back to)."""
        return all(self.streak[name] == 0 for name in self.acting_rules())

    def check(self, step: int, metrics: dict, heldout_score: float | None = None) -> list[Event]:
        """Update the streaks with this step's metrics; the events of rules that fire now (streak == patience)."""
        fired = []
        self.train_scores.append(float(metrics.get("objective/scores", math.nan)))
        for name, rule in self.cfg.rules().items():
            if rule.limit is None:
                continue
            metric, comparison = RULES[name]
            if name == "heldout":
                if heldout_score is None:
                    continue
                violated, value, threshold = self._heldout(step, heldout_score, rule.limit)
            elif name == "length" and self.ignore_eos:
                continue
            else:
                if metric not in metrics or metrics[metric] is None:
                    continue
                value = float(metrics[metric])
                threshold = rule.limit * self.max_new_tokens if name == "length" else rule.limit
                violated = _violated(value, threshold, comparison)
            if not violated:
                self.streak[name] = 0
                continue
            if self.streak[name] == 0:
                self.since[name] = step
            self.streak[name] += 1
            if self.streak[name] == rule.patience:
                fired.append(self._event(step, name, metric, value, threshold, rule.action,
                                         self._describe(name, metric, value, threshold, comparison, rule.patience)))
        return fired

    def _heldout(self, step: int, score: float, limit: float) -> tuple[bool, float, float]:
        train = sum(self.train_scores) / max(len(self.train_scores), 1)
        self.train_scores = []
        best = self.heldout_best
        if best is None or score > best["score"]:
            self.heldout_best = {"score": score, "train": train, "step": step}
            return False, score, limit
        return (best["score"] - score > limit and train > best["train"]) or not math.isfinite(score), score, \
            best["score"] - limit

    def _describe(self, name, metric, value, threshold, comparison, patience) -> str:
        steps = f" for {patience} steps" if patience > 1 else ""
        if name == "heldout":
            best = self.heldout_best
            return (f"held-out score {value:.4g} is more than {best['score'] - threshold:.4g} below its best "
                    f"{best['score']:.4g} (step {best['step']}) while the training score rose{steps}: the policy may be "
                    "hacking the reward")
        if name == "length":
            return f"{metric} = {value:.4g} >= {threshold:.4g} ({self.cfg.length.limit:g} x max_new_tokens){steps}"
        return f"{metric} = {value:.4g} {comparison} {threshold:.4g}{steps}"

    def _event(self, step, rule, metric, value, limit, action, message) -> Event:
        event = Event(len(self.events) + 1, step, rule, metric, value if value is None or math.isfinite(value) else None,
                      limit, action, message)
        self.events.append(event.as_dict())
        return event

    # -- non-finite gradients --------------------------------------------------------------------------------
    def skipped(self, step: int, optimizer_step: int, grad_norm: float, deepspeed: bool) -> Event:
        """An optimizer step whose gradient norm is not finite; the event says skip or stop."""
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        stop = self.cfg.nonfinite == "stop" or deepspeed or self.skipped_in_a_row >= self.cfg.max_skipped
        why = ("under DeepSpeed the engine has already applied it" if deepspeed else
               f"{self.skipped_in_a_row} in a row (guardrails.max_skipped={self.cfg.max_skipped})"
               if self.skipped_in_a_row >= self.cfg.max_skipped else "guardrails.nonfinite: stop")
        message = (f"non-finite gradient norm ({grad_norm}) at optimizer step {optimizer_step}: " +
                   (f"stopping ({why})" if stop else "skipped on every process"))
        return self._event(step, "nonfinite", "train/grad_norm", None, None, "stop" if stop else "skip", message)

    def stepped(self) -> None:
        self.skipped_in_a_row = 0

    # -- rollback --------------------------------------------------------------------------------------------
    def reset_streaks(self) -> None:
        self.streak = {name: 0 for name in RULES}
        self.train_scores = []

    def state_dict(self) -> dict:
        return {"streak": self.streak, "since": self.since, "events": self.events, "skipped_total": self.skipped_total,
                "skipped_in_a_row": self.skipped_in_a_row, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
                "kl_scale": self.kl_scale, "heldout_best": self.heldout_best, "train_scores": self.train_scores}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def summary(self) -> dict:
        return {"events": self.events, "skipped_optimizer_steps": self.skipped_total, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale, "kl_scale": self.kl_scale}


def worst(events: list[Event]) -> Event | None:
    """The event whose action matters most (stop > rollback > warn/skip)."""
    return max(events, key=lambda e: SEVERITY[e.action], default=None)


# ---------------------------------------------------------------------------------------------
# Acting on a step's events in the PPO loop: rollback to a healthy checkpoint, or stop with a diagnosis
# ---------------------------------------------------------------------------------------------

def act(loop, metrics: dict, heldout: float | None, bar=None) -> bool:
    """This step's guardrail events in the PPO loop (`rlhf_dist.rl.trainer.PPOLoop`): logged, then acted on; True if
    the run rolled back to a checkpoint (then `loop.step` is the checkpoint's)."""
    events = [*loop.guard_events, *loop.guard.check(loop.step, metrics, heldout)]
    loop.guard_events = []
    for event in events:
        (log.warning if event.action in ("warn", "skip") else log.error)(
            "ppo: guardrail '%s' at step %d: %s (%s)", event.rule, event.step, event.message, event.action)
        loop.tracker.event(event.as_dict())
    event = worst(events)
    if event is None or event.action in ("warn", "skip"):
        return False
    healthy, condemned = checkpoint.healthy(loop.work_dir, loop.guard.since.get(event.rule, loop.step))
    if event.action == "rollback":
        limit = loop.guard.cfg.rollback.max_rollbacks
        if healthy is not None and loop.guard.rollbacks < limit:
            _rollback(loop, healthy, condemned)
            if bar is not None:
                bar.n = loop.step
                bar.refresh()
            return True
        why = f"{limit} rollback(s) already" if healthy is not None else "no checkpoint from before it to go back to"
        _stop(loop, event, healthy, condemned, f"rollback refused: {why}")
    _stop(loop, event, healthy, condemned)
    return False


def _set_aside(loop, condemned: list[Path]) -> None:
    """Checkpoints a rule condemns go to WORK/unhealthy/, out of the way of resuming (kept, not deleted)."""
    if condemned and loop.accelerator.is_main_process:
        moved = rundir.set_aside(loop.work_dir, [p.name for p in condemned], into=rundir.UNHEALTHY)
        log.warning("ppo: set aside %s (saved after the policy went wrong) in %s", ", ".join(p.name for p in moved),
                    loop.work_dir / rundir.UNHEALTHY)
    loop.accelerator.wait_for_everyone()


def _rollback(loop, target: Path, condemned: list[Path]) -> None:
    rb = loop.guard.cfg.rollback
    loop.guard.rollbacks += 1
    loop.guard.lr_scale *= rb.lr_factor
    loop.guard.kl_scale *= rb.kl_factor
    step = loop.step
    loop.load_checkpoint(target, rollback=True)
    _set_aside(loop, condemned)
    loop.guard.reset_streaks()
    loop.tracker.rewind(loop.step)
    log.warning("ppo: rollback %d of %d: from step %d back to %s; learning rate x%g (now x%g), KL coefficient now %.4g",
                loop.guard.rollbacks, rb.max_rollbacks, step, target, rb.lr_factor, loop.guard.lr_scale,
                loop.kl_ctl.value)


def _stop(loop, event: Event, healthy: Path | None, condemned: list[Path], why: str = "") -> None:
    _set_aside(loop, condemned)
    rolled = f" after {loop.guard.rollbacks} rollback(s)" if loop.guard.rollbacks else ""
    resume = (f"--resume continues from {healthy}, saved before it: change the recipe first (e.g. a lower "
              "ppo.training.learning_rate or a higher ppo.training.kl_coef)" if healthy else
              "no checkpoint from before it: change the recipe and run again")
    raise StageStopped(f"guardrail '{event.rule}' stopped the run at step {event.step}{rolled}: {event.message}"
                       f"{'; ' + why if why else ''}; {resume}", GUARD_STOPPED,
                       log=loop.work_dir / "log.jsonl")
