"""The OpenAI-compatible teacher engine against `vllm serve` (the packaged model), directly
and behind a proxy that injects faults or refuses structured outputs: retries, fatal errors,
a bad request failing its row only, the key kept secret, and each way of holding the output
format that a server may take."""

import json
import os

import polars as pl
import pytest

from reflectune.engines.openai_compat import OpenAITeacher, TeacherFatalError
from reflectune.records import VARIANT, check_columns
from reflectune.reflection import Sampling, reflect

from ..conftest import ROOT, SAMPLE, WELL_FORMED
from ..fault_proxy import FaultProxy

SECRET = "sk-test-0123456789abcdef-never-print-me"


@pytest.fixture()
def proxy(vllm_server):
    p = FaultProxy("127.0.0.1", vllm_server["port"])
    yield p
    p.close()


def openai_teacher(proxy, vllm_server, **kw):
    return OpenAITeacher(vllm_server["model"], base_url=f"{proxy.url}/v1", api_key=SECRET,
                         backoff_base=0.2, backoff_max=2.0, **kw)


def test_openai_engine_retries_through_faults_and_loses_nothing(proxy, vllm_server, reflection_records, tmp_path):
    proxy.set_faults(["429", "500", "close", "503", "429"])
    engine = openai_teacher(proxy, vllm_server, concurrency=4)
    variants = reflect(reflection_records, engine, "both", Sampling(max_new_tokens=64))
    check_columns(variants, VARIANT, "reflect")
    assert variants.height == 3 * reflection_records.height
    assert proxy.log[:5] == ["429", "500", "close", "503", "429"]
    assert engine.usage.retries >= 5 and engine.usage.failed == 0
    assert not any("request failed" in (d or "") for d in variants["parse_detail"].to_list())
    assert engine.usage.completion_tokens == variants["completion_tokens"].sum()
    assert engine.teacher_id == f"openai:smollm2@127.0.0.1:{proxy.port}"
    # the key went to the server and nowhere else
    assert any(SECRET.encode() in r for r in proxy.requests)
    out = tmp_path / "v.parquet"
    variants.write_parquet(out)
    assert SECRET not in json.dumps(variants.to_dicts(), default=str) and SECRET.encode() not in out.read_bytes()
    assert SECRET not in repr(engine)


def test_openai_engine_stops_on_auth_errors_with_a_clear_message(proxy, vllm_server, reflection_records):
    proxy.set_faults(["401"] * 20)
    engine = openai_teacher(proxy, vllm_server)
    with pytest.raises(TeacherFatalError, match=r"answered 401 for model 'smollm2': the API key was refused") as err:
        reflect(reflection_records, engine, "response", Sampling(max_new_tokens=16))
    assert SECRET not in str(err.value)


def test_openai_engine_bad_request_fails_that_row_only(proxy, vllm_server, reflection_records):
    # one request at a time, in order: the first row's request and, after the other two rows,
    # the first row's retry get 400 (a 400 is not retried within a request)
    proxy.set_faults(["400", "pass", "pass", "400"])
    engine = openai_teacher(proxy, vllm_server, concurrency=1)
    variants = reflect(reflection_records, engine, "response", Sampling(max_new_tokens=32))
    assert variants.height == reflection_records.height
    failed = variants.filter(pl.col("parse_detail").str.contains("request failed: HTTP 400"))
    assert failed.height == 1 and failed["parse_status"][0] == "fallback"
    assert failed["raw_text"][0][0].startswith("[request failed: HTTP 400")
    assert failed["source_index"][0] == reflection_records["source_index"][0]
    assert proxy.log[:4] == ["400", "pass", "pass", "400"] and engine.usage.failed == 2


def test_reflect_cli_with_the_openai_engine(vllm_server, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "variants.jsonl"
    env = {**os.environ, "MY_TEACHER_KEY": SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "reflectune.cli", "reflect", str(SAMPLE), "--limit", "2", "--out", str(out),
         "--engine", "openai", "--teacher", vllm_server["model"], "--base-url", f"{vllm_server['url']}/v1",
         "--api-key-env", "MY_TEACHER_KEY", "--kind", "response", "--max-new-tokens", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["res", "res"]
    assert "reflecting" in result.stderr and SECRET not in result.stderr + result.stdout + out.read_text()


def test_constrained_generation_through_vllm_serve(proxy, vllm_server, reflection_records):
    engine = openai_teacher(proxy, vllm_server, concurrency=4)
    variants = reflect(reflection_records, engine, "both", Sampling(max_new_tokens=96, constrained="auto"))
    assert engine.constraint == "regex" and b'"structured_outputs"' in proxy.requests[0]
    assert all(how == "regex" for attempts in variants["constrained"] for how in attempts)
    # the server held every generation to the form: one that ended on its own ends with a closed
    # field and is well formed; only one stopped by the token limit can miss it (as in the
    # reference, a cut answer is kept, and with the reference's retry rule it is not retried)
    for row in variants.iter_rows(named=True):
        if row["raw_text"][-1].rstrip().endswith("[End]"):
            assert row["parse_status"] in WELL_FORMED, row
    assert variants["parse_status"].is_in(WELL_FORMED).mean() >= 0.75, variants["parse_status"].to_list()


def test_a_server_that_takes_only_json_schemas_gets_them(vllm_server, reflection_records):
    proxy = FaultProxy("127.0.0.1", vllm_server["port"], refuse=("structured_outputs",))
    try:
        engine = openai_teacher(proxy, vllm_server, concurrency=4)
        variants = reflect(reflection_records, engine, "response", Sampling(max_new_tokens=96, constrained="auto"))
    finally:
        proxy.close()
    assert proxy.log[0] == "refused" and engine.constraint == "json_schema"
    assert all(attempts[0] == "json_schema" for attempts in variants["constrained"])
    first = json.loads(variants["raw_text"][0][0])  # the teacher's own text is kept: JSON
    assert set(first) == {"analysis", "better_answer"}
    assert variants["parse_status"].is_in(WELL_FORMED).mean() >= 0.6, variants["parse_status"].to_list()


def test_a_server_without_structured_outputs_degrades_to_free_text(vllm_server, reflection_records):
    proxy = FaultProxy("127.0.0.1", vllm_server["port"], refuse=("structured_outputs", "response_format"))
    try:
        engine = openai_teacher(proxy, vllm_server, concurrency=4)
        variants = reflect(reflection_records, engine, "response", Sampling(max_new_tokens=32, constrained="auto"))
        assert proxy.log[:2] == ["refused", "refused"] and engine.constraint == "none"
        # recorded, never a failed run: every row has its free-text attempt(s)
        assert variants.height == reflection_records.height
        assert all(how == "none" for attempts in variants["constrained"] for how in attempts)
        strict = openai_teacher(proxy, vllm_server)
        with pytest.raises(TeacherFatalError, match="takes neither vLLM's structured outputs nor JSON-schema"):
            reflect(reflection_records, strict, "response", Sampling(max_new_tokens=32, constrained="on"))
    finally:
        proxy.close()


def test_verification_through_a_server_that_takes_only_json_schemas(vllm_server, reflection_records):
    """teacher.verify's one-word answer, asked of `vllm serve` as a JSON schema and read back."""
    from reflectune.reflection import verdict, verification

    proxy = FaultProxy("127.0.0.1", vllm_server["port"], refuse=("structured_outputs",))
    try:
        engine = openai_teacher(proxy, vllm_server, concurrency=4)
        pairs = reflection_records.to_dicts()
        gens = verification(pairs, engine, Sampling(constrained="auto"))
    finally:
        proxy.close()
    assert engine.constraint == "json_schema" and len(gens) == len(pairs), [(g.text, g.finish_reason) for g in gens]
    for gen in gens:
        assert gen.constrained == "json_schema" and json.loads(gen.text)["verdict"] in ("Yes", "No"), gen
        assert verdict(gen) in ("yes", "no") and gen.error is None
