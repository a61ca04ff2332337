"""The teacher through provider batch APIs, against the emulator of both protocols on loopback:
one batch per phase per shard, lines matched by custom id, the expired lines alone submitted
again, outputs equal to the online engine's for the same answers, the providers' limits
splitting a phase, and a rerun that re-attaches to batches in flight instead of paying again."""

import json
import random

import polars as pl
import pytest

from reflectune import records, stages
from reflectune.config import TeacherConfig
from reflectune.emulator import WORDS, Emulator
from reflectune.engines.batch_api import BatchTeacher
from reflectune.engines.openai_compat import OpenAITeacher
from reflectune.errors import Interrupted
from reflectune.records import VARIANT, read

PAIRS, SHARD = 200, 100


def synthetic_shards(tmp_path, n=PAIRS, size=SHARD):
    """`n` distinct pairs in shards of `size` rows, as the flow writes them."""
    rng = random.Random(7)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    rows = [{"sample_id": f"s{i:04d}", "source_index": i, "instruction": f"{words(4, 12).capitalize()} #{i}?",
             "input": words(0, 6), "output": words(10, 40).capitalize() + "."} for i in range(n)]
    shards = []
    for index, start in enumerate(range(0, n, size)):
        part = pl.DataFrame(rows[start : start + size], schema=records.RECORD)
        uri = str(tmp_path / "shards" / f"{index}.parquet")
        records.write(part, uri)
        shards.append(stages.Shard(index, uri, part.height, f"c-{index}"))
    return shards


def config(emulator, engine, **kw):
    return TeacherConfig(model="emulated", engine=engine, base_url=emulator.url, max_new_tokens=256, **kw)


def batch_engine(cfg, emulator, **kw):
    base = emulator.url if cfg.engine == "openai-batch" else emulator.root
    return BatchTeacher(cfg.model, cfg.engine, base_url=base, api_key="sk-batch-test", poll_seconds=0.2,
                        poll_max_seconds=0.5, **kw)


def run(shards, cfg, engine, out):
    results = [stages.teacher_shard(s, f"{out}/variants/{s.name}.parquet", cfg, engine, f"{out}/journal")
               for s in shards]
    return pl.concat([read(r.uri, VARIANT, "test") for r in results]), results


def ledger_entries(out):
    return [json.loads(p.read_text()) for p in sorted((out / "journal" / "batches").glob("batch-*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["openai-batch", "anthropic-batch"])
def test_200_pairs_one_batch_per_phase_expired_lines_alone_again_outputs_as_online(provider, tmp_path):
    shards = synthetic_shards(tmp_path)
    with Emulator(latency=0.0, answer_words=(8, 30), batch_seconds=1.0, expire_rate=0.01, seed=3) as emulator:
        online_cfg = config(emulator, "openai", concurrency=16)
        online, _ = run(shards, online_cfg, OpenAITeacher("emulated", base_url=emulator.url, api_key="sk-online",
                                                          concurrency=16), tmp_path / "online")
        emulator.reset_stats()
        cfg = config(emulator, provider, price_input_per_m=2.0, price_output_per_m=8.0)
        engine = batch_engine(cfg, emulator)
        batched, results = run(shards, cfg, engine, tmp_path / "batch")
        stats = emulator.snapshot()

    needed = 3 * PAIRS  # ins, res, then ins_res: the emulator's answers all parse, so no retry phase
    assert batched.height == needed and (batched["parse_status"] == "ok").all()
    # what the provider took: every request once, the expired ones again, nothing else
    expired = stats["batch_lines_expired"]
    assert 0 < expired <= 0.03 * needed, stats
    assert stats["batch_lines_distinct"] == needed and stats["batch_lines"] == needed + expired, stats
    assert stats["duplicates"] == 0 and stats["answered"] == needed, stats
    assert sum(r.detail["batch_lines_resubmitted"] for r in results) == expired
    # one batch per phase per shard, and small batches of the lines sent again
    entries = ledger_entries(tmp_path / "batch")
    phases = [e for e in entries if len(e["keys"]) >= SHARD]
    assert sorted(len(e["keys"]) for e in phases) == [SHARD, SHARD, 2 * SHARD, 2 * SHARD]
    assert sum(len(e["keys"]) for e in entries if e not in phases) == expired
    assert all(e["id"] for e in entries)
    assert sum(stats["batches"].values()) == len(entries)
    # the same answers give the same variants; only how the form was asked differs for Anthropic
    key = ["source_index", "variant"]
    online, batched = online.sort(key), batched.sort(key)
    if provider == "openai-batch":
        assert batched.equals(online)
    else:
        assert set(batched["constrained"].explode()) == {"tool_use"}
        assert set(batched["teacher"]) == {"anthropic:emulated@" + emulator.url.split("//")[1].split("/")[0]}
        same = [c for c in VARIANT if c not in ("constrained", "teacher")]
        assert batched.select(same).equals(online.select(same))
    # what was paid, as the provider counted it
    sent = sum(r.detail["sent_prompt_tokens"] + r.detail["sent_completion_tokens"] for r in results)
    assert sent == stats["prompt_tokens"] + stats["completion_tokens"]


def test_a_phase_over_the_providers_limit_is_split_and_matched_by_custom_id(tmp_path):
    shards = synthetic_shards(tmp_path, n=12, size=12)
    with Emulator(latency=0.0, answer_words=(6, 12), batch_seconds=0.4, max_batch_requests=5) as emulator:
        cfg = config(emulator, "openai-batch")
        online, _ = run(shards, config(emulator, "openai"), OpenAITeacher("emulated", base_url=emulator.url),
                        tmp_path / "online")
        batched, results = run(shards, cfg, batch_engine(cfg, emulator, max_requests=5), tmp_path / "batch")
        stats = emulator.snapshot()
    # 24 ins and res lines in batches of at most 5, then 12 ins_res lines
    assert results[0].detail["batches_created"] == 5 + 3 == stats["batches"]["openai"]
    assert max(len(e["keys"]) for e in ledger_entries(tmp_path / "batch")) == 5
    assert batched.sort(["source_index", "variant"]).equals(online.sort(["source_index", "variant"]))


def test_an_anthropic_batch_engine_at_a_server_of_another_form_is_told_the_mismatch():
    """anthropic-batch given the OpenAI form of the emulator's URL (…/v1): the refusal says which
    API the engine speaks, where it sends, and which engine an OpenAI-compatible server takes."""
    from reflectune.engines.openai_compat import TeacherFatalError
    from reflectune.reflection import Sampling

    pytest.importorskip("anthropic")
    with Emulator(latency=0.0) as emulator:
        engine = BatchTeacher("emulated", provider="anthropic-batch", base_url=emulator.url, api_key="k",
                              poll_seconds=0.1)
        with pytest.raises(TeacherFatalError) as err:
            engine.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=8))
        assert not emulator.snapshot()["batches"]  # nothing created, nothing paid
    assert "answered 404 to the batch creation" in str(err.value)
    assert ("anthropic-batch speaks Anthropic's Message Batches API (POST BASE/v1/messages/batches, so "
            "teacher.base_url is BASE, without /v1); an OpenAI-compatible server's Files and Batches take "
            "teacher.engine openai-batch") in str(err.value)


def test_a_batch_line_answered_in_free_text_is_not_counted_as_constrained():
    """A server that ignores response_format answers a json_schema line in free text: its
    `constrained` says none, not json_schema; a line answered in the JSON form says json_schema."""
    from reflectune import formats
    from reflectune.engines.batch_api import answered_in

    fmt = formats.teacher_format("res", 256)
    free = "The answer is thin.\n[Better Answer] A fuller answer. [End]"
    asked = json.dumps({"analysis": "The answer is thin.", "better_answer": "A fuller answer."})
    assert answered_in("json_schema", free, fmt) == "none"
    assert answered_in("json_schema", asked, fmt) == "json_schema"


def test_an_interrupted_wait_leaves_the_batch_to_the_next_run_which_waits_for_it(tmp_path, monkeypatch):
    """Ctrl-C while a batch is pending: the batch is in the ledger; the rerun re-attaches to it
    and creates no batch for those requests."""
    from reflectune import progress

    shards = synthetic_shards(tmp_path, n=6, size=6)
    with Emulator(latency=0.0, answer_words=(6, 12), batch_seconds=2.0) as emulator:
        cfg = config(emulator, "anthropic-batch")
        engine = batch_engine(cfg, emulator)
        created = []
        original = engine._api.create

        def create_then_stop(tag, lines):
            created.append(original(tag, lines))
            progress.stop.set()  # the user's Ctrl-C, right after the first batch is created
            return created[-1]

        monkeypatch.setattr(engine._api, "create", create_then_stop)
        try:
            with pytest.raises(Interrupted):
                run(shards, cfg, engine, tmp_path / "out")
        finally:
            progress.stop.clear()
        assert [e["id"] for e in ledger_entries(tmp_path / "out")] == created
        assert emulator.snapshot()["batches"] == {"anthropic": 1}

        monkeypatch.setattr(engine._api, "create", original)
        variants, results = run(shards, cfg, batch_engine(cfg, emulator), tmp_path / "out")
        stats = emulator.snapshot()
    assert results[0].detail["batches_reattached"] == 1
    # the rerun created only the ins_res batch: nothing submitted twice
    assert stats["batches"] == {"anthropic": 2} and stats["batch_lines"] == stats["batch_lines_distinct"] == 18
    assert variants.height == 18 and (variants["parse_status"] == "ok").all()


@pytest.mark.slow
def test_the_openai_batch_file_runs_on_vllm_run_batch_and_its_output_is_read_back(tmp_path):
    """No local server takes OpenAI's Files and Batches endpoints (`vllm serve` has neither), but
    `vllm run-batch` executes the same batch file format with a real model: the lines the engine
    writes (JSON-schema output form included) run there, and its output file is read back by
    custom id with the reader of a provider's results."""
    import subprocess
    import sys

    from reflectune import formats, prompts, reflection
    from reflectune.engines.batch_api import _OpenAIBatches, openai_batch_file, read_openai_results
    from reflectune.engines.vllm_args import engine_env
    from reflectune.engines.vllm_serve import serve_command

    from ..conftest import MODEL

    sampling = reflection.Sampling(max_new_tokens=48, constrained="auto")
    pairs = [("Name a primary colour.", "Red."), ("What is 2 + 2?", "4"), ("Say hello in French.", "Bonjour.")]
    api = _OpenAIBatches("teacher", None, "no-key", 30.0)
    lines = [api.line(f"key{i}", prompts.response_reflection(q, "", a), sampling,
                      formats.teacher_format("res", sampling.max_new_tokens) if i else None)
             for i, (q, a) in enumerate(pairs)]
    (tmp_path / "in.jsonl").write_bytes(openai_batch_file(lines[::-1]))  # order is not what matches
    serve = serve_command(MODEL, 0, "teacher")
    options = serve[serve.index("--served-model-name"):]
    for name in ("--host", "--port"):
        at = options.index(name)
        del options[at : at + 2]
    engine_env()
    done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(tmp_path / "in.jsonl"),
                           "-o", str(tmp_path / "out.jsonl"), "--model", serve[serve.index("--model") + 1], *options],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = read_openai_results((tmp_path / "out.jsonl").read_text())
    assert sorted(outcomes) == ["key0", "key1", "key2"]
    for key, outcome in outcomes.items():
        gen = outcome.gen
        assert outcome.error is None and gen.text and gen.prompt_tokens > 0 and 0 < gen.completion_tokens <= 48, key
    # the lines with the output form came back in it: a JSON object of its fields (the small model
    # pads it with whitespace, so it may be cut off at 48 tokens)
    for key in ("key1", "key2"):
        gen = outcomes[key].gen
        assert gen.text.lstrip().startswith("{") and '"analysis"' in gen.text, gen
        if gen.finish_reason == "stop":
            assert set(json.loads(gen.text)) == {"analysis", "better_answer"}, gen
    assert not outcomes["key0"].gen.text.lstrip().startswith("{")


def test_in_cluster_mode_batch_shards_wait_in_the_orchestrating_flow_and_the_student_goes_to_the_gpus(monkeypatch):
    """Where each stage runs with a batch API teacher: the teacher shards in this process (no GPU
    held while batches wait), the student's on the GPU pool; an online teacher stays on the pool."""
    from reflectune.flows import recycle
    from reflectune.config import RecycleParams

    calls = []
    monkeypatch.setattr(recycle, "_batch_api_teacher", lambda params, shards, tracker: calls.append("here") or ["t"])
    monkeypatch.setattr(recycle, "_run_cluster", lambda params, shards, tracker, skip_teacher=False:
                        calls.append(("pool", skip_teacher)) or ["s"])
    batched = RecycleParams(execution={"mode": "cluster"}, teacher={"engine": "openai-batch", "model": "gpt-4o"})
    assert recycle._Placement(batched).shard_stages([{}], None) == ["t", "s"]
    assert calls == ["here", ("pool", True)]
    calls.clear()
    online = RecycleParams(execution={"mode": "cluster"}, teacher={"engine": "openai", "model": "gpt-4o"})
    assert recycle._Placement(online).shard_stages([{}], None) == ["s"] and calls == [("pool", False)]


def test_in_cluster_mode_training_baselines_and_evaluation_run_as_gpu_steps(monkeypatch, tmp_path):
    """Training, each baseline's training and the evaluation each start a run of the GPU step
    deployment (not a shard batch), named by its step, and return what that run wrote."""
    from reflectune.flows import recycle
    from reflectune import io
    from reflectune.config import RecycleParams
    from reflectune.run_folder import RunFolder

    params = RecycleParams(output=str(tmp_path), execution={"mode": "cluster", "gpu_step_deployment": "steps/gpu"})
    folder = RunFolder(params.output)
    launched = []

    def launch(params, deployment, parameters, label, key, name):
        launched.append((deployment, parameters, key, name))
        if parameters["step"] == "baseline":
            io.write_json({"baseline": {"kind": parameters["baseline"]}}, folder.baseline_training(parameters["baseline"]))
        else:
            io.write_json({"step": parameters["step"]}, folder.training if parameters["step"] == "train"
                          else folder.evaluation)

    monkeypatch.setattr(recycle, "_launch", launch)
    monkeypatch.setattr(recycle, "gpu_step_run", recycle.gpu_step_run.fn)
    place = recycle._Placement(params)
    assert place.on_gpu("train", None) == {"step": "train"}
    assert place.on_gpu("evaluate", None) == {"step": "evaluate"}
    assert recycle.gpu_step_run(params, "baseline", "length") == {"kind": "length"}
    assert launched == [("steps/gpu", {"step": "train", "baseline": None}, "train:", "train"),
                        ("steps/gpu", {"step": "evaluate", "baseline": None}, "evaluate:", "evaluate"),
                        ("steps/gpu", {"step": "baseline", "baseline": "length"}, "baseline:length", "baseline-length")]


def test_a_retried_parent_launches_again_what_its_earlier_try_left_failed_and_counts_only_its_own_crashes(
        monkeypatch, tmp_path):
    """`_launch` under the keys of a retried parent: a child of the earlier try that ended
    failed, cancelled or crashed is launched again under the next key (not returned as this
    try's failure); crashes of this try's own children count against execution.retries."""
    import logging
    from types import SimpleNamespace

    import prefect.deployments
    from prefect.states import Completed, Crashed, Failed

    from reflectune.config import RecycleParams
    from reflectune.errors import ReflectuneError
    from reflectune.flows import recycle

    params = RecycleParams(output=str(tmp_path / "out"), execution={"mode": "cluster", "retries": 1})
    stale: set[str] = set()
    outcomes: list = []
    launched: list[str] = []

    def run_deployment(name, parameters, timeout, idempotency_key):
        launched.append(idempotency_key)
        return SimpleNamespace(id=f"run-{len(launched)}", state=outcomes.pop(0))

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(recycle, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(recycle, "_ended_unfinished", lambda key: SimpleNamespace(id="old", state=Failed())
                        if key in stale else None)

    # the earlier try's first two children failed and crashed: this try starts at the third key
    stale.update({"local:train::0", "local:train::1"})
    outcomes[:] = [Completed()]
    recycle._launch(params, "steps/gpu", {"step": "train"}, "GPU step train", "train:", "train")
    assert launched == ["local:train::2"]

    # this try's own crashes: one relaunch (retries 1), then the run fails with the count
    launched.clear()
    stale.clear()
    outcomes[:] = [Crashed(), Crashed()]
    with pytest.raises(ReflectuneError, match="crashed in 2 attempts"):
        recycle._launch(params, "steps/gpu", {"step": "train"}, "GPU step train", "train:", "train")
    assert launched == ["local:train::0", "local:train::1"]

    # a child that fails now fails the run at once, naming its flow run
    launched.clear()
    outcomes[:] = [Failed(message="boom")]
    with pytest.raises(ReflectuneError, match=r"GPU step train \(flow run run-1\) ended Failed: boom"):
        recycle._launch(params, "steps/gpu", {"step": "train"}, "GPU step train", "train:", "train")

    # a child that stopped on an error no retry mends recorded it: the same error, as its type
    from reflectune.errors import BudgetExceededError
    from reflectune.flows.cluster import recording_stops

    with pytest.raises(BudgetExceededError):
        with recording_stops(params, "train"):
            raise BudgetExceededError("the teacher budget would be passed by the next request: spent 5 tokens")
    launched.clear()
    outcomes[:] = [Failed(message="Flow run encountered an exception: something else")]
    with pytest.raises(BudgetExceededError, match="^the teacher budget would be passed by the next request: spent 5"):
        recycle._launch(params, "steps/gpu", {"step": "train"}, "GPU step train", "train:", "train")


def test_shards_whose_batches_wait_at_once_hold_one_budget(tmp_path):
    """Batch shards run at once (teacher.concurrency) admit against one spend: what each has in
    flight counts for the others, so the budget holds as it does online."""
    import threading

    from reflectune import journal
    from reflectune.errors import BudgetExceededError

    shards = synthetic_shards(tmp_path, n=8, size=2)
    with Emulator(latency=0.0, answer_words=(20, 40), batch_seconds=0.3) as emulator:
        cfg = config(emulator, "openai-batch", budget_tokens=4000)
        engine = batch_engine(cfg, emulator)
        stopped = []

        def one(shard):
            try:
                stages.teacher_shard(shard, f"{tmp_path}/variants/{shard.name}.parquet", cfg, engine,
                                     f"{tmp_path}/journal")
            except BudgetExceededError as exc:
                stopped.append(exc)

        threads = [threading.Thread(target=one, args=(s,)) for s in shards]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = emulator.snapshot()
    held = journal.spend(f"{tmp_path}/journal")
    assert stopped, "the budget did not stop any shard"
    assert (held.requests, held.tokens) == (stats["answered"], stats["prompt_tokens"] + stats["completion_tokens"])
    assert 0 < held.tokens <= 4000, held
