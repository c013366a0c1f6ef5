"""One checked reader per local file format: rows as plain dicts, each with where it came from.

Formats (by extension, optionally compressed with .gz, .bz2, .xz or .zst):

* ``.jsonl`` - one JSON object per line; blank lines are ignored.
* ``.json`` - a list of objects, an object holding one such list (``{"data": [...]}``), an object of
  equal-length columns, or JSON lines under a .json name.
* ``.csv`` - a header line, then one row per record (quoted fields may span lines).
* ``.txt`` - one text per paragraph (blank lines separate texts).
* ``.parquet`` - any parquet file pyarrow reads.

Every failure is a `DataError` of one line naming the file, the 1-based line (text formats) or row
(parquet, JSON lists) where it is known, and what to do. A problem that spoils one record (a line that is
not JSON, a line that is not UTF-8) is a *row problem* (`Problem`): the caller reports every one of them
at once, or skips them with ``data.on_bad_row: skip``. A problem that spoils the whole file (an empty
file, a corrupt compressed stream or parquet file, a JSON document that does not parse) is raised at once.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_dist.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}


@dataclass
class Problem:
    """One bad row: where (``line 12`` / ``row 12``), the field (or None), the reason code, the words."""

    where: str
    reason: str
    message: str
    field: str | None = None

    def describe(self) -> str:
        return f"{self.where}: " + (f"field '{self.field}' " if self.field else "") + self.message


@dataclass
class Table:
    """What a reader found: the rows, where each came from, and the rows it could not read."""

    rows: list[dict] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for key in row:
                seen.setdefault(key, None)
        return list(seen)


def file_format(path: str | Path) -> tuple[str | None, str | None]:
    """(format, compression) from a file name such as ``pairs.jsonl.gz``; format None when unknown."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (FORMATS.get(suffixes[-1]) if suffixes else None), compression


def supported_names() -> str:
    return ", ".join(FORMATS) + " (each also as " + "/".join(COMPRESSIONS) + ")"


def _raw_bytes(path: Path, compression: str | None) -> bytes:
    """The file's bytes, decompressed; a damaged or truncated stream is one line naming the file."""
    try:
        if compression is None:
            return path.read_bytes()
        if compression == "gzip":
            return gzip.decompress(path.read_bytes())
        if compression == "bzip2":
            return bz2.decompress(path.read_bytes())
        if compression == "xz":
            return lzma.decompress(path.read_bytes())
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst files needs the zstandard package; pip install zstandard "
                            "(or decompress the file)") from None
        with zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as reader:
            data = reader.read()
        return data
    except DataError:
        raise
    except Exception as exc:  # OSError, EOFError, lzma.LZMAError, zstandard.ZstdError, ...: each library has its own
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable {compression or 'file'} ({detail}); the file is damaged or cut off "
                        "(re-download it, or check it with the matching tool, e.g. gzip -t)") from None


def _decode_line(raw: bytes, lineno: int) -> tuple[str | None, Problem | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, Problem(f"line {lineno}", "not_utf8", f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                             f"{exc.start + 1}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8")


def _decode_all(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
                        "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def read_jsonl(path: Path, data: bytes) -> Table:
    table = Table()
    lines = data.split(b"\n")
    cut_off = not data.endswith(b"\n")  # the last line has no newline: a cut-off download shows up there
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        lineno = i + 1
        if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        text, problem = _decode_line(raw, lineno)
        if problem is None:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                hint = ("the line is cut off: the file looks truncated (re-download it, or remove the line)"
                        if i == last and cut_off else "each line must be one JSON object")
                problem = Problem(f"line {lineno}", "not_json", f"is not valid JSON ({exc.msg} at column {exc.colno}); "
                                  f"{hint}")
            else:
                if not isinstance(row, dict):
                    problem = Problem(f"line {lineno}", "not_object", f"is a JSON {type(row).__name__}, not an object "
                                      "({\"field\": value, ...})")
        if problem is not None:
            table.problems.append(problem)
            continue
        table.rows.append(row)
        table.where.append(f"line {lineno}")
    return table


def read_json(path: Path, data: bytes) -> Table:
    text = _decode_all(data, path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines under a .json name, as `datasets` also accepts
            return read_jsonl(path, data)
        ends = text.rstrip()[-1:]
        hint = ("the file ends early: it looks truncated (re-download it)" if ends not in ("]", "}")
                or exc.pos >= len(text.rstrip()) else "fix the JSON there")
        raise DataError(f"{path} line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}); {hint}") from None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(x, dict) for x in doc[lists[0]]):
            doc = doc[lists[0]]  # {"data": [{...}, ...]}
        elif lists and len(lists) == len(doc) and len({len(doc[k]) for k in lists}) == 1:
            doc = [dict(zip(doc, values)) for values in zip(*doc.values())]  # {"col": [...], ...}
        else:
            raise DataError(f"{path}: a JSON object that is neither a list of rows under one key nor columns of equal "
                            "length; give a list of objects [{...}, ...] or one object per line (.jsonl)")
    if not isinstance(doc, list):
        raise DataError(f"{path}: the JSON document is a {type(doc).__name__}; give a list of objects [{{...}}, ...] or "
                        "one object per line (.jsonl)")
    table = Table()
    for i, row in enumerate(doc):
        if isinstance(row, dict):
            table.rows.append(row)
            table.where.append(f"row {i + 1}")
        else:
            table.problems.append(Problem(f"row {i + 1}", "not_object", f"is a JSON {type(row).__name__}, not an object"))
    return table


def read_csv(path: Path, data: bytes) -> Table:
    text = _decode_all(data, path)
    reader = csv.reader(io.StringIO(text, newline=""))
    table = Table()
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{path}: no header line; the first line must name the columns (e.g. prompt,completion)")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{path} line 1: column name(s) {', '.join(dupes)} appear more than once; name each column once")
        start = reader.line_num + 1
        for values in reader:
            where = f"line {start}"
            start = reader.line_num + 1
            if not values or not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                table.problems.append(Problem(where, "wrong_fields", f"has {len(values)} fields, the header {len(header)}; "
                                              "quote fields that contain commas or line breaks"))
                continue
            table.rows.append(dict(zip(header, values)))
            table.where.append(where)
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc}); fix the quoting there") from None
    return table


def read_text(path: Path, data: bytes) -> Table:
    text = _decode_all(data, path)
    table = Table()
    paragraph: list[str] = []
    first = 0
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not paragraph:
                first = lineno
            paragraph.append(line)
        elif paragraph:
            table.rows.append({"text": "\n".join(paragraph)})
            table.where.append(f"line {first}")
            paragraph = []
    return table


def read_parquet(path: Path, data: bytes) -> Table:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pyarrow.BufferReader(data)).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable parquet file ({detail}); re-export or re-download it") from None
    return Table(rows=rows, where=[f"row {i + 1}" for i in range(len(rows))])


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "text": read_text, "parquet": read_parquet}


def read_file(path: str | Path, key: str) -> Table:
    """Read one local data file with the checked reader of its format."""
    path = Path(path).expanduser()
    fmt, compression = file_format(path)
    if fmt is None:
        raise DataError(f"{key}: {path} has an unsupported extension; use one of {supported_names()}")
    data = _raw_bytes(path, compression)
    if not data or data.isspace():  # (no copy of a large file, unlike strip())
        raise DataError(f"{path}: the file is empty; fill it (or point {key} at the right file)")
    table = READERS[fmt](path, data)
    if not table.rows and not table.problems:
        raise DataError(f"{path}: no rows; fill it (or point {key} at the right file)")
    return table


def from_dataset(ds: Any) -> Table:
    """A `datasets.Dataset` (hub or dataset folder) as a Table, rows numbered from 1."""
    rows = ds.to_list()
    return Table(rows=rows, where=[f"row {i + 1}" for i in range(len(rows))])
