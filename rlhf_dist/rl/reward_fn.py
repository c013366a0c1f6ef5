"""Reward functions named as ``module:function`` (rule-based rewards, or AI feedback), for the PPO stage.

A reward function scores a batch of completions::

    def my_reward(prompts: list[str], completions: list[str]) -> list[float]: ...

and is named in a recipe as ``ppo.reward_fn: my_package.rewards:my_reward``. `load_reward_fn`
resolves the name before any model is loaded, so a typo fails in one line; `call_reward_fn`
checks what it returns, so a function that returns the wrong thing fails clearly instead of
training on garbage. A function may also read other columns of the prompt data by declaring them as keyword
arguments (``def my_reward(prompts, completions, *, answer)``); the convention, and the composite of several
functions (``ppo.rewards``), are `rlhf_dist.rewards`'.
"""

from __future__ import annotations

from typing import Callable

from rlhf_dist.rewards.calling import call, resolve

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str, key: str = "ppo.reward_fn") -> RewardFn:
    """Import ``module:function`` and check it takes (prompts, completions), then keyword arguments only."""
    return resolve(spec, key)


def call_reward_fn(fn: RewardFn, prompts: list[str], completions: list[str], spec: str = "reward_fn",
                   columns: dict[str, list] | None = None) -> list[float]:
    """Call a reward function (with the prompt data's columns it declares) and check it returned one finite number
    per completion."""
    return call(fn, prompts, completions, columns, spec)
