"""The shapes a row of data may take, checked and brought to a stage's canonical columns, one row at a time.

Each function takes one row (a dict, after the column mapping) and returns the canonical row(s) or raises `Bad`
(reason code, field, words); `rlhf_dist.data` runs them over every row of a file and reports every bad row at once.

* `text_row`       - ``text`` (pretraining)
* `sft_row`        - ``text``; ``prompt`` + ``completion``; ``messages``; Anthropic HH ``text``; or a preference pair
* `preference_row` - ``chosen`` + ``rejected`` with an optional ``prompt`` (explicit or shared-prefix prompts, HH)
* `prompt_row`     - ``prompt``, or the part before the last assistant turn of any of the above
* `unpaired_rows`  - ``prompt`` + ``completion`` + ``label`` (good / bad, KTO); or a preference pair, which gives
                     two rows: its chosen answer labelled good and its rejected one bad
"""

from __future__ import annotations

import os
from typing import Any

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


class Bad(Exception):
    """One row's problem, raised by a row check: reason code, field, words."""

    def __init__(self, reason: str, name: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, name, message


def _text(value: Any, name: str) -> str:
    if value is None:
        raise Bad("missing", name, "is missing")
    if not isinstance(value, str):
        raise Bad("wrong_type", name, f"should be a string, got {type(value).__name__}")
    if not value.strip():
        raise Bad("empty", name, "is empty")
    return value


def _messages(value: Any, name: str) -> list[dict]:
    if value is None:
        raise Bad("missing", name, "is missing")
    if not isinstance(value, list) or not value:
        raise Bad("wrong_type", name, "should be a non-empty list of {role, content} messages")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise Bad("bad_message", f"{name}[{j}]", "should be a message {role: str, content: str}")
        if not msg["content"].strip():
            raise Bad("empty", f"{name}[{j}].content", "is empty")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_or_messages(value: Any, name: str) -> str | list[dict]:
    if isinstance(value, list):
        return _messages(value, name)
    return _text(value, name)


def is_hh(text: Any) -> bool:
    """Anthropic HH layout: the text starts with a Human turn ("\\n\\nHuman: ..."; leading blanks allowed)."""
    return isinstance(text, str) and ("\n\n" + text.lstrip()).startswith(HH_HUMAN)


def split_hh(text: str, name: str) -> tuple[str, str]:
    """HH text -> (prompt up to and including the last "\\n\\nAssistant:", that assistant turn)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise Bad("no_assistant_turn", name, "is Anthropic HH text with no '\\n\\nAssistant:' turn, so no prompt and "
                  "response can be split off")
    cut += len(HH_ASSISTANT)
    if not text[cut:].strip():
        raise Bad("empty_response", name, "ends in an empty Assistant turn (nothing after the last '\\n\\nAssistant:')")
    return text[:cut], text[cut:]


def split_prompt(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen, rejected).

    Message lists: the shared leading messages are the prompt. Strings: in Anthropic HH format the
    prompt ends after the last "\\n\\nAssistant:" they share; otherwise at the last whitespace of
    their longest common prefix.
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = len(os.path.commonprefix([chosen, rejected]))
    common = chosen[:n]
    cut = common.rfind(HH_ASSISTANT)
    if cut >= 0:
        cut += len(HH_ASSISTANT)
    else:
        cut = max(common.rfind(" "), common.rfind("\n")) + 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _prompt_from_messages(prompt: str, chosen: list, rejected: list):
    """A string prompt with message-list answers that repeat it (e.g. UltraFeedback): use the messages."""
    shared, c, r = split_prompt(chosen, rejected)
    if shared and shared[-1]["role"] == "user" and shared[-1]["content"].strip() == prompt.strip():
        return shared, c, r
    raise Bad("wrong_type", "prompt", "is a string but 'chosen'/'rejected' are message lists; give the prompt "
              "as messages too (or leave it out and start both answers with the prompt messages)")


def _empty(value: Any) -> bool:
    return not value or (isinstance(value, str) and not value.strip())


def preference_row(row: dict) -> dict:
    """One (prompt, chosen, rejected) row from an explicit- or implicit-prompt pair (strings or messages)."""
    c, r = _text_or_messages(row.get("chosen"), "chosen"), _text_or_messages(row.get("rejected"), "rejected")
    if isinstance(c, list) != isinstance(r, list):
        raise Bad("wrong_type", "rejected", "must have the same type as 'chosen' (both strings or both messages)")
    if c == r:
        raise Bad("identical", "chosen", "equals 'rejected': the pair prefers nothing (a DPO or reward loss learns "
                  "nothing from it)")
    p = row.get("prompt")
    if p is not None:
        p = _text_or_messages(p, "prompt")
        if isinstance(p, str) and isinstance(c, list):
            p, c, r = _prompt_from_messages(p, c, r)
        elif isinstance(p, list) and not isinstance(c, list):
            raise Bad("wrong_type", "chosen", "must be a message list when 'prompt' is one")
    else:
        p, c, r = split_prompt(c, r)
        if isinstance(p, str) and is_hh(row["chosen"]) and HH_ASSISTANT not in p:
            raise Bad("no_assistant_turn", "chosen", "is Anthropic HH text, but 'chosen' and 'rejected' share no "
                      "'\\n\\nAssistant:' turn, so no prompt can be split off")
        if _empty(p):
            raise Bad("no_shared_prompt", "chosen", "shares no prompt with 'rejected'; add a 'prompt' column")
    for name, value in (("chosen", c), ("rejected", r)):
        if _empty(value):
            raise Bad("empty_response", name, "is empty once the shared prompt is removed")
    if isinstance(c, list):
        for name, value in (("chosen", c), ("rejected", r)):
            if value[0]["role"] != "assistant":
                raise Bad("no_assistant_turn", name, f"starts with a '{value[0]['role']}' message once the shared prompt "
                          "is removed; the answer must be the assistant's")
    return {"prompt": p, "chosen": c, "rejected": r}


def sft_row(row: dict) -> dict:
    """One SFT row (prompt/completion or text) from any of the SFT layouts, HH text or a preference pair."""
    if row.get("messages") is not None:
        msgs = _messages(row["messages"], "messages")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise Bad("no_assistant_turn", "messages", "should end with an assistant message after at least one other")
        # The last assistant turn is the completion: loss on it only, with any chat template.
        return {"prompt": msgs[:-1], "completion": msgs[-1:], "_format": "messages"}
    if row.get("completion") is not None or (row.get("prompt") is not None and row.get("chosen") is None):
        p, c = _text_or_messages(row.get("prompt"), "prompt"), _text_or_messages(row.get("completion"), "completion")
        if isinstance(p, list) != isinstance(c, list):
            raise Bad("wrong_type", "completion", "must be a string when prompt is a string (messages with messages)")
        return {"prompt": p, "completion": c, "_format": "prompt/completion"}
    if row.get("text") is not None:
        text = _text(row["text"], "text")
        if is_hh(text):
            prompt, completion = split_hh(text, "text")
            return {"prompt": prompt, "completion": completion, "_format": "HH text"}
        return {"text": text, "_format": "text"}
    if row.get("chosen") is not None:  # a preference pair: learn the chosen answer
        pair = preference_row(row)
        return {"prompt": pair["prompt"], "completion": pair["chosen"], "_format": "preference pairs"}
    raise Bad("missing", None, "has none of the SFT fields ('text', 'prompt'+'completion', 'messages', or "
              "'chosen'+'rejected')")


PROMPT_SOURCES = ("prompt", "chosen", "rejected", "messages", "text", "completion")


def prompt_row(row: dict) -> dict:
    """One PPO prompt: 'prompt', or the part before the last assistant turn of an SFT or preference row; the row's
    other plain columns (strings, numbers, true/false: a reference answer, an id) come along, for reward functions
    that read them (`rlhf_dist.rewards`)."""
    extra = {k: v for k, v in row.items() if k not in PROMPT_SOURCES and isinstance(v, (str, int, float, bool))}
    return {**_prompt_only(row), **extra}


def _prompt_only(row: dict) -> dict:
    if row.get("prompt") is not None:
        if row.get("chosen") is not None:
            return {"prompt": preference_row(row)["prompt"]}
        return {"prompt": _text_or_messages(row["prompt"], "prompt")}
    if row.get("chosen") is not None:
        return {"prompt": preference_row(row)["prompt"]}
    if row.get("messages") is not None:
        sft = sft_row({"messages": row["messages"]})
        return {"prompt": sft["prompt"]}
    if row.get("text") is not None and is_hh(row["text"]):
        prompt, _ = split_hh(_text(row["text"], "text"), "text")
        return {"prompt": prompt}
    if "prompt" in row:
        raise Bad("missing", "prompt", "is missing")
    raise Bad("missing", "prompt", "is missing (and the row has no 'chosen', 'messages' or HH 'text' to take a "
              "prompt from)")


def text_row(row: dict) -> dict:
    return {"text": _text(row.get("text"), "text")}


def _label(value: Any) -> bool:
    """A good/bad label: true/false, or 1/0."""
    if value is None:
        raise Bad("missing", "label", "is missing")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Bad("wrong_type", "label", f"should be true or false (or 1 or 0: is the completion desirable?), got {value!r}")


def unpaired_rows(row: dict) -> list[dict]:
    """KTO's unpaired rows: (prompt, completion, label) as given, or the two halves of a preference pair (its chosen
    answer labelled true, its rejected one false)."""
    if row.get("chosen") is not None or row.get("rejected") is not None:
        pair = preference_row(row)
        return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, "_format": "preference pairs"},
                {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    p, c = _text_or_messages(row.get("prompt"), "prompt"), _text_or_messages(row.get("completion"), "completion")
    if isinstance(p, list) != isinstance(c, list):
        raise Bad("wrong_type", "completion", "must be a string when prompt is a string (messages with messages)")
    return [{"prompt": p, "completion": c, "label": _label(row.get("label")), "_format": "prompt/completion/label"}]
