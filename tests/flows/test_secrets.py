"""No secret in any output: an endpoint that echoes the Authorization header in its errors,
run through `reflectune recycle`; every table read as a table, every other file, the log and
the Prefect server's database searched for the key."""

import json
import os
import subprocess
import sys

import polars as pl

from reflectune.emulator import Emulator

from ..conftest import ROOT, SAMPLE

CANARY = "sk-canary-7f3a9c1e5b2d4086"


def test_a_key_echoed_by_the_endpoint_reaches_no_output(prefect_server, tmp_path):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:3]
    rows[1]["instruction"] += " ECHO-ME"  # the endpoint answers this row's requests with 400 and the header
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with Emulator(latency=0.0, answer_words=(8, 16), echo_errors="ECHO-ME") as emulator:
        env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "OPENAI_API_KEY": CANARY}
        done = subprocess.run([sys.executable, "-m", "reflectune.cli", "recycle", str(data), "--out", str(out),
                               "--teacher", "emulated", "--teacher-engine", "openai", "--base-url", emulator.url,
                               "--max-new-tokens", "64", "--no-train", "student.max_length=256"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = pl.concat([pl.read_parquet(p) for p in (out / "variants").glob("*.parquet")])
    echoed = variants.filter(pl.col("parse_detail").str.contains("bad request from"))
    assert echoed.height >= 1, "the endpoint did not echo: the test would prove nothing"
    assert "Bearer [redacted]" in echoed["parse_detail"][0]
    leaks = []
    for path in out.rglob("*"):
        if path.is_dir():
            continue
        text = (json.dumps(pl.read_parquet(path).to_dicts(), default=str) if path.suffix == ".parquet"
                else path.read_text(errors="replace"))
        if CANARY in text:
            leaks.append(str(path))
    assert not leaks
    assert CANARY not in done.stderr + done.stdout
    database = list(prefect_server["home"].glob("prefect.db*"))  # with its write-ahead log
    assert database and not [p for p in database if CANARY.encode() in p.read_bytes()]
