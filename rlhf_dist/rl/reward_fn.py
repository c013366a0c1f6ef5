"""Reward functions named as ``module:function`` (rule-based rewards, or AI feedback), for the PPO stage.

A reward function scores a batch of completions::

    def my_reward(prompts: list[str], completions: list[str]) -> list[float]: ...

and is named in a recipe as ``ppo.reward_fn: my_package.rewards:my_reward``. `load_reward_fn`
resolves the name before any model is loaded, so a typo fails in one line; `call_reward_fn`
checks what it returns, so a function that returns the wrong thing fails clearly instead of
training on garbage.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

from rlhf_dist.errors import UserError

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str, key: str = "ppo.reward_fn") -> RewardFn:
    """Import ``module:function`` and check it takes (prompts, completions)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{key}: '{spec}' is not module:function; write e.g. my_package.rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{key}: cannot import module '{module_name}' ({exc}); install it or add its folder to "
                        "PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UserError(f"{key}: module '{module_name}' has no '{attr}'; check the name after the colon")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"{key}: '{spec}' is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(["prompt"], ["completion"])
    except TypeError:
        raise UserError(f"{key}: '{spec}' must accept (prompts, completions): two lists of strings") from None
    except ValueError:  # builtins without a signature: checked when called
        pass
    return fn


def call_reward_fn(fn: RewardFn, prompts: list[str], completions: list[str], spec: str = "reward_fn") -> list[float]:
    """Call a reward function and check it returned one finite number per completion."""
    scores = fn(prompts, completions)
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise UserError(f"{spec} must return a list of numbers, got {type(scores).__name__}") from None
    if len(scores) != len(completions):
        raise UserError(f"{spec} returned {len(scores)} scores for {len(completions)} completions")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise UserError(f"{spec} returned a non-finite score for completion {bad[0]}: {completions[bad[0]]!r}")
    return scores
