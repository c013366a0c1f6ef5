"""Verifiable rewards (rlhf_dist.rewards): answer extraction, the shipped functions, the composite, the column convention."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from rlhf_dist.errors import UserError
from rlhf_dist.rewards import (
    SHIPPED,
    Composite,
    boxed_answer,
    call,
    declared_columns,
    describe,
    exact_match,
    extract_answer,
    extract_number,
    format_match,
    gsm8k_answer,
    last_number,
    length_penalty,
    math_answer,
    parse_number,
)

# Three rows of openai/gsm8k (config "main", split "train") in the dataset's own JSON shape.
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
                 "clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in "
               "April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did "
                 "she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
                 "parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How "
                 "much more money does Betty need to buy the wallet?",
     "answer": "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = "
               "$<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
]
GSM8K_JSONL = "\n".join(json.dumps(row) for row in GSM8K)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, span, value", [
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72", 72.0),
    ("She earned $10.\n#### $10", "$10", 10.0),
    ("The total is 1,200 dollars.\n#### 1,200", "1,200", 1200.0),
    ("#### $1,234.50.", "$1,234.50.", 1234.5),
    ("so the change is negative\n#### -3", "-3", -3.0),
    ("####0.25", "0.25", 0.25),
    ("#### 3/4", "3/4", 0.75),
    ("#### 18 dollars", "18 dollars", 18.0),
    ("#### 50%", "50%", 50.0),
    ("#### \u22124", "\u22124", -4.0),  # the Unicode minus sign
    ("first try #### 41\nno wait\n#### 42\nQuestion: next one", "42", 42.0),  # the last marker, its line only
    ("The answer is \\boxed{42}.", "42", 42.0),
    ("\\boxed{42} Therefore we are done. 17 is not it.", "42", 42.0),  # text after the box
    ("Hence \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 0.5),
    ("\\boxed{\\dfrac{3}{4}} and \\boxed{-\\frac34}", "-\\frac34", -0.75),  # the last box
    ("\\boxed{{1{,}000}}", "{1{,}000}", 1000.0),
    ("\\boxed{18 \\text{ dollars}}", "18 \\text{ dollars}", 18.0),
    ("\\boxed{x = 5}", "x = 5", 5.0),
    ("$\\boxed{\\$7.50}$", "\\$7.50", 7.5),
    ("the answer is \\boxed 7$", "7", 7.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", None),  # found, but not a number
    ("#### forty-two", "forty-two", None),
    ("#### 42 apples and 3 pears", "42 apples and 3 pears", None),
    ("I think it is 42.", None, None),  # no marker: no answer (strict)
    ("", None, None),
    ("\\boxed{42", None, None),  # cut off inside the box
])
def test_extraction(text, span, value):
    assert extract_answer(text) == span
    assert extract_number(text) == value


def test_formats_order_and_last_number_fallback():
    text = "\\boxed{41}\n#### 42"
    assert extract_number(text) == 42.0 and extract_number(text, formats=("boxed", "gsm8k")) == 41.0
    assert extract_number("so 3 + 4 = 7 apples", fallback_last_number=True) == 7.0
    assert extract_number("I had 1,234 apples and gave away 3/4 of them", fallback_last_number=True) == 0.75
    assert last_number("It costs $1,234.50 in total.") == "1,234.50" and parse_number("1,234.50") == 1234.5
    assert last_number("x2 and 3rd and -0.5") == "-0.5" and last_number("no digits") is None
    assert gsm8k_answer("no marker") is None and boxed_answer("\\boxedfoo{1}") is None


@pytest.mark.parametrize("span, value", [
    ("72", 72.0), ("-3.5", -3.5), (".5", 0.5), ("+2", 2.0), ("1,000,000", 1e6), ("3/4", 0.75), ("-3/4", -0.75),
    ("\\frac{1}{3}", 1 / 3), ("\\tfrac12", 0.5), ("\\frac{-1}{2}", -0.5), ("{42}", 42.0), ("42.", 42.0),
    ("1/0", None), ("\\frac{1}{0}", None), ("2+3", None), ("x^2", None), ("3.5.2", None), ("", None), (None, None),
])
def test_parse_number(span, value):
    assert parse_number(span) == value


# --------------------------------------------------------------------------------------------------------------
# math_answer
# --------------------------------------------------------------------------------------------------------------
def test_math_answer_on_gsm8k_rows_takes_the_reference_from_the_answer_column_as_shipped():
    rows = [json.loads(line) for line in GSM8K_JSONL.splitlines()]
    prompts = [r["question"] for r in rows]
    completions = ["48/2 = 24 in May, 72 in all.\n#### 72", "She earned \\boxed{10} dollars.", "She needs 5 more."]
    assert math_answer(prompts, completions, answer=[r["answer"] for r in rows]) == [1.0, 1.0, 0.0]
    assert math_answer(prompts, completions, answer=[72, "10", "5"], fallback_last_number=True) == [1.0, 1.0, 1.0]


def test_math_answer_tolerance_edges_and_scores():
    def score(completion, reference, **kw):
        return math_answer(["q"], [completion], answer=[reference], **kw)[0]

    assert score("#### 0.3333333", "\\frac{1}{3}") == 1.0  # off by 3e-8: within 1e-6
    assert score("#### 0.33", "1/3") == 0.0
    assert score("#### 0.33", "1/3", tolerance=0.01) == 1.0  # relative: |0.33 - 1/3| = 0.0033 <= 0.01 * 1/3
    assert score("#### 0.33", "1/3", tolerance=0.005) == 0.0  # 0.0033 > 0.005 * 1/3
    assert score("#### 1000001", "1000000") == 1.0  # relative 1e-6 of a million is 1
    assert score("#### 1000002", "1000000") == 0.0
    assert score("#### 0", "0.0") == 1.0 and score("#### 0.0000005", "0") == 0.0  # relative: nothing is close to 0 but 0
    assert score("#### 0.0000005", "0", abs_tolerance=1e-6) == 1.0 and score("#### 0.000002", "0", abs_tolerance=1e-6) == 0.0
    assert score("#### 72.0", "72") == 1.0 and score("#### 72", "72.0") == 1.0
    assert score("#### 72", "72", tolerance=0) == 1.0 and score("#### 72.0000001", "72", tolerance=0) == 0.0
    scores = dict(correct=2.0, wrong=-0.5, no_answer=-1.0)
    assert [score(c, "7", **scores) for c in ("#### 7", "#### 8", "it is 7")] == [2.0, -0.5, -1.0]


def test_math_answer_unreadable_reference_and_bad_settings_are_one_line():
    assert "reference answer of completion 0 is not a number: 'seventy'" in one_line_error(
        math_answer, ["q"], ["#### 70"], answer=["seventy"])
    assert "tolerance must be a finite number >= 0, got -1" in one_line_error(math_answer, [], [], answer=[], tolerance=-1)
    assert "formats must be a list of gsm8k, boxed" in one_line_error(math_answer, [], [], answer=[], formats="boxed")
    assert "column 'answer' must give one value per completion (2), got 1 values" in one_line_error(
        math_answer, ["a", "b"], ["x", "y"], answer=["1"])


# --------------------------------------------------------------------------------------------------------------
# exact_match, format, length_penalty
# --------------------------------------------------------------------------------------------------------------
def test_exact_match_normalisation():
    def em(completion, reference, **kw):
        return exact_match(["q"], [completion], answer=[reference], **kw)[0]

    assert em("  Paris \n", "paris") == 1.0  # case and surrounding/inner whitespace
    assert em("New   York", "new york") == 1.0
    assert em("Paris", "paris", ignore_case=False) == 0.0
    assert em("New   York", "New York", collapse_whitespace=False) == 0.0
    assert em("Paris.", "paris") == 0.0 and em("Paris.", "paris", ignore_punctuation=True) == 1.0
    assert em("NYC", ["New York", "nyc"]) == 1.0  # a list of accepted answers
    demo = r"^[^.!?]*?\b(\w+)\s*[.!?]"  # the demo's: the last word of the first sentence
    assert em(" Orin grows barley. I hope that helps!", "barley", extract=demo) == 1.0
    assert em(" The people of Orin raise goats. Go away.", "oats", extract=demo) == 0.0
    assert em(" I will not tell you", "barley", extract=demo, no_answer=-1.0) == -1.0  # no sentence: no answer
    assert em("Answer: 4\nAnswer: 5", "5", extract=r"Answer:\s*(\S+)") == 1.0  # the last match
    assert "extract '(' is not a valid regular expression" in one_line_error(exact_match, [], [], answer=[], extract="(")
    assert "ignore_case must be true or false" in one_line_error(exact_match, [], [], answer=[], ignore_case="yes")


def test_format_match_modes():
    completions = ["<think>a\nb</think> 42", "  <think>x</think> 7  ", "so <think></think> 1"]
    pattern = r"<think>.*</think> \d+"
    assert format_match([], completions, pattern=pattern) == [0.0, 1.0, 1.0]  # '.' does not cross lines
    assert format_match([], completions, pattern=pattern, flags="s") == [1.0, 1.0, 1.0]
    assert format_match([], completions, pattern=pattern, flags="s", mode="full") == [1.0, 1.0, 0.0]
    assert format_match([], completions, pattern=pattern, flags="s", mode="match") == [1.0, 0.0, 0.0]
    assert format_match([], ["#### 42", "42"], pattern=r"#### -?\d+", matched=0.5, unmatched=-0.5) == [0.5, -0.5]
    assert "mode must be one of search, match, full; got 'fullmatch'" in one_line_error(
        format_match, [], [], pattern="x", mode="fullmatch")
    assert "flags must be letters of 'imsx'" in one_line_error(format_match, [], [], pattern="x", flags="g")


def test_length_penalty_by_hand():
    words = ["w " * n for n in (0, 5, 10, 15, 20, 40)]
    assert length_penalty([], words, limit=10) == [0.0, 0.0, 0.0, -0.5, -1.0, -1.0]  # (n - 10) / 10, saturating at -1
    assert length_penalty([], words, limit=10, scale=0.2) == pytest.approx([0, 0, 0, -0.1, -0.2, -0.2])
    assert length_penalty([], words, target=10) == [-1.0, -0.5, 0.0, -0.5, -1.0, -1.0]  # |n - 10| / 10
    assert length_penalty([], ["abcdef", "abc"], limit=4, unit="chars") == [-0.5, 0.0]
    assert "set exactly one of limit" in one_line_error(length_penalty, [], [], limit=1, target=2)
    assert "limit must be a finite number > 0, got 0" in one_line_error(length_penalty, [], [], limit=0)


# --------------------------------------------------------------------------------------------------------------
# Columns as keyword arguments
# --------------------------------------------------------------------------------------------------------------
def test_call_passes_exactly_the_declared_columns():
    seen = {}

    def needs_answer(prompts, completions, *, answer, strict=True):  # strict has a default: a setting
        seen["answer"], seen["strict"] = answer, strict
        return [float(c == a) for c, a in zip(completions, answer)]

    def takes_all(prompts, completions, **kwargs):  # TRL style: every column
        seen["all"] = sorted(kwargs)
        return [0.0] * len(completions)

    columns = {"answer": ["1", "2"], "strict": [False, False], "source": ["a", "b"]}
    assert call(needs_answer, ["p", "q"], ["1", "3"], columns) == [1.0, 0.0]
    assert seen["answer"] == ["1", "2"] and seen["strict"] is True  # the 'strict' column does not reach the setting
    assert call(takes_all, ["p", "q"], ["1", "3"], columns) == [0.0, 0.0] and seen["all"] == ["answer", "source", "strict"]
    assert call(lambda p, c: [1] * len(c), ["p"], ["x"]) == [1.0]  # the plain (prompts, completions) function
    assert declared_columns(needs_answer) == (["answer"], False) and declared_columns(math_answer) == (["answer"], False)
    assert call(needs_answer, ["p"], ["1"], {"solution": ["1"]}, rename={"answer": "solution"}) == [1.0]


def test_a_missing_column_fails_naming_it_and_the_fix():
    text = one_line_error(call, math_answer, ["p"], ["#### 1"], {"question": ["q"]}, "ppo.rewards[0] (math_answer)")
    assert text == ("ppo.rewards[0] (math_answer): needs the column 'answer' of the prompt data, which has question; add it "
                    "to the data, or map one of yours to it with the reward's columns: {answer: your_column}")
    text = one_line_error(call, math_answer, ["p"], ["#### 1"], {"answer": ["1"]}, rename={"answer": "solution"})
    assert "needs the column 'solution' (its parameter 'answer') of the prompt data, which has answer" in text
    with pytest.raises(ValueError, match="column for 'answer' has 1 values for 2 completions"):
        call(math_answer, ["p", "q"], ["#### 1", "#### 2"], {"answer": ["1"]})
    assert "returned 1 scores for 2 completions" in one_line_error(call, lambda p, c: [1.0], ["a", "b"], ["x", "y"])
    assert "non-finite score for completion 0" in one_line_error(call, lambda p, c: [float("inf")], ["a"], ["x"])


# --------------------------------------------------------------------------------------------------------------
# Composite
# --------------------------------------------------------------------------------------------------------------
def test_composite_weighted_sum_and_per_component_scores():
    reward = Composite([
        {"name": "math_answer", "weight": 1.0},
        {"name": "format", "weight": 0.2, "kwargs": {"pattern": r"#### *-?[0-9.,]+\s*$"}},
        {"name": "length_penalty", "weight": 0.5, "kwargs": {"limit": 10}},
        {"name": "reward_model", "weight": 0.1},
        {"name": "test_verifiable_rewards:says_please", "weight": 0, "label": "please"},  # logged only
    ])
    assert reward.needs_model and reward.columns == ["answer"]
    rows = [json.loads(line) for line in GSM8K_JSONL.splitlines()]
    completions = ["24 in May, 72 in all. please\n#### 72", "She earned \\boxed{10}.",
                   "Betty needs 100 - 50 - 30 - 15 = 5 more dollars in all.\n#### 6"]
    out = reward([r["question"] for r in rows], completions, {"answer": [r["answer"] for r in rows]},
                 model_scores=[0.5, -1.0, 2.0])
    assert out.components == {"math_answer": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0],
                              "length_penalty": [0.0, 0.0, -0.7], "reward_model": [0.5, -1.0, 2.0], "please": [1.0, 0.0, 0.0]}
    assert out.total == pytest.approx([1 + 0.2 + 0.05, 1 - 0.1, 0.2 - 0.35 + 0.2])
    assert out.means() == pytest.approx({"reward/math_answer": 2 / 3, "reward/format": 2 / 3, "reward/length_penalty": -0.7 / 3,
                                         "reward/reward_model": 0.5, "reward/please": 1 / 3})
    assert out.weights["please"] == 0.0


def says_please(prompts, completions):
    return [float("please" in c) for c in completions]


def per_row_bonus(prompts, completions, *, bonus, scale=1.0):
    return [scale * float(b) for b in bonus]


def test_composite_columns_mapping_and_user_function_columns():
    reward = Composite([{"name": "math_answer", "columns": {"answer": "solution"}},
                        {"name": "test_verifiable_rewards:per_row_bonus", "weight": 2, "kwargs": {"scale": 0.5}}])
    assert reward.columns == ["solution", "bonus"] and not reward.needs_model
    out = reward(["p", "q"], ["\\boxed{3}", "#### 4"], {"solution": ["\\boxed{3}", "5"], "bonus": [1, 0]})
    assert out.total == [2.0, 0.0] and out.components == {"math_answer": [1.0, 0.0], "per_row_bonus": [0.5, 0.0]}
    reward.check_columns(["prompt", "solution", "bonus"])
    text = one_line_error(reward.check_columns, ["prompt", "question", "answer", "bonus"])
    assert text == ("ppo.rewards[0] (math_answer): needs the column 'solution' of ppo.data, which has answer, bonus, prompt, "
                    "question; add it, or map one of yours with the component's columns: {solution: your_column}")
    with pytest.raises(ValueError, match="needs the reward model's scores"):
        Composite([{"name": "reward_model"}])(["p"], ["c"])
    with pytest.raises(ValueError, match="no component is the reward_model"):
        Composite([{"name": "format", "kwargs": {"pattern": "x"}}])(["p"], ["c"], model_scores=[1.0])


@pytest.mark.parametrize("spec, message", [
    ({"name": "math_answer"}, "ppo.rewards: must be a non-empty list of components, e.g. [{name: math_answer, weight: 1.0}], "
                              "got {'name': 'math_answer'}"),
    ([], "ppo.rewards: must be a non-empty list of components"),
    ([3], "ppo.rewards[0]: a component is a mapping {name, weight, kwargs}, got 3"),
    ([{"name": "math_anwser"}], "ppo.rewards[0]: unknown reward 'math_anwser'; did you mean 'math_answer'? choose from "
                                "math_answer, exact_match, format, length_penalty, reward_model, or name your own function "
                                "as module:function"),
    ([{"name": "bleu"}], "ppo.rewards[0]: unknown reward 'bleu'; choose from math_answer, exact_match, format"),
    ([{"weight": 1}], "ppo.rewards[0]: no name; set name to one of math_answer, exact_match, format, length_penalty, "
                      "reward_model, or module:function"),
    ([{"name": "math_answer", "wieght": 1}], "ppo.rewards[0]: unknown key 'wieght'; did you mean 'weight'? a component takes "
                                             "name, weight, kwargs, columns, label"),
    ([{"name": "math_answer", "weight": "high"}], "ppo.rewards[0] (math_answer): weight must be a finite number, got 'high'"),
    ([{"name": "math_answer", "weight": float("nan")}], "ppo.rewards[0] (math_answer): weight must be a finite number, got nan"),
    ([{"name": "math_answer", "weight": True}], "ppo.rewards[0] (math_answer): weight must be a finite number, got True"),
    ([{"name": "math_answer", "weight": 0}], "ppo.rewards: every weight is 0, so the reward is always 0"),
    ([{"name": "math_answer", "kwargs": {"tolerence": 0.1}}],
     "ppo.rewards[0] (math_answer): unknown kwarg 'tolerence'; did you mean 'tolerance'? math_answer takes tolerance, "
     "abs_tolerance, formats, fallback_last_number, correct, wrong, no_answer"),
    ([{"name": "math_answer", "kwargs": {"answer": "42"}}],
     "ppo.rewards[0] (math_answer): 'answer' is read from the prompt data, not set in kwargs; map a column to it with "
     "columns: {answer: your_column}"),
    ([{"name": "math_answer", "kwargs": {"tolerance": -1}}],
     "ppo.rewards[0] (math_answer): tolerance must be a finite number >= 0, got -1"),
    ([{"name": "math_answer", "kwargs": [1]}], "ppo.rewards[0] (math_answer): kwargs must be a mapping of names to values"),
    ([{"name": "math_answer", "columns": {"anwser": "solution"}}],
     "ppo.rewards[0] (math_answer): columns maps 'anwser', which math_answer does not read; it reads answer"),
    ([{"name": "format"}], "ppo.rewards[0] (format): missing kwargs.pattern; e.g. kwargs: {pattern: ...}"),
    ([{"name": "format", "kwargs": {"pattern": "(#### "}}],
     "ppo.rewards[0] (format): pattern '(#### ' is not a valid regular expression (missing ), unterminated subpattern"),
    ([{"name": "length_penalty", "kwargs": {"limit": 100, "target": 50}}],
     "ppo.rewards[0] (length_penalty): set exactly one of limit (penalise beyond it) and target"),
    ([{"name": "reward_model", "kwargs": {"scale": 2}}],
     "ppo.rewards[0] (reward_model): takes no kwargs or columns; the PPO loop scores it with the reward model"),
    ([{"name": "format", "kwargs": {"pattern": "a"}}, {"name": "format", "kwargs": {"pattern": "b"}}],
     "ppo.rewards[1]: two components log as 'format' (reward/format); give one a label"),
    ([{"name": "math_answer", "label": ""}], "ppo.rewards[0] (math_answer): label must be a non-empty string, got ''"),
    ([{"name": "no_colon.here"}], "ppo.rewards[0]: unknown reward 'no_colon.here'"),
    ([{"name": "rlhf_dist.no_such_module:f"}], "ppo.rewards[0]: cannot import module 'rlhf_dist.no_such_module'"),
    ([{"name": "rlhf_dist.demo.rewards:missing"}], "ppo.rewards[0]: module 'rlhf_dist.demo.rewards' has no 'missing'"),
    ([{"name": "rlhf_dist.demo.synthetic:prompt_text"}],
     "ppo.rewards[0]: 'rlhf_dist.demo.synthetic:prompt_text': must accept (prompts, completions)"),
    ([{"name": "test_verifiable_rewards:per_row_bonus", "kwargs": {"scael": 1}}],
     "ppo.rewards[0] (test_verifiable_rewards:per_row_bonus): unknown kwarg 'scael'; did you mean 'scale'?"),
])
def test_every_spec_error_is_one_line(spec, message):
    text = one_line_error(Composite, spec)
    assert text.startswith(message), text


def test_a_module_function_component_that_declares_a_column_loads_and_the_demo_reward_still_works():
    reward = Composite([{"name": "rlhf_dist.demo.rewards:politeness", "weight": 1.0}])
    assert reward.components[0].label == "politeness" and reward.columns == []
    out = reward(["Question: What does Orin grow?\nAnswer:"], [" Orin grows rye. Go away."])
    assert out.components["politeness"] == [out.total[0]]


def test_registry_names_and_docs_and_no_torch_at_import():
    assert list(SHIPPED) == ["math_answer", "exact_match", "format", "length_penalty"]
    assert all(entry.doc and "\n" not in entry.doc for entry in SHIPPED.values())
    assert describe().splitlines()[0].startswith("math_answer: 1 if the final answer")
    code = "import sys, rlhf_dist.rewards; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------------------
# The demo's verifiable task
# --------------------------------------------------------------------------------------------------------------
def test_demo_verifiable_task(tmp_path):
    from rlhf_dist.demo import synthetic as S

    sizes = dict(seed=0, n_pretrain=50, n_sft=40, n_pref=40, n_prompts=20)
    with_task = S.generate(tmp_path / "a", n_verifiable=64, **sizes)
    without = S.generate(tmp_path / "b", n_verifiable=0, **sizes)
    for name in ("pretrain", "sft", "preference", "prompts"):  # the new file leaves the others byte for byte
        assert with_task[name].read_bytes() == without[name].read_bytes(), name
    rows = [json.loads(line) for line in with_task["verifiable"].read_text().splitlines()]
    assert len(rows) == 64 and all(set(r) == {"prompt", "answer"} for r in rows)
    world = S.World.make(0)
    villages = S.verifiable_villages(world)
    assert len(villages) == S.VERIFIABLE_VILLAGES
    for attr in S.QUESTIONS:  # no answer is right for two villages: a constant guess does not pay
        assert len({world.facts[v][attr] for v in villages}) == len(villages)
    assert {r["prompt"] for r in rows} <= {S.prompt_text(q.format(v=v)) for v in villages for qs in S.QUESTIONS.values()
                                          for q in qs}
    reward = Composite([{"name": "exact_match", "kwargs": {"extract": S.VERIFIABLE_EXTRACT}}])
    rng = random.Random(0)
    for v in villages:
        for attr in S.QUESTIONS:
            fact, other = world.facts[v][attr], world.wrong(rng, v, attr)
            right = S.good_answer(rng, world, v, attr)  # " Orin grows pears. Happy to help."
            wrong = " " + S.ANSWERS[attr].format(v=v, x=other) + " " + S.POLITE[0]
            refusal = " " + S.REFUSALS[0] + " " + S.RUDE[0]
            assert reward(["q"] * 3, [right, wrong, refusal], {"answer": [fact] * 3}).total == [1.0, 0.0, 0.0], right
