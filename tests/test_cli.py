import json
import os
import re
import subprocess
import sys

import polars as pl
import pytest

from reflectune.errors import ModelSpecError
from reflectune.models import home, resolve
from reflectune.records import SCORE_COLUMNS

from .conftest import MODEL, ROOT, SAMPLE


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "reflectune.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_score_command_writes_every_valid_row_in_order(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:5]
    rows.insert(2, {"instruction": "No answer here"})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.parquet"
    result = run_cli("score", str(src), "--out", str(out), "--student", MODEL, "--template", "vicuna")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out)
    assert df.columns[:5] == ["sample_id", "source_index", "instruction", "input", "output"]
    assert set(SCORE_COLUMNS) <= set(df.columns)
    assert df["source_index"].to_list() == [0, 1, 3, 4, 5]
    assert df["ifd_ppl"].is_nan().sum() == 0
    assert "scoring" in result.stderr  # the progress bar
    assert "6 input rows: 5 scored, 1 rejected" in result.stderr
    rejected = pl.read_parquet(tmp_path / "scores.rejected.parquet")
    assert rejected["source_index"].to_list() == [2]


def test_score_command_writes_jsonl(tmp_path):
    out = tmp_path / "scores.jsonl"
    result = run_cli("score", str(SAMPLE), "--out", str(out), "--limit", "3")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all(line["rifd_ppl"] > 0 for line in lines)


def test_malformed_input_exits_nonzero_and_writes_nothing(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{oops}\n')
    out = tmp_path / "scores.parquet"
    result = run_cli("score", str(src), "--out", str(out))
    assert result.returncode == 2
    assert "bad.jsonl: line 2" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_models_prepare_and_specs(tmp_path):
    result = run_cli("models", "prepare")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert path == str(home() / "models" / "smollm2-135m-instruct")
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    assert resolve(path) == path  # a local directory works as a spec
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelSpecError, match="could not be fetched from the Hugging Face hub"):
        resolve("some-org/not-a-local-model")
    with pytest.raises(ModelSpecError, match="unknown packaged model"):
        resolve("packaged:nope")


def test_plan_counts_the_real_tokens_and_estimates_time(tokenizer, sample_rows):
    from reflectune import plan, prompts
    from reflectune.scoring import build_sequences

    result = plan.plan(str(SAMPLE), tokenizer, shard_size=8, max_new_tokens=64)
    stages = {s.name: s for s in result["stages"]}
    assert (result["valid_rows"], result["shards"]) == (41, 6)
    # what the student reads is what the scorer builds, four variants of it
    exact = sum(len(s.ids) for parts in build_sequences(sample_rows, tokenizer) for s in parts.values()
                if not isinstance(s, str))
    assert stages["student"].reads == 4 * exact
    # what the teacher reads is its real prompts: ins once, res twice (res and ins_res)
    def tokens(chat):
        return len(tokenizer("\n".join(m["content"] for m in chat), add_special_tokens=False)["input_ids"])
    ins = sum(tokens(prompts.instruction_reflection(r["instruction"], r.get("input", ""), r["output"])) for r in sample_rows)
    res = sum(tokens(prompts.response_reflection(r["instruction"], r.get("input", ""), r["output"])) for r in sample_rows)
    assert stages["teacher"].reads == ins + 2 * res
    assert 3 * 41 <= stages["teacher"].writes <= 3 * 41 * 64  # at most max_new_tokens per answer

    # time follows the basis it names: a given rate is used as given ...
    given = plan.plan(str(SAMPLE), tokenizer, throughput={"student": 5000.0})
    assert given["stages"][1].basis == "given" and given["stages"][1].seconds == stages["student"].reads / 5000
    # ... the CPU figure scales with model size: a 52x larger student takes 52x longer
    big = plan.plan(str(SAMPLE), tokenizer, student_params=52 * plan.PACKAGED_PARAMS)
    assert big["stages"][1].seconds == pytest.approx(52 * stages["student"].seconds)
    # ... and an H100 runs a 7B student faster than these 2 cores run the 135M one
    gpu = plan.plan(str(SAMPLE), tokenizer, device="h100", student_params=plan.parse_size("7B"))
    assert gpu["stages"][1].seconds < stages["student"].seconds and gpu["stages"][1].basis.startswith("H100")

    done = run_cli("plan", str(SAMPLE), "--teacher-size", "70B", "--device", "h100", "--student-tps", "5000")
    assert done.returncode == 0, done.stderr
    assert "41 rows, 41 valid" in done.stdout and re.search(r"student .* 5,000 .* given", done.stdout)
    bad = run_cli("plan", str(SAMPLE), "--teacher-size", "huge")
    assert bad.returncode == 2 and "write it like 135M, 7B or 70B" in bad.stderr
