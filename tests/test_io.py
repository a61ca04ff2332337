"""Files in and out: local and S3 (moto server on loopback) read and write the same, and
writes are atomic even when the writer is killed midway."""

import polars as pl

from reflectune import intake, io

from .conftest import ROOT, SAMPLE


def test_reads_and_writes_s3(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/in/pairs.jsonl"
    io.write_bytes(uri, SAMPLE.read_bytes())
    data = intake.load(uri)
    local = intake.load(str(SAMPLE))
    assert data.valid.equals(local.valid)
    io.write_table(data.valid, f"s3://{s3_bucket}/out/valid.parquet")
    assert io.read_parquet(f"s3://{s3_bucket}/out/valid.parquet").equals(local.valid)


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / "sub" / "t.parquet"
    io.write_table(pl.DataFrame({"a": [1]}), str(target))
    assert [p.name for p in target.parent.iterdir()] == ["t.parquet"]  # no temporary left behind


def test_a_write_killed_midway_leaves_the_old_file(tmp_path):
    """The writer is stopped with SIGKILL after the new bytes are on disk but before they
    replace the old file: the old file stands, whole."""
    import select
    import subprocess
    import sys

    target = tmp_path / "t.parquet"
    io.write_table(pl.DataFrame({"a": [1, 2, 3]}), str(target))
    before = target.read_bytes()
    writer = f"""
import os, time
from reflectune import io
real = os.fsync
def stall(fd):
    real(fd)
    print("written", flush=True)
    time.sleep(600)
os.fsync = stall
io.write_bytes({str(target)!r}, b"new content " * 100_000)
"""
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline() == b"written\n"
    finally:
        proc.kill()
        proc.wait(10)
    assert target.read_bytes() == before
    assert pl.read_parquet(target)["a"].to_list() == [1, 2, 3]
