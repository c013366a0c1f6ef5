"""Atomic file writes: a reader sees the old file or the new one, never half of one (standard library only).

Used for every file a run writes (`rundir` re-exports them), and by the modules below `rundir` (e.g. `failures`),
which must not import it: rundir asks `config` for run fingerprints.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text(path: str | Path, text: str, durable: bool = False) -> None:
    """Write a file atomically: a temporary file in the same folder, renamed over the target.

    ``durable``: flushed to disk before the rename (survives a machine crash, not only a killed process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: object, durable: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable)
