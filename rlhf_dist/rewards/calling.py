"""Calling a reward function with the prompt rows' other columns (reference answers, test cases, ...).

The PPO stage's reward function sees ``(prompts, completions)``. A verifiable reward also needs each prompt's
reference, which sits in another column of the same data row (GSM8K's ``answer``). The convention, after TRL's
GRPOTrainer (which passes every dataset column other than prompt/completion as a keyword argument, one value per
completion, and so asks reward functions to end in ``**kwargs``):

* a reward function DECLARES the columns it reads as keyword parameters without a default::

      def my_reward(prompts, completions, *, answer, test_cases): ...

* `call` passes exactly those columns, each a list with one value per completion (the loop repeats a prompt row's
  values for each of its samples), and fails in one line naming a missing column and the fix;
* parameters with a default are settings, never filled from data (a data column called ``tolerance`` cannot change
  a tolerance by accident); bind them with `functools.partial` or a composite component's ``kwargs``;
* a function with ``**kwargs`` gets every column (so TRL-style reward functions work unchanged);
* ``rename`` maps a parameter to a differently named column (``{"answer": "solution"}``).

`resolve` imports ``module:function`` without importing torch, and accepts functions that declare columns.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable

from rlhf_dist.errors import UserError


def _parameters(fn: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return None


def declared_columns(fn: Callable) -> tuple[list[str], bool]:
    """(the columns `fn` declares, in order; whether it takes ``**kwargs`` and so every column)."""
    params = _parameters(fn)
    if params is None:
        return [], False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    first_two = {p.name for p in positional[:2]}
    columns = [p.name for p in params if p.name not in first_two and p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return columns, any(p.kind == p.VAR_KEYWORD for p in params)


def check_signature(fn: Callable, name: str) -> None:
    """`fn` must take (prompts, completions) positionally; anything else it requires must be keyword (a column)."""
    params = _parameters(fn)
    if params is None:
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    if not takes_two or any(p.kind == p.POSITIONAL_ONLY and p.default is p.empty for p in positional[2:]):
        raise UserError(f"{name}: must accept (prompts, completions): two lists of strings, then keyword arguments only")


def column_kwargs(fn: Callable, columns: dict[str, list], n: int, name: str = "reward function",
                  rename: dict[str, str] | None = None) -> dict[str, list]:
    """The keyword arguments `call` passes: the columns `fn` declares (through `rename`), checked for length."""
    rename = rename or {}
    wanted, takes_all = declared_columns(fn)
    out = {}
    for param in wanted:
        column = rename.get(param, param)
        if column not in columns:
            have = ", ".join(sorted(columns)) or "none besides the prompt"
            mapped = f" (its parameter '{param}')" if column != param else ""
            raise UserError(f"{name}: needs the column '{column}'{mapped} of the prompt data, which has {have}; add it "
                            f"to the data, or map one of yours to it with the reward's columns: {{{param}: your_column}}")
        out[param] = columns[column]
    if takes_all:
        inverse = {column: param for param, column in rename.items()}
        out.update({inverse.get(k, k): v for k, v in columns.items() if inverse.get(k, k) not in out})
    for param, values in out.items():
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"{name}: column for '{param}' has {got} values for {n} completions; repeat each prompt "
                             "row's value once per sample")
    return out


def check_scores(scores: Any, n: int, completions: list[str], name: str) -> list[float]:
    """One finite float per completion, or a one-line error naming the function (as `rl.reward_fn.call_reward_fn`)."""
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise UserError(f"{name} must return a list of numbers, got {type(scores).__name__}") from None
    if len(scores) != n:
        raise UserError(f"{name} returned {len(scores)} scores for {n} completions")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise UserError(f"{name} returned a non-finite score for completion {bad[0]}: {completions[bad[0]]!r}")
    return scores


def call(fn: Callable, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None,
         name: str = "reward function", rename: dict[str, str] | None = None) -> list[float]:
    """``fn(prompts, completions, **<the columns it declares>)``, its scores checked (one finite float each)."""
    kwargs = column_kwargs(fn, columns or {}, len(completions), name, rename)
    return check_scores(fn(prompts, completions, **kwargs), len(completions), completions, name)


def resolve(spec: str, key: str) -> Callable:
    """Import ``module:function`` (``module:Class.method`` too); one-line errors as `rl.reward_fn.load_reward_fn`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{key}: '{spec}' is not module:function; write e.g. my_package.rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{key}: cannot import module '{module_name}' ({exc}); install it or add its folder to "
                        "PYTHONPATH") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UserError(f"{key}: module '{module_name}' has no '{attr}'; check the name after the colon")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"{key}: '{spec}' is a {type(fn).__name__}, not a function")
    check_signature(fn, f"{key}: '{spec}'")
    return fn
