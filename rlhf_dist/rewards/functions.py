"""The shipped verifiable reward functions: math answer, exact match, format (regex), length penalty.

Each is an ordinary reward function, ``f(prompts, completions, *, <columns>, <settings>) -> list[float]``:

* a required keyword argument without a default names a column of the prompt data, one value per completion
  (``answer``: the reference of each completion's prompt row; see `rlhf_dist.rewards.calling`);
* keyword arguments with defaults are settings (a composite component's ``kwargs``); they are never read from data.

Each checks its settings before looking at any row, so calling it on empty lists validates them: `Composite`
does exactly that when it is built, before any model loads.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

from rlhf_dist.errors import UserError
from rlhf_dist.rewards.extract import EXTRACTORS, FORMATS, extract_answer, parse_number, reference_number


def _number(value: Any, name: str, fn: str, minimum: float | None = None, above: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if above else value >= minimum
    if not ok:
        bound = "" if minimum is None else (f" > {minimum:g}" if above else f" >= {minimum:g}")
        raise UserError(f"{fn}: {name} must be a finite number{bound}, got {value!r}")
    return float(value)


def _bool(value: Any, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{fn}: {name} must be true or false, got {value!r}")
    return value


def _choice(value: Any, name: str, fn: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"{fn}: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _regex(pattern: Any, name: str, fn: str, flags: int = 0) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise UserError(f"{fn}: {name} must be a regular expression (a non-empty string), got {pattern!r}")
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise UserError(f"{fn}: {name} {pattern!r} is not a valid regular expression ({exc})") from None


def _flags(flags: Any, fn: str) -> int:
    table = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
    if not isinstance(flags, str) or set(flags) - set(table):
        raise UserError(f"{fn}: flags must be letters of 'imsx' (ignore case, multiline, dot-all, verbose), got {flags!r}")
    out = 0
    for letter in flags:
        out |= table[letter]
    return out


def _column(values: Any, name: str, fn: str, n: int) -> list:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise UserError(f"{fn}: column '{name}' must give one value per completion ({n}), got {got}")
    return list(values)


def math_answer(prompts: list[str], completions: list[str], *, answer: list, tolerance: float = 1e-6,
                abs_tolerance: float = 1e-9, formats: list[str] | tuple[str, ...] = FORMATS, fallback_last_number: bool = False,
                correct: float = 1.0, wrong: float = 0.0, no_answer: float = 0.0) -> list[float]:
    """1 when the completion's final answer (#### N or \\boxed{N}) equals the reference number within tolerance, else 0.

    The reference (column ``answer``) may be a number, a number as text (``72``, ``3/4``), or a worked solution
    ending in ``#### 72`` (GSM8K's answer column as shipped) or holding ``\\boxed{...}``; an unreadable reference is an
    error naming the row. Equal means ``math.isclose(got, want, rel_tol=tolerance, abs_tol=abs_tolerance)``:
    ``tolerance`` is relative (to the larger of the two: 1e-6 accepts 0.3333333 for 1/3 and 1000001 for 1000000, not
    0.33), ``abs_tolerance`` an absolute floor for answers at or near 0. ``no_answer`` scores a completion with no
    readable answer, ``wrong`` one with a different number (veRL's gsm8k ``format_score``); set e.g.
    ``no_answer: -0.5`` to teach the format faster.
    """
    fn = "math_answer"
    tol = _number(tolerance, "tolerance", fn, minimum=0.0)
    abs_tol = _number(abs_tolerance, "abs_tolerance", fn, minimum=0.0)
    scores = {k: _number(v, k, fn) for k, v in (("correct", correct), ("wrong", wrong), ("no_answer", no_answer))}
    if isinstance(formats, str) or not isinstance(formats, (list, tuple)) or set(formats) - set(EXTRACTORS):
        raise UserError(f"{fn}: formats must be a list of {', '.join(EXTRACTORS)}, got {formats!r}")
    fallback = _bool(fallback_last_number, "fallback_last_number", fn)
    if not formats and not fallback:
        raise UserError(f"{fn}: formats is empty and fallback_last_number is off: no answer could ever be found")
    refs = _column(answer, "answer", fn, len(completions))
    out = []
    for i, (completion, ref) in enumerate(zip(completions, refs)):
        want = reference_number(ref)
        if want is None:
            raise UserError(f"{fn}: the reference answer of completion {i} is not a number: {str(ref)[-80:]!r} (expected "
                            "e.g. 72, 3/4, '... #### 72' or '\\boxed{72}'); fix the data's answer column, or score "
                            "non-numeric answers with exact_match or your own module:function")
        got = parse_number(extract_answer(completion, tuple(formats), fallback))
        if got is None:
            out.append(scores["no_answer"])
        else:
            out.append(scores["correct"] if math.isclose(got, want, rel_tol=tol, abs_tol=abs_tol) else scores["wrong"])
    return out


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _normalise(text: str, ignore_case: bool, ignore_punctuation: bool, collapse_whitespace: bool) -> str:
    if ignore_case:
        text = text.casefold()
    if ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    return " ".join(text.split()) if collapse_whitespace else text


def exact_match(prompts: list[str], completions: list[str], *, answer: list, extract: str | None = None,
                ignore_case: bool = True, ignore_punctuation: bool = False, collapse_whitespace: bool = True,
                correct: float = 1.0, wrong: float = 0.0, no_answer: float = 0.0) -> list[float]:
    """1 when the completion (or the part `extract` captures) equals the reference after normalising, else 0.

    ``extract``: a regex; its LAST match's first group (or the whole match, without a group) is compared, as
    answer-format rewards do (veRL's DAPO ``Answer:``); anchor it (``^...``) for the first. No match scores
    ``no_answer``. Normalising: ``ignore_case`` (casefold), ``ignore_punctuation`` (drop ASCII punctuation),
    ``collapse_whitespace`` (strip, and one space for each run). A reference may be a list of accepted answers.
    """
    fn = "exact_match"
    pattern = _regex(extract, "extract", fn) if extract is not None else None
    scores = {k: _number(v, k, fn) for k, v in (("correct", correct), ("wrong", wrong), ("no_answer", no_answer))}
    flags = tuple(_bool(v, k, fn) for k, v in (("ignore_case", ignore_case), ("ignore_punctuation", ignore_punctuation),
                                                ("collapse_whitespace", collapse_whitespace)))
    refs = _column(answer, "answer", fn, len(completions))
    out = []
    for completion, ref in zip(completions, refs):
        got = completion
        if pattern is not None:
            matches = list(pattern.finditer(completion))
            if not matches:
                out.append(scores["no_answer"])
                continue
            got = matches[-1].group(1) if pattern.groups else matches[-1].group(0)
            got = got or ""
        accepted = ref if isinstance(ref, (list, tuple)) else [ref]
        wanted = {_normalise(str(a), *flags) for a in accepted}
        out.append(scores["correct"] if _normalise(got, *flags) in wanted else scores["wrong"])
    return out


def format_match(prompts: list[str], completions: list[str], *, pattern: str, mode: str = "search", flags: str = "",
                 matched: float = 1.0, unmatched: float = 0.0) -> list[float]:
    """1 when the completion matches the regex `pattern` (mode search: anywhere; full: the whole text), else 0.

    ``mode``: ``search`` (re.search), ``match`` (at the start, re.match) or ``full`` (re.fullmatch, after stripping
    surrounding whitespace). ``flags``: letters of ``imsx`` (e.g. ``s`` lets ``.`` cross lines, for a
    ``<think>...</think>`` format).
    """
    fn = "format"
    regex = _regex(pattern, "pattern", fn, _flags(flags, fn))
    how = _choice(mode, "mode", fn, ("search", "match", "full"))
    hit, miss = _number(matched, "matched", fn), _number(unmatched, "unmatched", fn)
    test = {"search": regex.search, "match": regex.match, "full": lambda text: regex.fullmatch(text.strip())}[how]
    return [hit if test(c) else miss for c in completions]


def length_penalty(prompts: list[str], completions: list[str], *, limit: float | None = None, target: float | None = None,
                   scale: float = 1.0, unit: str = "words") -> list[float]:
    """0 up to `limit` (or at `target`), then down linearly to -scale at twice the limit (or 100% off target).

    Length is counted in ``unit``: ``words`` (whitespace-separated) or ``chars``. With ``limit`` L: penalty
    ``-scale * min(1, max(0, n - L) / L)``: one-sided, like DAPO's overlong penalty (TRL's
    ``get_soft_overlong_punishment``) but on text, not tokens. With ``target`` T: ``-scale * min(1, |n - T| / T)``:
    two-sided. Set exactly one of the two. Bounded in [-scale, 0], so its weight in a composite is its worst case.
    """
    fn = "length_penalty"
    if (limit is None) == (target is None):
        raise UserError(f"{fn}: set exactly one of limit (penalise beyond it) and target (penalise distance from it)")
    size = _number(limit if limit is not None else target, "limit" if limit is not None else "target", fn, 0.0, above=True)
    weight = _number(scale, "scale", fn, minimum=0.0)
    how = _choice(unit, "unit", fn, ("words", "chars"))
    out = []
    for completion in completions:
        n = len(completion.split()) if how == "words" else len(completion)
        off = max(0.0, n - size) if limit is not None else abs(n - size)
        out.append(0.0 - weight * min(1.0, off / size))
    return out
