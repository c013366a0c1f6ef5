"""Loading datasets and checking every row before any model is loaded.

Sources (`DataConfig.path`): a hub id or local dataset folder (`datasets.load_dataset(path, name,
split=...)`), or one local file: .jsonl/.json, .parquet, .csv, .txt (one text per paragraph).
`columns` maps the names a stage expects to the names in your data.

Formats, after the column mapping:

* ``pretrain`` - ``text``: raw text; tokenised, concatenated and cut into blocks (`group_texts`).
* ``sft`` - one of ``text``; ``prompt`` + ``completion`` (strings or message lists); ``messages``
  (a chat; the last message is the assistant's answer and carries the loss).
* ``preference`` - ``chosen`` + ``rejected`` with an optional ``prompt``; strings or message
  lists. Without ``prompt`` the shared beginning is the prompt; Anthropic HH strings
  (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``) are split after the last ``Assistant:``.
* ``prompts`` - ``prompt``: string or message list (the PPO stage's input).

A bad row raises `DataError("FILE row N: field 'x' ...; fix ...")`; rows are numbered from 1 in the
order of the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf_dist.config import DataConfig
from rlhf_dist.errors import DataError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
HH_ASSISTANT = "\n\nAssistant:"
KINDS = ("pretrain", "sft", "preference", "prompts")


def looks_local(path: str) -> bool:
    """True for things that can only be a local path (hub ids are 'name' or 'org/name')."""
    return (
        path.startswith((".", "/", "~"))
        or Path(path).suffix.lower() in FILE_BUILDERS
        or path.count("/") > 1
        or os.sep != "/" and os.sep in path
    )


def check_local_path(path: str, key: str) -> None:
    """A path that can only be local must exist (hub ids are checked when loaded)."""
    if looks_local(path) and not Path(path).expanduser().exists():
        raise DataError(f"{key}: data file not found: {path}; fix the path (or give a hub dataset id)")


def _load(path: str, cfg: DataConfig, split: str, key: str):
    import datasets

    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if local.is_file():
        if suffix not in FILE_BUILDERS:
            raise DataError(f"{key}: {path} has an unsupported extension; use one of {', '.join(FILE_BUILDERS)}")
        if split != "train":
            raise DataError(f"{key}: {path} is a single file and has no split '{split}'; give held-out data "
                            "with data.eval_path (or drop eval_split to hold out data.eval_fraction)")
        if suffix == ".txt":
            # One row per paragraph: blank lines separate texts and are not rows themselves.
            ds = datasets.load_dataset("text", data_files=str(local), split="train", sample_by="paragraph")
            return ds.filter(lambda row: bool(row["text"].strip()))
        return datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(local), split="train")
    check_local_path(path, key)
    try:
        return datasets.load_dataset(path, cfg.name, split=split, revision=cfg.revision)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{key}: could not load dataset '{path}' split '{split}': {str(exc).splitlines()[0]}") from None


def load_splits(cfg: DataConfig, kind: str, where: str) -> tuple[Any, Any, str]:
    """Load, map columns, check and normalise train and eval data. Returns (train, eval, source name)."""
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
    train = prepare(train, cfg, kind, source)
    if evaluation is not None:
        evaluation = prepare(evaluation, cfg, kind, eval_source)
    elif cfg.eval_fraction > 0:
        if len(train) < 2:
            raise DataError(f"{source}: only {len(train)} row(s); need at least 2 to hold out eval data")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    if cfg.max_samples is not None:
        train = train.select(range(min(cfg.max_samples, len(train))))
    if evaluation is not None and cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    return train, evaluation, source


def prepare(ds, cfg: DataConfig, kind: str, source: str):
    """Rename mapped columns, check every row, and bring rows to the stage's canonical columns."""
    ds = map_columns(ds, cfg.columns, source)
    check = {"pretrain": check_text, "sft": check_sft, "preference": check_preference, "prompts": check_prompts}[kind]
    rows = check(ds, source, cfg)
    import datasets

    return datasets.Dataset.from_list(rows) if rows is not None else ds


def map_columns(ds, columns: dict[str, str], source: str):
    present = set(ds.column_names)
    for ours, theirs in columns.items():
        if theirs not in present:
            raise DataError(
                f"{source}: column '{theirs}' (mapped to '{ours}' in data.columns) not found; columns are: "
                f"{', '.join(sorted(present))}"
            )
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    clash = [ours for theirs, ours in renames.items() if ours in present and ours not in renames]
    if clash:
        ds = ds.remove_columns(clash)
    return ds.rename_columns(renames) if renames else ds


# ----------------------------------------------------------------------------------------------
# Row checks. Each returns the normalised rows (list of dicts), or None to keep the dataset as is.
# ----------------------------------------------------------------------------------------------
def _require_columns(ds, needed: list[str], source: str, what: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: no '{missing[0]}' column for {what} (columns are: {', '.join(ds.column_names)}); "
            f"rename it or map yours with data.columns, e.g. {{{missing[0]}: your_column}}"
        )


def _bad_row(source: str, i: int, name: str, problem: str) -> DataError:
    return DataError(f"{source} row {i + 1}: field '{name}' {problem}; fix or remove the row")


def _text(value: Any, source: str, i: int, name: str) -> str:
    if value is None:
        raise _bad_row(source, i, name, "is missing")
    if not isinstance(value, str):
        raise _bad_row(source, i, name, f"should be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad_row(source, i, name, "is empty")
    return value


def _messages(value: Any, source: str, i: int, name: str) -> list[dict]:
    if value is None:
        raise _bad_row(source, i, name, "is missing")
    if not isinstance(value, list) or not value:
        raise _bad_row(source, i, name, "should be a non-empty list of {role, content} messages")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise _bad_row(source, i, f"{name}[{j}]", "should be a message {role: str, content: str}")
        if not msg["content"].strip():
            raise _bad_row(source, i, f"{name}[{j}].content", "is empty")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_or_messages(value: Any, source: str, i: int, name: str) -> str | list[dict]:
    if isinstance(value, list):
        return _messages(value, source, i, name)
    return _text(value, source, i, name)


def _same_shape(rows: list[dict], field: str, source: str) -> list[dict]:
    """All rows use strings, or all use message lists, for `field` (Arrow needs one type per column)."""
    for i, row in enumerate(rows):
        if isinstance(row[field], list) != isinstance(rows[0][field], list):
            raise _bad_row(source, i, field, "mixes strings and message lists with earlier rows")
    return rows


def check_text(ds, source: str, cfg: DataConfig):
    _require_columns(ds, ["text"], source, "pretraining")
    if cfg.skip_empty:
        ds = ds.filter(lambda row: isinstance(row["text"], str) and bool(row["text"].strip()))
    texts = ds["text"]
    for i, value in enumerate(texts):
        _text(value, source, i, "text")
    return [{"text": t} for t in texts] if cfg.skip_empty else None


def check_prompts(ds, source: str, cfg: DataConfig):
    _require_columns(ds, ["prompt"], source, "prompts")
    rows = [{"prompt": _text_or_messages(v, source, i, "prompt")} for i, v in enumerate(ds["prompt"])]
    return _same_shape(rows, "prompt", source)


def check_sft(ds, source: str, cfg: DataConfig):
    cols = set(ds.column_names)
    rows = []
    if "messages" in cols:
        for i, value in enumerate(ds["messages"]):
            msgs = _messages(value, source, i, "messages")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise _bad_row(source, i, "messages", "should end with an assistant message after at least one other")
            # The last assistant turn is the completion: loss on it only, with any chat template.
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        return rows
    if "prompt" in cols or "completion" in cols:
        _require_columns(ds, ["prompt", "completion"], source, "SFT prompt/completion data")
        for i, (p, c) in enumerate(zip(ds["prompt"], ds["completion"])):
            p, c = _text_or_messages(p, source, i, "prompt"), _text_or_messages(c, source, i, "completion")
            if isinstance(p, list) != isinstance(c, list):
                raise _bad_row(source, i, "completion", "must be a string when prompt is a string (messages with messages)")
            rows.append({"prompt": p, "completion": c})
        return _same_shape(rows, "prompt", source)
    if "text" in cols:
        return [{"text": _text(v, source, i, "text")} for i, v in enumerate(ds["text"])]
    raise DataError(
        f"{source}: no SFT columns (need 'text', 'prompt'+'completion', or 'messages'; columns are: "
        f"{', '.join(ds.column_names)}); map yours with data.columns"
    )


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


def _prompt_from_messages(prompt: str, chosen: list, rejected: list, source: str, i: int):
    """A string prompt with message-list answers that repeat it (e.g. UltraFeedback): use the messages."""
    shared, c, r = split_prompt(chosen, rejected)
    if shared and shared[-1]["role"] == "user" and shared[-1]["content"].strip() == prompt.strip():
        return shared, c, r
    raise _bad_row(source, i, "prompt", "is a string but 'chosen'/'rejected' are message lists; give the prompt "
                   "as messages too (or leave it out and start both answers with the prompt messages)")


def check_preference(ds, source: str, cfg: DataConfig):
    _require_columns(ds, ["chosen", "rejected"], source, "preference pairs")
    has_prompt = "prompt" in ds.column_names
    prompts = ds["prompt"] if has_prompt else [None] * len(ds)
    rows = []
    for i, (p, c, r) in enumerate(zip(prompts, ds["chosen"], ds["rejected"])):
        c, r = _text_or_messages(c, source, i, "chosen"), _text_or_messages(r, source, i, "rejected")
        if isinstance(c, list) != isinstance(r, list):
            raise _bad_row(source, i, "rejected", "must have the same type as 'chosen' (both strings or both messages)")
        if has_prompt:
            p = _text_or_messages(p, source, i, "prompt")
            if isinstance(p, str) and isinstance(c, list):
                p, c, r = _prompt_from_messages(p, c, r, source, i)
            elif isinstance(p, list) and not isinstance(c, list):
                raise _bad_row(source, i, "chosen", "must be a message list when 'prompt' is one")
        else:
            p, c, r = split_prompt(c, r)
            if not p:
                raise _bad_row(source, i, "chosen", "shares no prompt with 'rejected'; add a 'prompt' column")
            for name, value in (("chosen", c), ("rejected", r)):
                if not value or (isinstance(value, str) and not value.strip()):
                    raise _bad_row(source, i, name, "is empty once the shared prompt is removed")
        rows.append({"prompt": p, "chosen": c, "rejected": r})
    if not rows:
        raise DataError(f"{source}: no rows")
    return _same_shape(_same_shape(rows, "chosen", source), "prompt", source)
