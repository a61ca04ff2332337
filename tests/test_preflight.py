"""What a user can get wrong is named before a run starts: exit 2, one message with the file,
line or field and the fix, within seconds, no retry, nothing written, no traceback."""

import gzip
import os
import subprocess
import sys
import time

import polars as pl

from reflectune.cli import main

from .conftest import ROOT, SAMPLE

GOOD = '{"instruction": "Name a colour.", "output": "Red."}\n'


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def bad_inputs(tmp_path):
    """(what, input, expected message) for files that cannot be read."""
    folder = tmp_path / "x.jsonl"
    folder.mkdir()
    wrong = tmp_path / "wrong.parquet"
    pl.DataFrame({"prompt": ["a"], "completion": ["b"]}).write_parquet(wrong)
    whole = tmp_path / "whole.parquet"
    pl.DataFrame({"instruction": ["a"] * 50, "output": ["b"] * 50}).write_parquet(whole)
    return [
        ("missing file", str(tmp_path / "nope.jsonl"), "nope.jsonl: no such file: check the path"),
        ("a folder", str(folder), "x.jsonl: is a folder, not a file"),
        ("trailing comma", write(tmp_path, "comma.json", '[{"instruction": "a", "output": "b"},]'),
         "comma.json: line 1, column 38: invalid JSON"),
        ("NUL byte", write(tmp_path, "nul.jsonl", GOOD + '{"instruction": "a\x00", "output": "b"}\n'),
         "nul.jsonl: line 2, column"),
        ("Latin-1", write(tmp_path, "latin.jsonl", GOOD.encode() + '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1")),
         "latin.jsonl: line 2: byte 0xe9"),
        ("gzip", write(tmp_path, "zipped.jsonl", gzip.compress(GOOD.encode())), "zipped.jsonl: line 1: byte 0x8b"),
        ("wrong columns", str(wrong), "column 'instruction' (for instruction), 'output' (for output) not found"),
        ("truncated parquet", write(tmp_path, "cut.parquet", whole.read_bytes()[:300]), "cut.parquet: not a readable Parquet file"),
        ("empty", write(tmp_path, "empty.jsonl", "\n"), "empty.jsonl: the file holds no rows"),
    ]


def refused(capsys, tmp_path, *args, env=None):
    """Run `reflectune recycle ARGS` here; returns (exit code, stderr, seconds)."""
    out = tmp_path / "out"
    saved = dict(os.environ)
    os.environ.update(env or {})
    start = time.monotonic()
    try:
        code = main(["recycle", *args, "--no-train", "--method", "cherry"]
                    + ([] if "--out" in args else ["--out", str(out)]))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert not out.exists(), "a refused run wrote its output folder"
    return code, err, seconds


def test_a_file_that_cannot_be_read_is_named_at_once(capsys, tmp_path):
    for what, path, expected in bad_inputs(tmp_path):
        code, err, seconds = refused(capsys, tmp_path, path)
        assert code == 2 and expected in err, (what, err)
        assert err.count("reflectune: error:") == 1 and "Traceback" not in err, (what, err)
        assert seconds < 10, (what, seconds)


def test_bad_parameters_and_places_are_named(capsys, tmp_path):
    taken = write(tmp_path, "taken", "a file")
    code, err, _ = refused(capsys, tmp_path, str(SAMPLE), "--out", taken)
    assert code == 2 and "output " + taken + ": is a file: the output is a folder" in err
    code, err, _ = refused(capsys, tmp_path, str(SAMPLE), "--params", str(tmp_path / "none.json"))
    assert code == 2 and "--params " + str(tmp_path / "none.json") + ": no such file" in err
    bad = write(tmp_path, "bad.json", '{"shard_size": 4,\n "limit": }')
    code, err, _ = refused(capsys, tmp_path, str(SAMPLE), "--params", bad)
    assert code == 2 and "bad.json: line 2, column 11: invalid JSON" in err
    code, err, _ = refused(capsys, tmp_path, str(SAMPLE), "--teacher-engine", "openai", "--teacher", "gpt-x",
                           "--base-url", "http://someone:hunter2-password@127.0.0.1:9/v1", "--method", "selective")
    assert code == 2 and "teacher.base_url carries a user name or password" in err and "hunter2" not in err


def test_s3_without_credentials_or_endpoint_is_named_in_seconds(capsys, tmp_path):
    no_keys = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
               "REFLECTUNE_S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    code, err, seconds = refused(capsys, tmp_path, "s3://bucket/data.jsonl", env=no_keys)
    assert code == 2 and "no S3 credentials were found: set AWS_ACCESS_KEY_ID" in err and seconds < 10, err
    unreachable = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret-value-1234",
                   "REFLECTUNE_S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    code, err, seconds = refused(capsys, tmp_path, "s3://bucket/data.jsonl", env=unreachable)
    assert code == 2 and "cannot reach the S3 endpoint http://127.0.0.1:9: check REFLECTUNE_S3_ENDPOINT_URL" in err
    assert seconds < 10 and "secret-value-1234" not in err


def test_the_command_itself_exits_2_without_a_traceback(tmp_path):
    bad = write(tmp_path, "comma.json", '[{"instruction": "a", "output": "b"},]')
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "reflectune.cli", "recycle", bad, "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and time.monotonic() - start < 30
    assert done.stderr.strip().splitlines() == [f"reflectune: error: {bad}: line 1, column 38: invalid JSON "
                                                "(Expecting value): fix the file there"]
