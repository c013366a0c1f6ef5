"""Loading datasets and checking every row before any model is loaded.

Sources (`DataSection.path`): a hub id or local dataset folder (`datasets.load_dataset(path, name,
split=...)`), or one local file: .jsonl/.json, .parquet, .csv, .txt (one text per paragraph), each
also compressed (.gz, .bz2, .xz, .zst); `rlhf_dist.readers` reads them, one checked reader per format.
`columns` maps the names a stage expects to the names in your data.

Formats, after the column mapping:

* ``pretrain`` - ``text``: raw text; tokenised, concatenated and cut into blocks (`group_texts`).
* ``sft`` - one of ``text``; ``prompt`` + ``completion`` (strings or message lists); ``messages``
  (a chat; the last message is the assistant's answer and carries the loss); Anthropic HH ``text``
  (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``: the last assistant turn is the completion); or preference
  pairs (``chosen`` is the completion, the prompt as for ``preference``).
* ``preference`` - ``chosen`` + ``rejected`` with an optional ``prompt``; strings or message
  lists. Without ``prompt`` the shared beginning is the prompt; Anthropic HH strings are split after
  the last ``Assistant:`` they share.
* ``prompts`` - ``prompt`` (string or message list); or any of the files above, whose prompt is the part
  before the last assistant turn (the PPO stage's input can be the preference or SFT data).

Every row is checked, and every bad row is reported at once: ``FILE: 4 of 2312 rows are bad (empty_response:
4): line 12: field 'chosen' is empty ...``. With ``data.on_bad_row: skip`` they are dropped instead and
counted by reason (in the log and in metrics.json). Lines (text formats) and rows are numbered from 1.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhf_dist.config.sections import DataSection
from rlhf_dist.errors import DataError
from rlhf_dist.readers import Problem, Table, file_format, from_dataset, read_file, supported_names

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
KINDS = ("pretrain", "sft", "preference", "prompts")  # a stage names its kind in rlhf_dist.registry (`data_kind`)
SHOWN = 3  # bad rows quoted in the error message


@dataclass
class DataReport:
    """What happened to the rows of a stage's data: read, bad (by reason), too long (by action), used.

    ``load_splits`` fills the reading part, `rlhf_dist.lengths` the length policy; metrics.json's ``data``
    section is `as_dict()` plus the rows the trainer used (`stages.common`).
    """

    rows_read: int = 0
    bad_rows: dict = field(default_factory=dict)  # reason -> rows skipped (on_bad_row: skip)
    too_long: dict = field(default_factory=dict)  # "train"/"eval" -> {action: rows}
    roles: set = field(default_factory=set)  # chat roles seen (checked against the chat template later)

    def count_bad(self, problems: list[Problem]) -> None:
        for p in problems:
            self.bad_rows[p.reason] = self.bad_rows.get(p.reason, 0) + 1

    def as_dict(self) -> dict:
        out = {"rows_read": self.rows_read, "bad_rows_skipped": dict(sorted(self.bad_rows.items()))}
        if self.too_long:
            out["too_long"] = self.too_long
        return out


class Bad(Exception):
    """One row's problem, raised by a row check: reason code, field, words."""

    def __init__(self, reason: str, name: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, name, message


def looks_local(path: str) -> bool:
    """True for things that can only be a local path (hub ids are 'name' or 'org/name')."""
    return (
        path.startswith((".", "/", "~"))
        or file_format(path)[0] is not None
        or path.count("/") > 1
        or os.sep != "/" and os.sep in path
    )


def check_local_path(path: str, key: str) -> None:
    """A path that can only be local must exist (hub ids are checked when loaded)."""
    if looks_local(path) and not Path(path).expanduser().exists():
        raise DataError(f"{key}: data file not found: {path}; fix the path (or give a hub dataset id)")


def _load(path: str, cfg: DataSection, split: str, key: str):
    """A local file as a Table (its checked reader), a hub dataset or dataset folder as a `datasets.Dataset`."""
    local = Path(path).expanduser()
    if local.is_file():
        if file_format(local)[0] is None:
            raise DataError(f"{key}: {path} has an unsupported extension; use one of {supported_names()}")
        if split != "train":
            raise DataError(f"{key}: {path} is a single file and has no split '{split}'; give held-out data "
                            "with data.eval_path (or drop eval_split to hold out data.eval_fraction)")
        return read_file(local, key)
    check_local_path(path, key)
    import datasets

    try:
        extra = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
        return datasets.load_dataset(path, cfg.name, split=split, revision=cfg.revision, **extra)
    except Exception as exc:  # datasets/pyarrow/hub errors of every kind: one line, with what was asked for
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{key}: could not load dataset '{path}' split '{split}': {detail}") from None


def load_splits(cfg: DataSection, kind: str, where: str, report: DataReport | None = None) -> tuple[Any, Any, str]:
    """Load, map columns, check and normalise train and eval data. Returns (train, eval, source name)."""
    report = report if report is not None else DataReport()
    if not cfg.path:
        raise DataError(f"{where}.data.path is not set; give a hub dataset id or a local file")
    train = _load(cfg.path, cfg, cfg.split, f"{where}.data.path")
    source = cfg.path
    if cfg.eval_path or cfg.eval_split:
        eval_path = cfg.eval_path or cfg.path
        evaluation = _load(eval_path, cfg, cfg.eval_split or "train", f"{where}.data.eval_path")
        eval_source = eval_path + (f" [{cfg.eval_split}]" if cfg.eval_split else "")
    else:
        evaluation, eval_source = None, source
    train = prepare(train, cfg, kind, source, where, report)
    if evaluation is not None:
        evaluation = prepare(evaluation, cfg, kind, eval_source, where, report)
    elif cfg.eval_fraction > 0:
        if len(train) < 2:
            raise DataError(f"{source}: only {len(train)} usable row(s); need at least 2 to hold out eval data")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    if cfg.max_samples is not None:
        train = train.select(range(min(cfg.max_samples, len(train))))
    if evaluation is not None and cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    return train, evaluation, source


def prepare(table, cfg: DataSection, kind: str, source: str, where: str = "stage", report: DataReport | None = None):
    """Rename mapped columns, check every row, and bring rows to the stage's canonical columns (a Dataset)."""
    import datasets

    report = report if report is not None else DataReport()
    if kind == "pretrain" and not isinstance(table, Table):
        return _prepare_text_dataset(table, cfg, source, where, report)
    if not isinstance(table, Table):
        table = from_dataset(table)
    table = map_columns(table, cfg.columns, source)
    rows, problems = CHECKS[kind](table, source, cfg, report)
    _handle_problems(table.problems + problems, len(table.rows) + len(table.problems), cfg, source, where, report)
    if not rows:
        raise DataError(f"{source}: no usable rows (of {report.rows_read}); fix the data or its data.columns mapping")
    return datasets.Dataset.from_list(rows)


def _handle_problems(problems: list[Problem], total: int, cfg: DataSection, source: str, where: str,
                     report: DataReport) -> None:
    """Raise one line listing the bad rows (on_bad_row: error), or count and log them (skip)."""
    report.rows_read += total
    if not problems:
        return
    if cfg.on_bad_row != "skip":
        raise DataError(bad_rows_message(source, problems, total, where))
    report.count_bad(problems)
    import logging

    logging.getLogger("rlhf_dist").warning("%s: skipped %d bad row(s) of %d (%s); first: %s", source, len(problems),
                                           total, _reasons(problems), problems[0].describe())


def _prepare_text_dataset(ds, cfg: DataSection, source: str, where: str, report: DataReport):
    """Pretraining text from a hub dataset or folder, checked row by row without turning it into Python rows (a
    corpus can be far larger than memory's comfort)."""
    present = set(ds.column_names)
    _check_mapping(present, cfg.columns, source)
    if cfg.columns.get("text", "text") != "text":
        ds = ds.remove_columns([c for c in ["text"] if c in present]).rename_column(cfg.columns["text"], "text")
    if "text" not in ds.column_names:
        raise DataError(f"{source}: no 'text' column for pretraining (columns are: {', '.join(ds.column_names)}); "
                        "rename it or map yours with data.columns, e.g. {text: your_column}")
    problems, keep = [], []
    for i, value in enumerate(ds["text"]):
        if cfg.skip_empty and _blank(value):
            continue  # wikitext's blank lines: dropped, not bad rows
        try:
            _text(value, "text")
        except Bad as bad:
            problems.append(Problem(f"row {i + 1}", bad.reason, bad.message, bad.field))
            continue
        keep.append(i)
    _handle_problems(problems, len(ds), cfg, source, where, report)
    if not keep:
        raise DataError(f"{source}: no usable rows (of {len(ds)}); fix the data or its data.columns mapping")
    ds = ds.select_columns(["text"])
    return ds if len(keep) == len(ds) else ds.select(keep)


def _reasons(problems: list[Problem]) -> str:
    counts = collections.Counter(p.reason for p in problems)
    return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())


def bad_rows_message(source: str, problems: list[Problem], total: int, where: str) -> str:
    skip = f"set {where}.data.on_bad_row=skip to drop them (counted in metrics.json)"
    if len(problems) == 1:
        return f"{source} {problems[0].describe()}; fix or remove the row, or {skip}"
    shown = "; ".join(p.describe() for p in problems[:SHOWN])
    more = f"; ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return (f"{source}: {len(problems)} of {total} rows are bad ({_reasons(problems)}): {shown}{more}; "
            f"fix or remove them, or {skip}")


def _check_mapping(present: set[str], columns: dict[str, str], source: str) -> None:
    for ours, theirs in columns.items():
        if theirs not in present:
            raise DataError(
                f"{source}: column '{theirs}' (mapped to '{ours}' in data.columns) not found; columns are: "
                f"{', '.join(sorted(present))}"
            )


def _blank(value: Any) -> bool:
    """An empty or all-whitespace text (what data.skip_empty drops)."""
    return isinstance(value, str) and not value.strip()


def map_columns(table: Table, columns: dict[str, str], source: str) -> Table:
    present = set(table.columns)
    _check_mapping(present, columns, source)
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    if not renames:
        return table
    dropped = {ours for ours in renames.values() if ours in present and ours not in renames}
    rows = [{renames.get(k, k): v for k, v in row.items() if k not in dropped} for row in table.rows]
    return Table(rows=rows, where=table.where, problems=table.problems)


# ----------------------------------------------------------------------------------------------
# Row checks. Each takes the Table and returns (normalised rows, problems).
# ----------------------------------------------------------------------------------------------
def _require_columns(table: Table, needed: list[str], source: str, what: str) -> None:
    columns = table.columns  # computed over every row: once
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{source}: no '{missing[0]}' column for {what} (columns are: {', '.join(columns)}); "
            f"rename it or map yours with data.columns, e.g. {{{missing[0]}: your_column}}"
        )


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


def _row_checker(fn: Callable[[dict], dict]):
    """Run a per-row check over a Table: rows that pass, and a Problem for each that does not."""

    def check(table: Table, source: str, cfg: DataSection, report: DataReport):
        rows, problems, shapes, formats = [], [], {}, {}
        for row, where in zip(table.rows, table.where):
            try:
                out = fn(row)
                fmt = out.pop("_format", None)
                if fmt is not None:
                    first = formats.setdefault("format", (fmt, where))
                    if first[0] != fmt:
                        raise Bad("mixed_format", None, f"is {fmt} data, but {first[1]} (the first good row) is "
                                  f"{first[0]}; one file holds one format")
                for name, value in out.items():
                    kind = "message lists" if isinstance(value, list) else "strings"
                    first = shapes.setdefault(name, (kind, where))
                    if first[0] != kind:
                        raise Bad("mixed_types", name, f"is {'a message list' if kind == 'message lists' else 'a string'}"
                                  f", but in {first[1]} (the first good row) it holds {first[0]}; use one type per column")
            except Bad as bad:
                problems.append(Problem(where, bad.reason, bad.message, bad.field))
                continue
            for value in out.values():
                if isinstance(value, list):
                    report.roles.update(m["role"] for m in value)
            rows.append(out)
        return rows, problems

    return check


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


def prompt_row(row: dict) -> dict:
    """One PPO prompt: 'prompt', or the part before the last assistant turn of an SFT or preference row."""
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


def check_text(table: Table, source: str, cfg: DataSection, report: DataReport):
    _require_columns(table, ["text"], source, "pretraining")
    if cfg.skip_empty:  # wikitext's blank lines: dropped, not bad rows
        keep = [i for i, row in enumerate(table.rows) if not _blank(row.get("text"))]
        table = Table([table.rows[i] for i in keep], [table.where[i] for i in keep], table.problems)
    return _row_checker(text_row)(table, source, cfg, report)


def check_prompts(table: Table, source: str, cfg: DataSection, report: DataReport):
    if not {"prompt", "chosen", "messages", "text"} & set(table.columns):
        _require_columns(table, ["prompt"], source, "prompts")
    return _row_checker(prompt_row)(table, source, cfg, report)


def check_sft(table: Table, source: str, cfg: DataSection, report: DataReport):
    cols = set(table.columns)
    if "completion" in cols and "prompt" not in cols:
        _require_columns(table, ["prompt"], source, "SFT prompt/completion data")
    if "prompt" in cols and not {"completion", "chosen", "messages", "text"} & cols:
        _require_columns(table, ["completion"], source, "SFT prompt/completion data")
    if not {"messages", "prompt", "completion", "text", "chosen"} & cols:
        raise DataError(
            f"{source}: no SFT columns (need 'text', 'prompt'+'completion', 'messages', or 'chosen'+'rejected'; columns "
            f"are: {', '.join(table.columns)}); map yours with data.columns"
        )
    return _row_checker(sft_row)(table, source, cfg, report)


def check_preference(table, source: str, cfg: DataSection, report: DataReport | None = None):
    if not isinstance(table, Table):
        table = from_dataset(table)
    _require_columns(table, ["chosen", "rejected"], source, "preference pairs")
    return _row_checker(preference_row)(table, source, cfg, report if report is not None else DataReport())


CHECKS = {"pretrain": check_text, "sft": check_sft, "preference": check_preference, "prompts": check_prompts}
assert set(CHECKS) == set(KINDS)
__all__ = ["DataReport", "KINDS", "check_local_path", "load_splits", "looks_local", "prepare", "split_prompt"]
