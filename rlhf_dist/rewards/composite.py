"""A composite reward: the weighted sum of named reward functions and/or the reward model, each component kept.

A recipe lists components (here under ``ppo.rewards``)::

    - {name: math_answer, weight: 1.0}
    - {name: format, weight: 0.2, kwargs: {pattern: '#### *-?[0-9.,]+\\s*$'}}
    - {name: my_pkg.rewards:brevity, weight: 0.1, label: brevity}
    - {name: reward_model, weight: 0.5}

Keys: ``name`` (a shipped name, ``reward_model``, or ``module:function``), ``weight`` (a finite number, default 1;
0 logs a component without training on it), ``kwargs`` (settings passed to the function, checked against its
signature), ``columns`` (``{parameter: data_column}`` when the data names a column differently, e.g.
``{answer: solution}``), ``label`` (the log name, ``reward/<label>``; default the name, or the function's name).

Everything is checked when the `Composite` is built (before any model loads); shipped functions also check their
settings' values then. The reward model component is scored by the loop, which holds the model: it passes those
scores in (``model_scores``), and the composite adds them with their weight like any other component.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from rlhf_dist.errors import UserError
from rlhf_dist.rewards.calling import call, check_scores, declared_columns, resolve
from rlhf_dist.rewards.shipped import REWARD_MODEL, SHIPPED

KEYS = ("name", "weight", "kwargs", "columns", "label")


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


@dataclass(frozen=True)
class Component:
    label: str  # logged as reward/<label>
    name: str  # shipped name, module:function, or reward_model
    weight: float
    fn: Callable | None = None  # the function with its kwargs bound; None for the reward model
    columns: dict[str, str] = field(default_factory=dict)  # parameter -> data column (only renamed ones)

    @property
    def data_columns(self) -> list[str]:
        """The prompt-data columns this component reads."""
        if self.fn is None:
            return []
        return [self.columns.get(p, p) for p in declared_columns(self.fn)[0]]


@dataclass
class CompositeScores:
    total: list[float]  # the weighted sum, one per completion: the reward to train on
    components: dict[str, list[float]]  # label -> that component's own (unweighted) scores
    weights: dict[str, float]

    def means(self, prefix: str = "reward/") -> dict[str, float]:
        """``{reward/<label>: mean unweighted score}`` for the log."""
        return {prefix + label: (sum(s) / len(s) if s else 0.0) for label, s in self.components.items()}


class Composite:
    """The weighted sum of `components` (see the module doc); call it with the rows' columns and the model's scores."""

    def __init__(self, spec: Any, key: str = "ppo.rewards"):
        self.key = key
        if isinstance(spec, (str, dict)) or not isinstance(spec, (list, tuple)) or not spec:
            raise UserError(f"{key}: must be a non-empty list of components, e.g. [{{name: math_answer, weight: 1.0}}], "
                            f"got {spec!r}")
        self.components: list[Component] = []
        for i, item in enumerate(spec):
            component = self._component(item, f"{key}[{i}]")
            if any(c.label == component.label for c in self.components):
                raise UserError(f"{key}[{i}]: two components log as '{component.label}' (reward/{component.label}); "
                                "give one a label")
            self.components.append(component)
        if all(c.weight == 0 for c in self.components):
            raise UserError(f"{key}: every weight is 0, so the reward is always 0; give a component a non-zero weight")

    # -- building -------------------------------------------------------------------------------------------------
    def _component(self, item: Any, where: str) -> Component:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise UserError(f"{where}: a component is a mapping {{name, weight, kwargs}}, got {item!r}")
        unknown = [k for k in item if k not in KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}'; {_hint(unknown[0], KEYS)}a component takes "
                            f"{', '.join(KEYS)}")
        name = item.get("name")
        known = [*SHIPPED, REWARD_MODEL]
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: no name; set name to one of {', '.join(known)}, or module:function")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"{where} ({name}): weight must be a finite number, got {weight!r}")
        kwargs, columns = item.get("kwargs") or {}, item.get("columns") or {}
        for what, value in (("kwargs", kwargs), ("columns", columns)):
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise UserError(f"{where} ({name}): {what} must be a mapping of names to values, got {value!r}")
        if not all(isinstance(v, str) and v for v in columns.values()):
            raise UserError(f"{where} ({name}): columns maps parameters to column names (strings), got {columns!r}")
        label = item.get("label", name.rpartition(":")[2].rpartition(".")[2] if ":" in name else name)
        if not isinstance(label, str) or not label.strip():
            raise UserError(f"{where} ({name}): label must be a non-empty string, got {label!r}")
        if name == REWARD_MODEL:
            if kwargs or columns:
                raise UserError(f"{where} ({name}): takes no kwargs or columns; the PPO loop scores it with the reward "
                                "model (ppo.reward_model)")
            return Component(label, name, float(weight))
        if name in SHIPPED:
            fn, reads = SHIPPED[name].fn, SHIPPED[name].columns
        elif ":" in name:
            fn, reads = resolve(name, where), None
        else:
            raise UserError(f"{where}: unknown reward '{name}'; {_hint(name, known)}choose from {', '.join(known)}, or "
                            "name your own function as module:function")
        bound = self._bind(fn, name, kwargs, reads, where)
        self._check_columns_map(bound, name, columns, where)
        return Component(label, name, float(weight), bound, dict(columns))

    @staticmethod
    def _bind(fn: Callable, name: str, kwargs: dict, reads: tuple[str, ...] | None, where: str) -> Callable:
        """`fn` with `kwargs` bound, after checking them against its signature (and, if shipped, their values)."""
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return functools.partial(fn, **kwargs) if kwargs else fn
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
        settings = [p.name for p in params if p.name not in positional and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and (reads is None or p.name not in reads)]
        for k in kwargs:
            if reads is not None and k in reads:
                raise UserError(f"{where} ({name}): '{k}' is read from the prompt data, not set in kwargs; map a column "
                                f"to it with columns: {{{k}: your_column}}")
            if k not in settings and not takes_any:
                takes = ", ".join(settings) or "no settings"
                raise UserError(f"{where} ({name}): unknown kwarg '{k}'; {_hint(k, settings)}{name} takes {takes}")
        if reads is None:
            return functools.partial(fn, **kwargs) if kwargs else fn
        required = [p.name for p in params if p.name in settings and p.default is p.empty]
        missing = [p for p in required if p not in kwargs]
        if missing:
            raise UserError(f"{where} ({name}): missing kwargs.{missing[0]}; e.g. kwargs: {{{missing[0]}: ...}}")
        bound = functools.partial(fn, **kwargs)
        try:  # a dry run on no rows checks the settings' values (a shipped function checks them first)
            bound([], [], **{c: [] for c in reads})
        except UserError as exc:
            message = str(exc)
            raise UserError(f"{where} ({name}): {message.partition(': ')[2] or message}") from None
        return bound

    @staticmethod
    def _check_columns_map(fn: Callable, name: str, columns: dict[str, str], where: str) -> None:
        reads, takes_all = declared_columns(fn)
        for param in columns:
            if param not in reads and not takes_all:
                it_reads = f"it reads {', '.join(reads)}" if reads else "it reads no column"
                raise UserError(f"{where} ({name}): columns maps '{param}', which {name} does not read; {it_reads}")

    # -- using ----------------------------------------------------------------------------------------------------
    @property
    def needs_model(self) -> bool:
        """Whether the loop must score completions with the reward model and pass them as ``model_scores``."""
        return any(c.fn is None for c in self.components)

    @property
    def columns(self) -> list[str]:
        """The prompt-data columns the components read (the loop carries them from each prompt row)."""
        out: list[str] = []
        for c in self.components:
            out += [col for col in c.data_columns if col not in out]
        return out

    def check_columns(self, available: Iterable[str], source: str = "ppo.data") -> None:
        """Fail in one line, before training, when the prompt data lacks a column a component reads."""
        have = set(available)
        for i, c in enumerate(self.components):
            for col in c.data_columns:
                if col not in have:
                    raise UserError(f"{self.key}[{i}] ({c.name}): needs the column '{col}' of {source}, which has "
                                    f"{', '.join(sorted(have)) or 'no columns'}; add it, or map one of yours with the "
                                    f"component's columns: {{{col}: your_column}}")

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None,
                 model_scores: list[float] | None = None) -> CompositeScores:
        """Score every component (the reward model's scores come in as `model_scores`) and sum them with weights."""
        n = len(completions)
        if self.needs_model and model_scores is None:
            raise ValueError(f"{self.key}: the reward_model component needs the reward model's scores (model_scores=)")
        if model_scores is not None and not self.needs_model:
            raise ValueError(f"{self.key}: model_scores given, but no component is the reward_model")
        parts: dict[str, list[float]] = {}
        for i, c in enumerate(self.components):
            name = f"{self.key}[{i}] ({c.name})"
            if c.fn is None:
                parts[c.label] = check_scores(model_scores, n, completions, name)
            else:
                parts[c.label] = call(c.fn, prompts, completions, columns or {}, name, c.columns)
        total = [0.0] * n
        for c in self.components:
            total = [t + c.weight * s for t, s in zip(total, parts[c.label])]
        return CompositeScores(total, parts, {c.label: c.weight for c in self.components})
