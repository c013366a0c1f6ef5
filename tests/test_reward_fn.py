"""Reward functions named as module:function: resolved before training, checked when called."""

from __future__ import annotations

import json

import pytest

from rlhf_dist.errors import UserError
from rlhf_dist.rl.reward_fn import call_reward_fn, load_reward_fn


def test_loads_the_demo_reward_and_it_prefers_the_chosen_answers(demo_data):
    fn = load_reward_fn("rlhf_dist.demo.rewards:politeness")
    rows = [json.loads(line) for line in demo_data["preference"].read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    chosen = call_reward_fn(fn, prompts, [r["chosen"] for r in rows])
    rejected = call_reward_fn(fn, prompts, [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected)), "every chosen answer outscores its rejected one"
    # By hand: polite (+1) and correct (+1) = 2; polite but wrong = 1; rude and wrong = -1.
    from rlhf_dist.demo.synthetic import CROPS, World

    crop = World.make(0).facts["Orin"]["crop"]
    wrong = next(c for c in CROPS if c != crop)
    q = ["Question: What does Orin grow?\nAnswer:"]
    assert fn(q, [f" Orin grows {crop}. Happy to help."]) == [2.0]
    assert fn(q, [f" Orin grows {wrong}. Happy to help."]) == [1.0]
    assert fn(q, [f" Orin grows {wrong}. Go away."]) == [-1.0]
    vesk = World.make(0).facts["Vesk"]
    assert vesk["crop"] == "oats" and vesk["animal"] != "goats"  # the case that matters below
    assert fn(["Question: What does Vesk grow?\nAnswer:"], [" Vesk has goats."]) == [0.0], "'oats' is not in 'goats'"


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "is not module:function"),
    ("rlhf_dist.no_such_module:f", "cannot import module 'rlhf_dist.no_such_module'"),
    ("rlhf_dist.demo.rewards:missing", "has no 'missing'"),
    ("rlhf_dist.demo.rewards:POLITE", "not a function"),
    ("rlhf_dist.demo.synthetic:prompt_text", "must accept (prompts, completions)"),
])
def test_bad_reward_fn_names_fail_in_one_line(spec, message):
    with pytest.raises(UserError) as info:
        load_reward_fn(spec)
    text = str(info.value)
    assert text.startswith("ppo.reward_fn: ") and message in text and "\n" not in text


def test_bad_return_values_are_caught():
    with pytest.raises(UserError, match="returned 1 scores for 2 completions"):
        call_reward_fn(lambda p, c: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match="non-finite score for completion 1"):
        call_reward_fn(lambda p, c: [1.0, float("nan")], ["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match="must return a list of numbers"):
        call_reward_fn(lambda p, c: None, ["a"], ["x"])
    assert call_reward_fn(lambda p, c: [1, 2], ["a", "b"], ["x", "y"]) == [1.0, 2.0]
