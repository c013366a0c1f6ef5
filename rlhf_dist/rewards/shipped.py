"""The reward functions a recipe can name without writing code, each with a one-line doc."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rlhf_dist.rewards.functions import exact_match, format_match, length_penalty, math_answer


@dataclass(frozen=True)
class Shipped:
    fn: Callable
    doc: str  # one line
    columns: tuple[str, ...] = ()  # the prompt-data columns it reads; its other required arguments are settings (kwargs)


SHIPPED: dict[str, Shipped] = {
    "math_answer": Shipped(math_answer, "1 if the final answer (#### N or \\boxed{N}) equals the answer column's number "
                                        "within tolerance, else 0", ("answer",)),
    "exact_match": Shipped(exact_match, "1 if the completion (or its extract regex's capture) equals the answer column, "
                                        "case and whitespace normalised, else 0", ("answer",)),
    "format": Shipped(format_match, "1 if the completion matches the regex kwargs.pattern (search, match or full), else 0"),
    "length_penalty": Shipped(length_penalty, "0 within kwargs.limit words (or at kwargs.target), falling linearly to "
                                              "-scale at twice the limit"),
}

REWARD_MODEL = "reward_model"
REWARD_MODEL_DOC = "the reward model's score (computed by the PPO loop, which holds the model)"


def describe() -> str:
    """One line per name, for help texts and error messages."""
    lines = [f"{name}: {entry.doc}" for name, entry in SHIPPED.items()]
    return "\n".join(lines + [f"{REWARD_MODEL}: {REWARD_MODEL_DOC}", "module:function: your own reward function"])
