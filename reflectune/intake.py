"""Dataset intake: a user's file becomes validated records and a table of rejected rows.

A file that cannot be read as a whole (bad JSON, bad bytes, missing columns) stops with an
error naming the file, the line or column and the fix. A row that can be read but is not a
usable pair goes to the rejected table with its reason, so valid + rejected = input rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from reflectune import io
from reflectune.errors import InputFileError
from reflectune.records import RECORD, REJECTED, sample_id

FIELDS = ("instruction", "input", "output")
REQUIRED = ("instruction", "output")


@dataclass
class Intake:
    valid: pl.DataFrame
    rejected: pl.DataFrame
    input_rows: int
    duplicate_rows: int
    source: str

    @property
    def counts(self) -> dict[str, int]:
        return {
            "input_rows": self.input_rows,
            "valid_rows": self.valid.height,
            "rejected_rows": self.rejected.height,
            "duplicate_rows": self.duplicate_rows,
        }


@dataclass
class _Raw:
    rows: list[Any]
    where: list[str] = field(default_factory=list)  # "line 7" or "row 7", for messages


def parse_column_map(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    """`["instruction=prompt", "output=completion"]` -> {"instruction": "prompt", ...}."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise InputFileError(f"column mapping '{item}' is not FIELD=COLUMN, e.g. instruction=prompt")
            key, _, value = item.partition("=")
            pairs.append((key.strip(), value.strip()))
    bad = [k for k, _ in pairs if k not in FIELDS]
    if bad:
        raise InputFileError(
            f"column mapping names unknown field(s) {bad}: map any of {list(FIELDS)} to your column names"
        )
    return dict(pairs)


def load(uri: str, column_map: dict[str, str] | None = None, limit: int | None = None) -> Intake:
    """Read and validate a dataset. `limit` keeps the first N input rows (for trial runs)."""
    column_map = column_map or {}
    raw = _read(uri, column_map)
    rows, where = raw.rows, raw.where
    if not rows:
        raise InputFileError(f"{uri}: the file holds no rows: give a file with at least one instruction-response pair")
    if limit is not None:
        rows, where = rows[:limit], where[:limit]

    valid: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}
    duplicates = 0
    for index, row in enumerate(rows):
        pair, problems = _validate(row, column_map)
        if problems:
            rejected.append(
                {"source_index": index, "sample_id": None, "reason": f"{where[index]}: " + "; ".join(problems), "raw": _dump(row)}
            )
            continue
        sid = sample_id(pair["instruction"], pair["input"], pair["output"])
        if sid in first_seen:
            duplicates += 1
            rejected.append(
                {
                    "source_index": index,
                    "sample_id": sid,
                    "reason": f"{where[index]}: duplicate of {where[first_seen[sid]]} (same instruction, input and output)",
                    "raw": _dump(row),
                }
            )
            continue
        first_seen[sid] = index
        valid.append({"sample_id": sid, "source_index": index, **pair})

    return Intake(
        valid=pl.DataFrame(valid, schema=RECORD),
        rejected=pl.DataFrame(rejected, schema=REJECTED),
        input_rows=len(rows),
        duplicate_rows=duplicates,
        source=uri,
    )


def _validate(row: Any, column_map: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    if not isinstance(row, dict):
        return {}, [f"the row is a JSON {type(row).__name__}, not an object with instruction/output fields"]
    pair: dict[str, str] = {}
    problems: list[str] = []
    for name in FIELDS:
        column = column_map.get(name, name)
        value = row.get(column)
        label = f"field '{column}'" + (f" (mapped to {name})" if column != name else "")
        if name == "input" and value is None:
            pair[name] = ""
        elif column not in row:
            problems.append(f"{label} is missing: add it, or map another column with --map {name}=COLUMN")
        elif value is None:
            problems.append(f"{label} is null: give it a text value or drop the row")
        elif not isinstance(value, str):
            problems.append(f"{label} is {_a(type(value).__name__)}, not a string: store it as text")
        elif name in REQUIRED and not visible(value):
            what = "an instruction" if name == "instruction" else "a response"
            problems.append(f"{label} is empty: write {what} or drop the row")
        else:
            pair[name] = value
    return pair, problems


def visible(text: str) -> bool:
    """Whether a text has a character that shows: not only spaces, line breaks or invisible
    format characters (zero-width space, byte order mark, soft hyphen)."""
    import unicodedata

    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc", "Zs") for ch in text)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _dump(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def _read(uri: str, column_map: dict[str, str]) -> _Raw:
    lower = uri.lower()
    if lower.endswith(".parquet"):
        return _read_parquet(uri, column_map)
    if not lower.endswith((".json", ".jsonl", ".ndjson")):
        raise InputFileError(f"{uri}: unknown file type: give a .json (array), .jsonl or .parquet file")
    data = _bytes(uri)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputFileError(
            f"{uri}: line {line}: byte 0x{data[exc.start]:02x} at offset {exc.start} is not valid UTF-8: "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"
        ) from None
    stripped = text.lstrip()
    if not stripped:
        return _Raw([])
    if lower.endswith(".json") and stripped.startswith("["):
        return _read_json_array(uri, text)
    if lower.endswith(".json") and "\n" in stripped.rstrip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines, read below
        if isinstance(whole, dict):
            raise InputFileError(f"{uri}: the file holds one JSON object; expected an array of objects "
                                 "([{...}, ...]) or JSON Lines (one object per line): wrap the object in [ ]")
    if lower.endswith(".json") and not stripped.startswith("{"):
        raise InputFileError(
            f"{uri}: line 1: expected a JSON array of objects ('[{{...}}, ...]') or JSON Lines: "
            "convert the file to one of those forms"
        )
    return _read_jsonl(uri, text)


def _bytes(uri: str) -> bytes:
    try:
        return io.read_bytes(uri)
    except FileNotFoundError:
        raise InputFileError(f"{uri}: no such file: check the path") from None
    except IsADirectoryError:
        raise InputFileError(f"{uri}: is a folder, not a file: give the data file inside it") from None


def _read_json_array(uri: str, text: str) -> _Raw:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{uri}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}): fix the file there"
        ) from None
    if not isinstance(rows, list):
        raise InputFileError(f"{uri}: the top level is a JSON {type(rows).__name__}, expected an array of objects")
    return _Raw(rows, [f"row {i}" for i in range(len(rows))])


def _read_jsonl(uri: str, text: str) -> _Raw:
    rows, where = [], []
    # lines end at \n alone: U+2028, U+2029 and U+0085 are characters a JSON string may hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputFileError(
                f"{uri}: line {number}, column {exc.colno}: invalid JSON ({exc.msg}): "
                "each line must hold one complete JSON object"
            ) from None
        where.append(f"line {number}")
    return _Raw(rows, where)


def _read_parquet(uri: str, column_map: dict[str, str]) -> _Raw:
    import io as _io

    data = _bytes(uri)
    try:
        table = pq.read_table(_io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputFileError(f"{uri}: not a readable Parquet file ({exc}): re-export it as Parquet") from None
    wanted = {name: column_map.get(name, name) for name in FIELDS}
    missing = [f"'{col}' (for {name})" for name, col in wanted.items() if name in REQUIRED and col not in table.column_names]
    if missing:
        raise InputFileError(
            f"{uri}: column {', '.join(missing)} not found; the file has columns {table.column_names}: "
            "rename them, or map yours with --map instruction=COLUMN --map output=COLUMN"
        )
    present = [col for col in wanted.values() if col in table.column_names]
    rows = table.select(present).to_pylist()
    return _Raw(rows, [f"row {i}" for i in range(len(rows))])
