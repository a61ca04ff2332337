"""Files in and out, local or remote (s3:// and any fsspec URL).

Writes are atomic: a local file is written under a temporary name and renamed, a remote
object is uploaded in one PUT, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import polars as pl


def storage_options(uri: str, quick: bool = False) -> dict[str, Any]:
    """Options for remote filesystems, from the environment only (never from parameters that
    could end up in logs). s3: AWS_* credentials are read by botocore itself; an endpoint for
    S3-compatible stores comes from AWS_ENDPOINT_URL or REFLECTUNE_S3_ENDPOINT_URL. `quick`:
    a check before a run, which answers in seconds rather than retrying."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("REFLECTUNE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        # a stalled connection is dropped and retried rather than waited on forever
        opts: dict[str, Any] = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 120,
                                                  "retries": {"max_attempts": 5, "mode": "standard"}}}
        if quick:
            opts = {"config_kwargs": {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1}},
                    "skip_instance_cache": True}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(uri: str, quick: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, quick))
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def ls(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """The files directly under a folder or prefix, as URIs of the same kind, sorted; [] when
    there is no such folder."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return sorted(f"{protocol}{p}" for p in fs.ls(path, detail=False) if p.lower().endswith(suffixes or ("",)))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if is_local(fs):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def write_table(df: pl.DataFrame, uri: str, metadata: dict[str, str] | None = None) -> None:
    """Write by extension: .parquet (with `metadata` in its footer), .jsonl or .json (an array
    of objects). The project's tables are written by records.write, which stamps their schema."""
    buf = io.BytesIO()
    if uri.endswith(".parquet"):
        df.write_parquet(buf, metadata=metadata)
    elif uri.endswith(".jsonl"):
        df.write_ndjson(buf)
    elif uri.endswith(".json"):
        buf.write(json.dumps(df.to_dicts(), ensure_ascii=False, indent=1).encode("utf-8"))
    else:
        raise ValueError(f"cannot write '{uri}': use a .parquet, .jsonl or .json name")
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(read_bytes(uri)))


def write_json(obj: Any, uri: str) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def remove(uri: str) -> None:
    """Delete a file; one already gone is fine."""
    fs, path = filesystem(uri)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
