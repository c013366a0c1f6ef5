"""Relocatable runs: paths inside a run directory are stored relative to it, so a copied or moved run still works.

Two conventions, one for our own files and one for PEFT's:

* **Our files** (``config.yaml``, ``metrics.json``, the model card): a path inside the run directory RUN is written
  ``${output}/...`` (RUN itself: ``${output}``), the placeholder recipes already use for the run directory
  (`rlhf_dist.config.resolve._substitute`, and `config.identity.fingerprint`, which compares configs with RUN written that way).
  `to_relative` writes that form, `resolve` reads it back against wherever the run is now. Paths outside the run
  (a hub id, a base model in /models, a data file) are left as they are.

* **An adapter's** ``adapter_config.json`` ``base_model_name_or_path`` (and the ``base_model`` of PEFT's own
  ``adapter/README.md``): a base inside the run is stored relative to the run directory, ``./sft`` (RUN itself:
  ``.``); `fix_adapter_config` writes it, `adapter_base` reads it back from wherever the run is now.

  Why that form (PEFT 0.21.2, read in its source): ``PeftModel.from_pretrained(base_model, adapter_dir)`` never
  reads the stored base path (the caller gives the base; `peft_model.py` only fills the field in when saving), so
  the commonest way to load an adapter works for a moved run whatever is stored. ``AutoPeftModelForCausalLM.
  from_pretrained(adapter_dir)`` (`peft/auto.py`) hands the stored string unchanged to
  ``AutoModelForCausalLM.from_pretrained``: a relative path resolves against the *current directory*, and one that
  is not a folder there is taken for a hub id (with an absolute path of a moved run: the confusing "Repo id must be
  in the form..." error). Nothing in PEFT resolves it against the adapter folder, so a path relative to the adapter
  (``../../sft``) would only work from inside ``RUN/dpo/adapter``. Relative to the run it works from the run
  directory, the natural place to work in: ``cd RUN; AutoPeftModelForCausalLM.from_pretrained("dpo/adapter")``.
  From elsewhere pass the base yourself (``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
  "RUN/sft"), "RUN/dpo/adapter")``) or use `adapter_base`. The leading ``./`` keeps it from ever being taken for
  a hub id ("sft" could be a repository; "./sft" cannot). PEFT's save also reads the field (its
  ``save_embedding_layers="auto"`` check), which is why the rewrite happens after saving, on the written file.

  `adapter_base(adapter_dir)` finds the run directory by its marker file (``rlhf_dist_run.json``, walking up from the
  adapter; without one, the adapter's grandparent: the layout ``RUN/STAGE/adapter``), so it resolves correctly
  from any current directory and for an adapter anywhere in the run (``STAGE/adapter``, ``STAGE.incomplete/final/
  adapter`` while a stage saves, ``STAGE.incomplete/checkpoint-N``).

Only the standard library (and `rlhf_dist.atomic`, likewise) is used: importing this is cheap.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from rlhf_dist.atomic import write_text

PLACEHOLDER = "${output}"
MARKER = "rlhf_dist_run.json"  # = rundir.MARKER (not imported: rundir imports yaml)
ADAPTER_CONFIG = "adapter_config.json"


def _roots(run_dir: str | os.PathLike) -> list[str]:
    """The spellings of the run directory a path may start with (as given, absolute; and with links resolved)."""
    given = os.path.abspath(os.path.expanduser(os.fspath(run_dir)))
    real = os.path.realpath(given)
    roots = {given.rstrip(os.sep) or os.sep, real.rstrip(os.sep) or os.sep}
    return sorted(roots, key=len, reverse=True)  # the longest first: one may be inside the other


def _pattern(run_dir: str | os.PathLike) -> re.Pattern | None:
    # RUN followed by a separator or the end of the path: "/x/run2" is not inside "/x/run". A path ends at
    # whitespace, a quote, a backtick or a closing bracket (paths quoted in a model card or a message).
    roots = "|".join(re.escape(r) for r in _roots(run_dir) if r != os.sep)
    if not roots:  # the file system's root as a run directory: everything would be "inside"; rewrite nothing
        return None
    return re.compile(rf"(?<![\w.\-/~])(?:{roots})(?=/|$|[\s'\"`)\],;:])")


def to_relative(obj: Any, run_dir: str | os.PathLike) -> Any:
    """`obj` (nested dicts, lists, tuples, strings) with every absolute path inside `run_dir` written ``${output}/...``.

    A string that is such a path becomes ``${output}/sft`` (``${output}`` for the run directory itself); so does
    such a path inside a longer string ("started from /runs/x/sft" -> "started from ${output}/sft"), so that a
    model card or a message is relocatable too. Paths outside the run, relative paths, hub ids and non-strings are
    unchanged; dict keys are left alone. A new object is returned (tuples come back as lists: YAML/JSON have no
    tuples). `resolve` is the inverse.
    """
    pattern = _pattern(run_dir)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(PLACEHOLDER, value) if pattern is not None else value
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    return walk(obj)


def resolve(path_str: Any, run_dir: str | os.PathLike) -> Any:
    """``${output}`` replaced by the run directory, now (absolute): the inverse of `to_relative`.

    Takes a string, or nested dicts/lists of them (as `to_relative` does); the placeholder is replaced wherever it
    occurs, like `config._substitute` does for recipes. Anything else is returned as it is.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(run_dir)))
    if isinstance(path_str, str):
        return path_str.replace(PLACEHOLDER, root)
    if isinstance(path_str, dict):
        return {k: resolve(v, root) for k, v in path_str.items()}
    if isinstance(path_str, (list, tuple)):
        return [resolve(v, root) for v in path_str]
    return path_str


def run_root(path: str | os.PathLike) -> Path | None:
    """The run directory holding `path` (the nearest folder at or above it with the marker file), or None."""
    here = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    for folder in (here, *here.parents):
        if (folder / MARKER).is_file():
            return folder
    return None


def _adapter_run_dir(adapter_dir: Path) -> Path:
    """Where an adapter's run-relative base is resolved: its run directory, else (no marker) RUN of RUN/STAGE/adapter."""
    return run_root(adapter_dir) or Path(os.path.abspath(adapter_dir)).parent.parent


def _inside(path: str, run_dir: str | os.PathLike) -> str | None:
    """`path` (absolute) relative to the run directory ('.' for the run itself), or None when it is outside."""
    for root in _roots(run_dir):
        for candidate in {os.path.abspath(path), os.path.realpath(path)}:
            if candidate == root:
                return "."
            if candidate.startswith(root.rstrip(os.sep) + os.sep):
                return os.path.relpath(candidate, root)
    return None


def relocatable_base(base: str | None, run_dir: str | os.PathLike) -> str | None:
    """The form `fix_adapter_config` stores for base model path `base`: ``./sft`` for a path inside `run_dir`.

    ``${output}/...`` is read too. A relative path that exists from the current directory (a recipe's
    ``model.name_or_path: models/base``, as PEFT saved it) is made absolute first: it is outside the run, and stays
    usable from any directory as long as it is not moved itself. Hub ids and None are returned unchanged; an
    already run-relative path (``./sft``) is kept.
    """
    if not base:
        return base
    if base == PLACEHOLDER or base.startswith(PLACEHOLDER + "/"):
        base = resolve(base, run_dir)
    elif not os.path.isabs(os.path.expanduser(base)):
        if (Path(run_dir) / base).exists() and (base in (".", "..") or base.startswith(("./", "../"))):
            return base  # already ours (idempotent)
        if not Path(base).expanduser().exists():
            return base  # a hub id, or something we cannot place: as PEFT wrote it
        base = os.path.abspath(os.path.expanduser(base))
    base = os.path.expanduser(base)
    inner = _inside(base, run_dir)
    if inner is None:
        return os.path.abspath(base)
    return "." if inner == "." else "./" + Path(inner).as_posix()


def fix_adapter_config(adapter_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> str | None:
    """Make `adapter_dir`'s ``adapter_config.json`` relocatable: a base inside the run stored as ``./sft``.

    `run_dir`: the run directory (default: found by its marker file above `adapter_dir`; without one, nothing
    in the run can be told apart and only a cwd-relative base is made absolute). PEFT's ``README.md`` in the
    folder (``base_model:`` and the ``base_model:adapter:`` tag) gets the same string. Atomic rewrites,
    idempotent; a folder without ``adapter_config.json`` is left alone. Returns the stored base (or None).
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        return None
    run = Path(run_dir) if run_dir is not None else run_root(adapter_dir)
    config = json.loads(config_path.read_text())
    old = config.get("base_model_name_or_path")
    if run is None:
        if not old or os.path.isabs(os.path.expanduser(old)) or not Path(old).expanduser().exists():
            return old
        new = os.path.abspath(os.path.expanduser(old))
    else:
        new = relocatable_base(old, run)
    if new == old:
        return old
    config["base_model_name_or_path"] = new
    write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = adapter_dir / "README.md"
    if card.is_file():
        text = card.read_text()
        fixed = re.sub(rf"^(base_model:\s*|- base_model:adapter:){re.escape(old)}\s*$",
                       lambda m: m.group(1) + new, text, flags=re.MULTILINE)
        if fixed != text:
            write_text(card, fixed)
    return new


def adapter_base(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter was trained on, as a path usable from any directory (or a hub id; None if unset).

    Reads ``adapter_config.json``'s ``base_model_name_or_path``: ``./sft`` (our form) and ``${output}/sft`` are
    resolved against the adapter's run directory, wherever it is now (`run_root`; without a marker file, the
    grandparent of `adapter_dir`); an absolute path or a hub id is returned as it is; any other relative path is
    tried against the run directory, and otherwise returned as it is (PEFT would read it against the current
    directory).
    """
    adapter_dir = Path(adapter_dir)
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        return None
    root = _adapter_run_dir(adapter_dir)
    if base == PLACEHOLDER or base.startswith(PLACEHOLDER + "/"):
        return os.path.normpath(resolve(base, root))
    if os.path.isabs(os.path.expanduser(base)):
        return base
    ours = base in (".", "..") or base.startswith(("./", "../"))
    candidate = root / base
    if ours or candidate.exists():
        return os.path.normpath(str(candidate))
    return base
