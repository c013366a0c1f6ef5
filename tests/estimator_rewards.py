"""Reward functions for the estimator tests (the stage processes import them through PYTHONPATH=tests)."""


def half_constant(prompts, completions):
    """0 for every response to a prompt whose characters sum to an even number (all of its group equal: no signal),
    else the number of words of the response (varied)."""
    return [0.0 if sum(map(ord, p)) % 2 == 0 else float(len(c.split())) for p, c in zip(prompts, completions)]
