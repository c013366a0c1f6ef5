"""Final-answer extraction for verifiable rewards: GSM8K's ``#### 42``, LaTeX ``\\boxed{...}``, or the last number.

Conventions (the strict ones of veRL's ``reward_score/gsm8k.py`` and ``reward_score/math_reward.py``, and of
TRL's ``accuracy_reward``, which asks math_verify for an anchored answer, ``try_extract_without_anchor=False``):

* ``#### <answer>`` - the LAST ``####`` in the text; the answer is the rest of that line.
* ``\\boxed{<answer>}`` - the LAST ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 42``), braces matched, so
  ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``.
* the last number anywhere in the text - OFF by default (veRL's ``method="flexible"``, lm-eval's
  "flexible-extract"): it pays for a right number said in passing, so a policy need not learn to state its answer.
  Turn it on (``fallback_last_number: true``) for a model that cannot yet follow the answer format.

Only the first format that finds an answer is used (``formats`` gives the order, ``("gsm8k", "boxed")`` by
default), and its span must hold a number: ``#### forty-two`` is "no answer", not a fall-through to another format.

A span is read as a number (`parse_number`) after removing what does not change its value: ``$``, ``\\$``, ``%``,
``\\!``, ``\\,``, ``\\left``/``\\right``, ``^\\circ``, ``\\text{...}`` wrappers, thousands separators (``1,234``,
``1{,}234``), a trailing ``.``, a leading ``x =``; then it may be an integer, a decimal (``-0.5``, ``.5``), a fraction
(``3/4``, ``\\frac{3}{4}``, ``\\dfrac34``, ``-\\frac{1}{2}``), optionally followed by words (units: ``18 dollars``).
Anything else (``2+3``, ``\\sqrt{2}``, ``x^2``) is not a number: compare such answers with `exact_match`.
"""

from __future__ import annotations

import re

FORMATS = ("gsm8k", "boxed")

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_FRACTION = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
_LATEX_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))$")
_LEADING_NUMBER = re.compile(rf"^({_NUMBER})(?:\s*/\s*({_NUMBER}))?(?![\d.])(?:\s+[A-Za-z][^\d]*)?$")
_ANY_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|(?<![\w.])[-+]?\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))|\{,\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_DROP = re.compile(r"\\[!,;: ]|\\left|\\right|\^\s*\{?\\circ\}?|\\%|%|\\\$|\$|\\displaystyle")


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched), or of ``\\boxed 42``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if rest[:1] != " ":  # \boxedfoo is another macro
            return None
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    depth = 0
    for i, ch in enumerate(stripped):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return stripped[1:i]
    return None  # unbalanced: the completion was cut off inside the box


def gsm8k_answer(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K's answer marker), stripped; None without one."""
    at = text.rfind("####")
    if at < 0:
        return None
    return text[at + 4:].split("\n", 1)[0].strip() or None


def last_number(text: str) -> str | None:
    """The last number written in the text (``1,234``, ``-3.5``, ``3/4``), or None."""
    found = _ANY_NUMBER.findall(text)
    return found[-1] if found else None


def _unwrap(span: str) -> str:
    """``{42}`` -> ``42``: drop outer braces that enclose the whole span (not those of ``\\frac{1}{2}``)."""
    while span.startswith("{") and span.endswith("}"):
        depth = 0
        for i, ch in enumerate(span):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0 and i < len(span) - 1:
                return span
        span = span[1:-1].strip()
    return span


def _clean(span: str) -> str:
    span = span.replace("\u2212", "-")  # the Unicode minus sign
    span = _TEXT.sub(r" \1", span)
    span = _DROP.sub("", span)
    span = _THOUSANDS.sub("", span)
    span = span.strip().rstrip(".").strip()
    if "=" in span:  # "x = 5": the value is after the last '='
        span = span.rsplit("=", 1)[1].strip()
    return _unwrap(span)


def _value(number: str) -> float | None:
    try:
        return float(number)
    except ValueError:
        return None


def parse_number(span: str | None) -> float | None:
    """The number an answer span states (see the module doc for what is accepted), or None."""
    if span is None:
        return None
    span = _clean(span)
    latex = _LATEX_FRAC.match(span)
    if latex:
        sign, num_braced, num_digit, den_braced, den_digit = latex.groups()
        num = parse_number(num_braced if num_braced is not None else num_digit)
        den = parse_number(den_braced if den_braced is not None else den_digit)
        if num is None or den is None or den == 0:
            return None
        return -num / den if sign == "-" else num / den
    plain = _LEADING_NUMBER.match(span)
    if not plain:
        return None
    num = _value(plain.group(1))
    if plain.group(2) is None:
        return num
    den = _value(plain.group(2))
    return None if num is None or not den else num / den


def extract_answer(text: str, formats: tuple[str, ...] | list[str] = FORMATS, fallback_last_number: bool = False) -> str | None:
    """The final-answer span of a completion: the first of `formats` found in it, else (optionally) its last number."""
    for fmt in formats:
        span = EXTRACTORS[fmt](text)
        if span is not None:
            return span
    return last_number(text) if fallback_last_number else None


def extract_number(text: str, formats: tuple[str, ...] | list[str] = FORMATS, fallback_last_number: bool = False) -> float | None:
    """`extract_answer` read as a number (`parse_number`); None when there is no answer or it is not a number."""
    return parse_number(extract_answer(text, formats, fallback_last_number))


def reference_number(reference: str | int | float) -> float | None:
    """A reference answer as a number: a bare number (``72``, ``3/4``, ``\\frac{1}{2}``), or a worked solution ending
    in ``#### 72`` (GSM8K's ``answer`` column) or holding a ``\\boxed{...}`` (MATH's ``solution`` column)."""
    if isinstance(reference, bool):
        return None
    if isinstance(reference, (int, float)):
        return float(reference)
    if not isinstance(reference, str):
        return None
    for fmt in FORMATS:
        span = EXTRACTORS[fmt](reference)
        if span is not None:
            return parse_number(span)
    return parse_number(reference)


EXTRACTORS = {"gsm8k": gsm8k_answer, "boxed": boxed_answer}
