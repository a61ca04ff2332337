"""Re-recycling: find the rows of a watched location that no earlier run has seen.

A ledger (`{root}/ledger.parquet`) keeps one key per input row already taken by a run: a hash
of the row exactly as it was read, so a row counts as seen whether it was valid or rejected,
and a row edited in place counts as new. New rows are written, as they were read, to a batch
input named after their keys; the batch is then recycled into its own folder beside the
earlier ones, and only after it finished are its keys added to the ledger. A batch that
failed is therefore found again, under the same name, and resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import polars as pl

from reflectune import intake, io, records
from reflectune.run_folder import RecyclingRoot
from reflectune.errors import InputFileError

SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet")
LEDGER: dict[str, pl.DataType] = {"key": pl.String, "source": pl.String, "batch": pl.String, "added_at": pl.String}


@dataclass
class Batch:
    name: str  # batch-<hash of its keys>: the same new rows always give the same name
    input: str  # the new rows, as JSON Lines
    output: str  # where this batch's recycle run writes
    keys: list[str]
    sources: list[str]
    files: int  # files seen in the watched location
    seen_rows: int  # rows skipped because an earlier run took them


def list_inputs(location: str) -> list[str]:
    """Data files directly under a folder or an s3:// prefix (or the one file named), sorted."""
    fs, path = io.filesystem(location)
    if fs.isfile(path):
        return [location]
    if not fs.exists(path):
        raise InputFileError(f"{location}: the watched location does not exist: create it or fix the path")
    return io.ls(location, SUFFIXES)


def row_key(row: Any) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:24]


def read_ledger(root: str) -> pl.DataFrame:
    uri = RecyclingRoot(root).ledger
    return io.read_parquet(uri) if io.exists(uri) else pl.DataFrame(schema=LEDGER)


def new_batch(location: str, root: str, column_map: dict[str, str] | None = None) -> Batch | None:
    """The rows under `location` that the ledger under `root` has not seen, written as a
    batch input under `root`; None when there is nothing new."""
    seen = set(read_ledger(root)["key"].to_list())
    files = list_inputs(location)
    rows, keys, sources, skipped = [], [], [], 0
    for uri in files:
        for row in intake._read(uri, column_map or {}).rows:
            key = row_key(row)
            if key in seen:
                skipped += 1
                continue
            rows.append(row)
            keys.append(key)
            sources.append(uri)
    if not rows:
        return None
    name = "batch-" + hashlib.sha256("".join(sorted(keys)).encode()).hexdigest()[:12]
    batch_input = RecyclingRoot(root).batch_input(name)
    if not io.exists(batch_input):
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        io.write_bytes(batch_input, text.encode("utf-8"))
    return Batch(name, batch_input, RecyclingRoot(root).run(name), keys, sources, len(files), skipped)


def record(root: str, batch: Batch) -> int:
    """Add a finished batch's keys to the ledger; returns the ledger's size."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    added = pl.DataFrame({"key": batch.keys, "source": batch.sources, "batch": [batch.name] * len(batch.keys),
                          "added_at": [now] * len(batch.keys)}, schema=LEDGER)
    ledger = pl.concat([read_ledger(root), added]).unique("key", keep="first", maintain_order=True)
    records.write(ledger, RecyclingRoot(root).ledger)
    return ledger.height
