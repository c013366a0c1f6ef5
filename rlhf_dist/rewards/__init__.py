"""Verifiable rewards: shipped reward functions, a composite of them (and the reward model), and how they are called.

Shipped (`SHIPPED`, by the name a recipe uses; `describe()` prints them with their one-line docs):

* ``math_answer`` - the final answer (``#### 42`` or ``\\boxed{42}``) equals the reference number within tolerance;
* ``exact_match`` - the completion (or a regex's capture) equals the reference, normalised;
* ``format`` - the completion matches a regex;
* ``length_penalty`` - a penalty beyond a length limit (or away from a target length).

Reference answers come from the prompt rows: a reward function declares the columns it reads as keyword
parameters without defaults (``def math_answer(prompts, completions, *, answer, tolerance=1e-6)``) and `call`
passes them, one value per completion (TRL's GRPOTrainer convention; see `calling`). `Composite` is the weighted
sum of components ``{name, weight, kwargs, columns, label}``, checked up front, with each component's scores kept
for the log (``reward/<label>``). Pure Python: importing this package imports neither torch nor transformers.

    from rlhf_dist.rewards import Composite
    reward = Composite([{"name": "math_answer", "weight": 1.0}, {"name": "reward_model", "weight": 0.5}])
    reward.check_columns(["prompt", "answer"])            # before training
    out = reward(prompts, completions, columns={"answer": answers}, model_scores=rm_scores)
    out.total, out.means()                                  # rewards to train on; {"reward/math_answer": ..., ...}
"""

from rlhf_dist.rewards.calling import call, declared_columns, resolve
from rlhf_dist.rewards.composite import Component, Composite, CompositeScores
from rlhf_dist.rewards.extract import boxed_answer, extract_answer, extract_number, gsm8k_answer, last_number, parse_number
from rlhf_dist.rewards.functions import exact_match, format_match, length_penalty, math_answer
from rlhf_dist.rewards.shipped import REWARD_MODEL, SHIPPED, Shipped, describe

__all__ = [
    "REWARD_MODEL", "SHIPPED", "Component", "Composite", "CompositeScores", "Shipped", "boxed_answer", "call",
    "declared_columns", "describe", "exact_match", "extract_answer", "extract_number", "format_match", "gsm8k_answer",
    "last_number", "length_penalty", "math_answer", "parse_number", "resolve",
]
