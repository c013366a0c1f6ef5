"""Reward functions for the stall tests (imported by the stage processes through PYTHONPATH=tests)."""

import os
import threading


def block_on_rank1(prompts, completions):
    """Scores by length, except on rank 1, where it never returns (a remote judge that hangs, on one rank only)."""
    if os.environ.get("RANK") == "1":
        threading.Event().wait()
    return [float(len(c)) for c in completions]


def fail(prompts, completions):
    raise ValueError("the reward server answered 503")
