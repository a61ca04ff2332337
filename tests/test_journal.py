"""The request journal and the budget, against the provider emulator: a teacher shard killed
near its end resends only what it lacks, another shard size sends nothing again, the budget
stops sending before it is passed, and the spend the journal reports is what the provider
counted."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from reflectune import intake, journal, records, stages
from reflectune.config import TeacherConfig
from reflectune.emulator import Emulator
from reflectune.engines.openai_compat import OpenAITeacher
from reflectune.errors import BudgetExceededError, JournalFileError
from reflectune.records import VARIANT, read

from .conftest import ROOT, SAMPLE

CONCURRENCY = 4


@pytest.fixture()
def emulator():
    with Emulator(latency=0.03) as e:
        yield e


def teacher_config(emulator, **kw):
    return TeacherConfig(**{"model": "emulated", "engine": "openai", "base_url": emulator.url, "max_new_tokens": 256,
                            "concurrency": CONCURRENCY} | kw)


def engine_for(cfg):
    return OpenAITeacher(cfg.model, base_url=cfg.base_url, api_key="sk-test", concurrency=cfg.concurrency,
                         backoff_base=0.1, backoff_max=1.0)


def write_shards(tmp_path, size, limit=None):
    """The bundled sample as shards of `size` rows, as the flow writes them."""
    data = intake.load(str(SAMPLE), limit=limit).valid
    shards = []
    for index, start in enumerate(range(0, data.height, size)):
        part = data.slice(start, size)
        uri = str(tmp_path / "shards" / f"size{size}-{index}.parquet")
        records.write(part, uri)
        shards.append(stages.Shard(index, uri, part.height, f"c{size}-{index}"))
    return shards


def run_shards(shards, cfg, out, journal_at):
    engine = engine_for(cfg)
    results = [stages.teacher_shard(s, f"{out}/{s.name}.parquet", cfg, engine, journal_at) for s in shards]
    return pl.concat([read(r.uri, VARIANT, "test") for r in results]), results


def test_a_killed_shard_resends_only_what_it_lacks_and_another_shard_size_sends_nothing(emulator, tmp_path):
    cfg = teacher_config(emulator, max_new_tokens=512)  # room for every emulated answer: none is cut and retried
    [shard] = write_shards(tmp_path, 64)
    at = str(tmp_path / "run" / "journal")
    needed_before = 3 * shard.rows  # ins, res and ins_res; retries come on top
    # the shard's teacher stage in a process of its own, killed after about 90% of its requests
    script = ("import sys; from reflectune import stages; from reflectune.config import TeacherConfig; "
              "from reflectune.engines.openai_compat import OpenAITeacher; "
              "cfg = TeacherConfig.model_validate_json(sys.argv[1]); "
              "engine = OpenAITeacher(cfg.model, base_url=cfg.base_url, concurrency=cfg.concurrency); "
              f"stages.teacher_shard(stages.Shard(**{shard.__dict__!r}), sys.argv[2], cfg, engine, sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", script, cfg.model_dump_json(), str(tmp_path / "run" / "v.parquet"), at],
                            cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 120
    while emulator.snapshot()["answered"] < 0.9 * needed_before:
        assert proc.poll() is None and time.monotonic() < deadline, "the shard ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait()
    time.sleep(0.3)  # requests the kill left in flight may still be answered
    answered_before = emulator.snapshot()["answered"]
    assert not (tmp_path / "run" / "v.parquet").exists()
    kept = journal.spend(at).requests
    # kept within seconds: lost are the answers of the last flush interval and those in flight
    recent = sum(t >= killed_at - 1.5 for t, _ in emulator.stats.times)
    assert answered_before - kept <= recent + CONCURRENCY

    resumed, [result] = run_shards([shard], cfg, str(tmp_path / "run"), at)
    stats = emulator.snapshot()
    # paid twice: only what the journal did not hold at the kill
    assert 0 < kept and stats["duplicates"] <= answered_before - kept, stats
    assert result.detail["requests_replayed"] == kept
    assert result.detail["requests_sent"] == stats["answered"] - answered_before
    assert result.detail["requests_sent"] + result.detail["requests_replayed"] == result.detail["generations"]

    # an undisturbed run into another folder writes the same variants
    emulator.reset_stats()
    undisturbed, _ = run_shards([shard], cfg, str(tmp_path / "other"), str(tmp_path / "other" / "journal"))
    assert resumed.equals(undisturbed)
    # after the merge the writer's parts are one file; the spend is in the names
    merged = [f for f in journal.files(at) if f.kind == "merged"]
    assert len(merged) == 1 and merged[0].spend.requests == result.detail["requests_sent"]

    # the same rows in shards of another size: nothing is sent again
    emulator.reset_stats()
    again, results = run_shards(write_shards(tmp_path, 16), cfg, str(tmp_path / "run16"), at)
    assert emulator.snapshot()["answered"] == 0 and sum(r.detail["requests_sent"] for r in results) == 0
    assert again.equals(resumed)


def test_the_budget_stops_before_it_is_passed_and_a_larger_one_goes_on_without_paying_twice(emulator, tmp_path):
    shards = write_shards(tmp_path, 8, limit=24)
    at = str(tmp_path / "journal")
    out = str(tmp_path / "variants")
    # about half of what the three shards need
    budget = 3 * 24 * 560 // 2
    cfg = teacher_config(emulator, budget_tokens=budget)
    with pytest.raises(BudgetExceededError) as stop:
        run_shards(shards, cfg, out, at)
    held = journal.spend(at)
    stats = emulator.snapshot()
    assert f"against teacher.budget_tokens {budget:,}" in str(stop.value)
    assert f"spent {held.tokens:,} tokens" in str(stop.value)
    # nothing was sent that could pass the budget; every answer that came back is kept
    assert held.tokens <= budget
    assert (held.requests, held.prompt_tokens + held.completion_tokens) == (
        stats["answered"], stats["prompt_tokens"] + stats["completion_tokens"])
    unfinished = [s for s in shards if stages.done(f"{out}/{s.name}.parquet") is None]
    assert unfinished and all(not os.path.exists(f"{out}/{s.name}.parquet.json") for s in unfinished)

    # a rerun under the same budget pays nothing again and sends at most what still fits
    with pytest.raises(BudgetExceededError):
        run_shards(shards, cfg, out, at)
    rerun = emulator.snapshot()
    assert rerun["duplicates"] == 0 and journal.spend(at).tokens <= budget

    # a larger budget: done, with no request paid for twice; the journal's spend is the provider's count
    variants, results = run_shards(shards, teacher_config(emulator, budget_tokens=10 * budget), out, at)
    stats = emulator.snapshot()
    assert stats["duplicates"] == 0 and variants.height == 3 * 24
    held = journal.spend(at)
    assert (held.requests, held.prompt_tokens, held.completion_tokens) == (
        stats["answered"], stats["prompt_tokens"], stats["completion_tokens"])


def test_a_dollar_budget_counts_at_the_users_prices(emulator, tmp_path):
    shards = write_shards(tmp_path, 6, limit=6)
    cfg = teacher_config(emulator, budget_usd=0.01, price_input_per_m=2.5, price_output_per_m=10.0)
    with pytest.raises(BudgetExceededError, match=r"against teacher.budget_usd 0.01"):
        run_shards(shards, cfg, str(tmp_path / "v"), str(tmp_path / "j"))
    held = journal.spend(str(tmp_path / "j"))
    assert 0 < held.usd(2.5, 10.0) <= 0.01


def test_small_dollar_amounts_are_printed_with_the_digits_they_need():
    """A budget of $0.004 is not "0.00", nor a spend of $0.003 "$0.00": cents from a dollar up,
    two significant digits below."""
    budget = journal.Budget(usd=0.004, price_input_per_m=2.5, price_output_per_m=10.0)
    assert budget.describe(journal.Spend(3, 400, 200)) == (
        "spent 600 tokens (400 prompt, 200 completion; $0.003 at the prices set) in 3 requests, against "
        "teacher.budget_usd 0.004")
    assert [journal.dollars(x) for x in (0, 0.0123, 0.5, 1, 1234.5)] == ["0.00", "0.012", "0.50", "1.00", "1,234.50"]


def test_requests_the_provider_refused_are_sent_and_not_answered(tmp_path):
    """Two chats answered and one refused with 400: three sent, two answered (and kept), and the
    run's summary says both."""
    from reflectune import manifest as run
    from reflectune.config import RecycleParams
    from reflectune.reflection import Sampling

    chats = [[{"role": "user", "content": text}] for text in ("one", "REFUSE-ME two", "three")]
    with Emulator(latency=0.0, echo_errors="REFUSE-ME") as emulator:
        kept = journal.Journal(str(tmp_path / "j"), 0, 2)
        teacher = journal.JournaledTeacher(engine_for(teacher_config(emulator)), kept)
        gens = teacher.generate(chats, Sampling(max_new_tokens=16))
        kept.close(merge=True)
        assert emulator.snapshot()["answered"] == 2
    assert [g.error is None for g in gens] == [True, False, True]
    assert (teacher.sent.requests, teacher.answered.requests) == (3, 2) == (3, journal.spend(str(tmp_path / "j")).requests)
    detail = {**stages.spend_detail("sent", teacher.sent), "requests_answered": teacher.answered.requests}
    spend = run.teacher_spend(RecycleParams(), [{"detail": detail}], journal.spend(str(tmp_path / "j")))
    assert run.spend_line(spend).startswith("teacher requests: 3 sent (2 answered, 1 refused or failed), ")


def test_the_journal_on_s3_keeps_and_replays(emulator, s3_bucket, tmp_path):
    cfg = teacher_config(emulator, max_new_tokens=512)  # none cut: 3 requests a row
    shards = write_shards(tmp_path, 6, limit=6)
    at = f"s3://{s3_bucket}/run/journal"
    first, _ = run_shards(shards, cfg, f"s3://{s3_bucket}/run/v", at)
    emulator.reset_stats()
    second, [result] = run_shards(shards, cfg, f"s3://{s3_bucket}/run/w", at)
    assert emulator.snapshot()["answered"] == 0 and result.detail["requests_replayed"] == 18
    assert first.equals(second) and [f.kind for f in journal.files(at)] == ["merged"]


def test_a_local_engine_journals_each_batch_and_replays(teacher, reflection_records, tmp_path):
    """transformers: each batch is kept as it finishes; a rerun asks the engine for nothing."""
    from reflectune import reflection

    calls = []

    class Counting:
        teacher_id = teacher.teacher_id

        def generate(self, chats, sampling, progress=None, formats=None, **kw):
            calls.append(len(chats))
            return teacher.generate(chats, sampling, progress, formats, **kw)

    sampling = reflection.Sampling(max_new_tokens=16)
    at = str(tmp_path / "journal")
    first = journal.Journal(at, 0, 100)
    runs, asked = [], []
    for kept in (first, journal.Journal(at, 0, 100)):
        engine = journal.JournaledTeacher(Counting(), kept)
        runs.append(reflection.reflect(reflection_records, engine, "response", sampling))
        kept.close(merge=True)
        asked.append(sum(calls))
        calls.clear()
    # the first run asked for each row (and the retries of unusable answers); the second for nothing
    assert asked[0] >= reflection_records.height and asked[1] == 0 and runs[0].equals(runs[1])
    assert journal.spend(at).requests == asked[0]


def test_verification_is_paid_once_journaled_and_falls_back_on_no(emulator, tmp_path):
    """teacher.verify: one more request per usable rewrite, through the journal and the budget;
    a No makes the variant its base pair with status verify; a rerun pays for nothing."""
    cfg = teacher_config(emulator, max_new_tokens=512, verify=True)  # none cut: every rewrite is verified
    shards = write_shards(tmp_path, 6, limit=6)
    at = str(tmp_path / "journal")
    variants, [result] = run_shards(shards, cfg, str(tmp_path / "v"), at)
    stats = emulator.snapshot()
    held = journal.spend(at)
    # 18 reflections and 18 verifications, each paid once and journaled (an ins_res whose ins
    # fell back asks what its res asked: answered from the journal)
    assert result.detail["generations"] == 36 and stats["duplicates"] == 0
    assert stats["answered"] == held.requests == result.detail["requests_sent"] > 18
    assert result.detail["requests_sent"] + result.detail["requests_replayed"] == 36
    assert result.detail["sent_prompt_tokens"] + result.detail["sent_completion_tokens"] == held.tokens
    originals = {r["source_index"]: r for r in intake.load(str(SAMPLE), limit=6).valid.iter_rows(named=True)}
    by = {(r["source_index"], r["variant"]): r for r in variants.iter_rows(named=True)}
    said = {"ok": 0, "verify": 0}
    for row in variants.iter_rows(named=True):
        # the emulator takes JSON schemas: the verdict comes back as an object
        assert row["raw_text"][-1].startswith("[verify] ") and row["constrained"][-1] == "json_schema"
        word = json.loads(row["raw_text"][-1].removeprefix("[verify] "))["verdict"]
        said[row["parse_status"]] += 1
        if row["parse_status"] == "ok":
            assert word == "Yes" and row["parse_detail"] is None
        else:  # the base pair's fields: the original's, or for ins_res what its ins became
            base = by[(row["source_index"], "ins")] if row["variant"] == "ins_res" else originals[row["source_index"]]
            assert [row[k] for k in ("instruction", "input", "output")] == [base[k] for k in ("instruction", "input", "output")]
            assert word == "No" and "the teacher answered" in row["parse_detail"]
    assert said["ok"] and said["verify"], said  # the emulator says both
    # an ins that fell back is no new instruction for its ins_res to answer
    for (index, variant), row in by.items():
        if variant == "ins" and row["parse_status"] == "verify":
            assert by[(index, "ins_res")]["instruction"] == originals[index]["instruction"]

    emulator.reset_stats()
    again, [result] = run_shards(shards, cfg, str(tmp_path / "w"), at)
    assert emulator.snapshot()["answered"] == 0 and result.detail["requests_replayed"] == 36 and again.equals(variants)


def reflect_command(emulator, out, *options, env=None):
    engine = () if "--engine" in options else ("--engine", "openai")
    return subprocess.run(
        [sys.executable, "-m", "reflectune.cli", "reflect", str(SAMPLE), "--out", str(out), "--limit", "4",
         "--teacher", "emulated", *engine, "--base-url", emulator.url, "--max-new-tokens", "256", *options],
        cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": "sk-reflect-never-shown", **(env or {})},
        capture_output=True, text=True, timeout=600)


def test_the_reflect_command_keeps_a_paid_batch_and_a_rerun_pays_nothing(tmp_path):
    """`reflect --engine openai-batch`: the batch's answers reach the output and the journal;
    the rerun submits no new batch."""
    out = tmp_path / "v.jsonl"
    with Emulator(latency=0.0, batch_seconds=0.5) as emulator:
        options = ("--engine", "openai-batch", "--batch-poll-seconds", "0.2", "--batch-poll-max-seconds", "0.5")
        first = reflect_command(emulator, out, *options)
        paid = emulator.snapshot()
        assert first.returncode == 0, first.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 12 and paid["batches"]["openai"] >= 2 and paid["duplicates"] == 0
        held = journal.spend(str(tmp_path / "v.journal"))
        assert (held.requests, held.tokens) == (paid["answered"], paid["prompt_tokens"] + paid["completion_tokens"])
        again = reflect_command(emulator, tmp_path / "w.jsonl", *options, "--journal", str(tmp_path / "v.journal"))
        assert again.returncode == 0, again.stderr[-3000:]
        assert emulator.snapshot()["batches"] == paid["batches"] and emulator.snapshot()["answered"] == paid["answered"]
        assert re.search(r"\(0 requests sent, \d+ answered from the journal", again.stderr), again.stderr[-500:]
        assert [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()] == rows
    assert "sk-reflect-never-shown" not in first.stderr + again.stderr + out.read_text()


def test_the_reflect_command_holds_the_budget(emulator, tmp_path):
    stopped = reflect_command(emulator, tmp_path / "v.jsonl", "--budget-tokens", "3000", "--concurrency", "2")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    message = stopped.stderr.strip().splitlines()[-1]
    assert "the teacher budget would be passed" in message and "Traceback" not in stopped.stderr
    held = journal.spend(str(tmp_path / "v.journal"))
    stats = emulator.snapshot()
    assert 0 < held.tokens <= 3000 and held.requests == stats["answered"]
    assert not (tmp_path / "v.jsonl").exists()

    unpriced = reflect_command(emulator, tmp_path / "u.jsonl", "--budget-usd", "0.5")
    assert unpriced.returncode == 2 and "teacher.budget_usd is 0.5 but no price is set" in unpriced.stderr
    assert emulator.snapshot()["answered"] == stats["answered"]  # nothing sent


def test_a_damaged_journal_file_stops_the_shard_at_once_naming_it_and_what_deleting_it_costs(emulator, tmp_path):
    """A file cut short is read the same way on every try: the shard fails at once (no retry),
    sends nothing, and the message names the file and the fix; deleting it pays its requests
    again, exactly those."""
    from reflectune.tasks.shards import shard_failed

    cfg = teacher_config(emulator, max_new_tokens=512)
    [shard] = write_shards(tmp_path, 6, limit=6)
    at = str(tmp_path / "journal")
    first, _ = run_shards([shard], cfg, str(tmp_path / "v"), at)
    [held] = journal.files(at)
    data = open(held.uri, "rb").read()
    with open(held.uri, "wb") as f:  # cut short, as by a full disk
        f.write(data[: len(data) // 2])
    emulator.reset_stats()
    with pytest.raises(JournalFileError) as failed:
        run_shards([shard], cfg, str(tmp_path / "w"), at)
    assert emulator.snapshot()["answered"] == 0
    message = str(failed.value)
    assert held.uri in message and "Delete it and rerun the same command" in message
    assert f"paid for again ({held.spend.requests:,} requests, {held.spend.tokens:,} tokens)" in message
    # the shard task fails with it as it is, and Prefect is told not to retry
    assert shard_failed("teacher", shard.name, failed.value) is failed.value and not failed.value.retryable
    assert not os.path.exists(str(tmp_path / "w" / f"{shard.name}.parquet"))

    os.remove(held.uri)
    again, [result] = run_shards([shard], cfg, str(tmp_path / "w"), at)
    stats = emulator.snapshot()
    assert stats["answered"] == result.detail["requests_sent"] == held.spend.requests and stats["duplicates"] == 0
    assert again.equals(first)


def test_an_endpoints_identity_is_its_protocol_model_and_well_known_provider():
    """Request keys know the teacher by what answers, not where it was reached; records name
    where."""
    from reflectune.engines.batch_api import batch_identity, batch_teacher_id

    own = [OpenAITeacher("m", base_url=url).identity for url in (
        "http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1", "https://user:pw@lb.internal/v1", "http://gpu7:80/v1")]
    assert own == ["openai:m"] * 4
    assert OpenAITeacher("m").identity == OpenAITeacher("m", base_url="https://API.openai.com/v1").identity == "openai:m@openai"
    assert OpenAITeacher("m", base_url="https://api.together.xyz/v1").identity == "openai:m@together"
    assert OpenAITeacher("other", base_url="http://127.0.0.1:8000/v1").identity == "openai:other"
    # a batch's answers are the online engine's; Anthropic's protocol is another teacher
    assert batch_identity("openai-batch", "m", None) == "openai:m@openai"
    assert batch_identity("anthropic-batch", "m", None) == "anthropic:m@anthropic"
    assert batch_identity("anthropic-batch", "m", "http://127.0.0.1:9/v1") == "anthropic:m"
    # records keep the host
    assert OpenAITeacher("m", base_url="http://127.0.0.1:8000/v1").teacher_id == "openai:m@127.0.0.1:8000"
    assert batch_teacher_id("anthropic-batch", "m", None) == "anthropic:m@api.anthropic.com"


def test_the_same_model_behind_a_moved_server_is_not_paid_again(emulator, tmp_path):
    """The server moved to another host and port: the journal answers every request; the rows
    name the new endpoint. Another model at that server is another teacher, and is paid for."""
    cfg = teacher_config(emulator, max_new_tokens=512)
    shards = write_shards(tmp_path, 6, limit=6)
    at = str(tmp_path / "journal")
    first, [paid] = run_shards(shards, cfg, str(tmp_path / "v"), at)
    with Emulator(latency=0.03, host="127.0.0.2") as moved:
        url = f"http://127.0.0.2:{moved.port}/v1"
        again, [result] = run_shards(shards, teacher_config(moved, base_url=url, max_new_tokens=512), str(tmp_path / "w"), at)
        assert moved.snapshot()["answered"] == 0 and result.detail["requests_sent"] == 0
        assert result.detail["requests_replayed"] == paid.detail["requests_sent"] > 0
        assert set(again["teacher"]) == {f"openai:emulated@127.0.0.2:{moved.port}"}
        assert again.drop("teacher").equals(first.drop("teacher"))

        _, [other] = run_shards(shards, teacher_config(moved, base_url=url, max_new_tokens=512, model="other"), str(tmp_path / "x"), at)
        assert moved.snapshot()["answered"] == other.detail["requests_sent"] > 0


def test_a_journal_keyed_by_the_first_key_version_still_replays_at_its_endpoint(emulator, tmp_path, monkeypatch):
    """Journals written before keys left out the host were keyed by the teacher_id (version 1):
    they replay at the endpoint they were written against, nothing is paid again."""
    from reflectune import reflection
    from reflectune.engines.openai_compat import teacher_id

    cfg = teacher_config(emulator, max_new_tokens=512)
    shards = write_shards(tmp_path, 6, limit=6)
    at = str(tmp_path / "journal")
    # the journal as version 1 wrote it: the same writer, with version 1's keys
    old = teacher_id(cfg.model, cfg.base_url)
    monkeypatch.setattr(journal, "request_key",
                        lambda _who, chat, sampling, fmt, version=1: reflection.request_key(old, chat, sampling, fmt, 1))
    first, [paid] = run_shards(shards, cfg, str(tmp_path / "v"), at)
    monkeypatch.undo()
    emulator.reset_stats()
    again, [result] = run_shards(shards, cfg, str(tmp_path / "w"), at)
    assert emulator.snapshot()["answered"] == 0
    assert result.detail["requests_replayed"] == paid.detail["requests_sent"] > 0 and again.equals(first)


def test_the_teacher_budget_holds_on_the_transformers_engine(tmp_path):
    """The packaged model on transformers is held as a paid teacher is: its rows admitted
    against the budget before each batch runs, the answers journaled, the budget never passed."""
    from reflectune.engines import load_teacher
    from reflectune.reflection import Sampling, reflect

    from .conftest import MODEL

    records = intake.load(str(SAMPLE), limit=3).valid
    cfg = TeacherConfig(engine="transformers", model=MODEL, max_new_tokens=48, budget_tokens=1500)
    engine = load_teacher("transformers", MODEL, batch_size=1)
    at = str(tmp_path / "journal")
    try:
        with pytest.raises(BudgetExceededError, match="against teacher.budget_tokens 1,500"):
            with stages.journaled(engine, cfg, at, records) as teacher:
                reflect(records, teacher, "both", Sampling(max_new_tokens=48))
    finally:
        engine.close()
    held = journal.spend(at)
    assert 0 < held.requests < 9 and held.tokens <= 1500, held  # 3 rows ask 9 (ins, res, ins_res)
