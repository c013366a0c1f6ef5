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
* ``unpaired`` - ``prompt`` + ``completion`` + ``label`` (true: a desirable completion; false: not), strings or
  message lists (KTO's thumbs-up / thumbs-down data); or preference pairs, each giving two rows.

The row shapes themselves (one function per shape) are in `rlhf_dist.formats`.

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
from rlhf_dist.formats import Bad, _text, preference_row, prompt_row, sft_row, split_prompt, text_row, unpaired_rows
from rlhf_dist.readers import Problem, Table, file_format, from_dataset, read_file, supported_names

KINDS = ("pretrain", "sft", "preference", "prompts", "unpaired")  # a stage names its kind in rlhf_dist.registry
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


KIND_ONE = {"message lists": "a message list", "strings": "a string", "numbers": "a number", "true/false": "true/false"}


def _kind(value: Any) -> str:
    """The type a column holds, as an error names it (one type per column: a Dataset cannot hold two)."""
    if isinstance(value, list):
        return "message lists"
    if isinstance(value, bool):
        return "true/false"
    return "numbers" if isinstance(value, (int, float)) else "strings"


def _row_checker(fn: Callable[[dict], dict | list[dict]]):
    """Run a per-row check over a Table: rows that pass (a row may give several: `formats.unpaired_rows`), and a
    Problem for each that does not."""

    def check(table: Table, source: str, cfg: DataSection, report: DataReport):
        rows, problems, shapes, formats = [], [], {}, {}
        for row, where in zip(table.rows, table.where):
            try:
                made = fn(row)
                made = made if isinstance(made, list) else [made]
                for out in made:
                    fmt = out.pop("_format", None)
                    if fmt is not None:
                        first = formats.setdefault("format", (fmt, where))
                        if first[0] != fmt:
                            raise Bad("mixed_format", None, f"is {fmt} data, but {first[1]} (the first good row) is "
                                      f"{first[0]}; one file holds one format")
                    for name, value in out.items():
                        kind = _kind(value)
                        first = shapes.setdefault(name, (kind, where))
                        if first[0] != kind:
                            raise Bad("mixed_types", name, f"is {KIND_ONE[kind]}, but in {first[1]} (the first good row) "
                                      f"it holds {first[0]}; use one type per column")
            except Bad as bad:
                problems.append(Problem(where, bad.reason, bad.message, bad.field))
                continue
            for out in made:
                for value in out.values():
                    if isinstance(value, list):
                        report.roles.update(m["role"] for m in value)
            rows.extend(made)
        return rows, problems

    return check


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


def check_unpaired(table: Table, source: str, cfg: DataSection, report: DataReport):
    cols = set(table.columns)
    if not {"chosen", "rejected"} & cols:
        _require_columns(table, ["prompt", "completion", "label"], source, "unpaired (KTO) data")
    return _row_checker(unpaired_rows)(table, source, cfg, report)


CHECKS = {"pretrain": check_text, "sft": check_sft, "preference": check_preference, "prompts": check_prompts,
          "unpaired": check_unpaired}
assert set(CHECKS) == set(KINDS)
__all__ = ["DataReport", "KINDS", "check_local_path", "load_splits", "looks_local", "prepare", "split_prompt"]
