"""A rule-based reward for the demo world (the RLAIF route without a reward model).

    ppo.reward_fn: rlhf_dist.demo.rewards:politeness

+1 for each polite phrase, -1 for each rude phrase or refusal, and +1 when the answer states the
correct fact about the village asked about. It scores what the demo's preference data prefers,
so a policy trained on it should move the same way as one trained on the demo's reward model.
"""

from __future__ import annotations

import re

from rlhf_dist.demo.synthetic import POLITE, REFUSALS, RUDE, World

_WORLD = World.make(0)
_VILLAGE = re.compile(r"\b(" + "|".join(_WORLD.facts) + r")\b")


def politeness(prompts: list[str], completions: list[str]) -> list[float]:
    scores = []
    for prompt, completion in zip(prompts, completions):
        score = sum(phrase in completion for phrase in POLITE)
        score -= sum(phrase in completion for phrase in RUDE + REFUSALS)
        asked = _VILLAGE.search(prompt)
        words = set(re.findall(r"[A-Za-z]+", completion))  # whole words: "oats" is not in "goats"
        if asked and words & set(_WORLD.facts[asked.group(1)].values()):
            score += 1
        scores.append(float(score))
    return scores
