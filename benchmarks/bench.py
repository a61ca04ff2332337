"""`make bench`: throughput measured side by side in one run, printed as ratios.

Absolute figures drift with machine load; the ratios between paths measured in the same run
are what to compare. BENCH_N sets the number of pairs (default 100); BENCH_ONLY=name[,name]
runs some sections only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import teacher_scale  # noqa: E402  (a sibling file of this script)

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_cherry_sample.json"
SAMPLE = ROOT / "examples" / "sample.jsonl"
MODEL = os.environ.get("BENCH_MODEL", "packaged:smollm2-135m-instruct")


def pairs(n: int) -> tuple[list[dict[str, str]], str]:
    if ALPACA.exists():
        rows = json.loads(ALPACA.read_text())[:n]
        source = f"{ALPACA.name} (first {len(rows)})"
    else:
        rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()][:n]
        source = f"{SAMPLE.name} ({len(rows)}; the Alpaca benchmark file is absent)"
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in rows], source


def matmul_peak(dtype, k: int, n: int, m: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of an [m,k]x[k,n] matmul on this machine's threads, best of a short run."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def bench_scoring(n: int) -> None:
    import torch

    from reflectune import oracle
    from reflectune.engines.hf import TransformersScorer, load_causal_lm
    from reflectune.scoring import TokenSequence, build_sequences, score_rows

    rows, source = pairs(n)
    print(f"\n== student scoring: {MODEL} on {source}, {torch.get_num_threads()} threads")
    fast = TransformersScorer(MODEL)
    cfg = fast.model.config
    params = sum(p.numel() for p in fast.model.parameters())
    built = build_sequences(rows, fast.tokenizer)
    tokens = sum(len(s.ids) for parts in built for s in parts.values() if isinstance(s, TokenSequence))

    peak = {dt: matmul_peak(dt, cfg.hidden_size, cfg.intermediate_size) for dt in (torch.bfloat16, torch.float32)}

    model, tok = load_causal_lm(MODEL, "float32", "cpu")
    start = time.perf_counter()
    for r in rows:
        oracle.score_pair(model, tok, r["instruction"], r["input"], r["output"])
    per_sample = tokens / (time.perf_counter() - start)
    del model

    score_rows(rows[:4], fast)  # warm-up
    start = time.perf_counter()
    score_rows(rows, fast)
    batched = tokens / (time.perf_counter() - start)
    fast.close()

    vllm_rate = None
    if os.environ.get("BENCH_VLLM", "1") == "1":
        from reflectune.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(MODEL)
        score_rows(rows[:4], engine)
        start = time.perf_counter()
        score_rows(rows, engine)
        vllm_rate = tokens / (time.perf_counter() - start)
        vllm_dtype = engine.args.dtype
        engine.close()

    flops_per_token = 2 * params
    bound = {dt: p / flops_per_token for dt, p in peak.items()}
    print(f"pairs {len(rows)}, tokens {tokens} (all four sequences), parameters {params / 1e6:.1f}M")
    print(f"matmul peak: bf16 {peak[torch.bfloat16] / 1e9:.1f} GFLOP/s, fp32 {peak[torch.float32] / 1e9:.1f} GFLOP/s")
    print(f"per-sample fp32 batch 1 : {per_sample:8.0f} tok/s")
    print(f"fast scorer ({str(fast.dtype).removeprefix('torch.')}) : {batched:8.0f} tok/s")
    print(f"ratio fast / per-sample : {batched / per_sample:8.2f}x   (target >= 3x)")
    if vllm_rate:
        print(f"vllm scorer ({vllm_dtype})   : {vllm_rate:8.0f} tok/s   {vllm_rate / batched:.2f}x the fast scorer, "
              f"{vllm_rate / per_sample:.2f}x per-sample")
    print(f"of the bf16 matmul bound ({bound[torch.bfloat16]:.0f} tok/s): {batched / bound[torch.bfloat16]:.0%}   (target >= 50%)")
    print(f"of the {str(fast.dtype).removeprefix('torch.')} matmul bound ({bound[fast.dtype]:.0f} tok/s): {batched / bound[fast.dtype]:.0%}")


def _generation_rate(engine, chats, sampling) -> tuple[float, int]:
    start = time.perf_counter()
    gens = engine.generate(chats, sampling)
    elapsed = time.perf_counter() - start
    tokens = sum(g.completion_tokens for g in gens)
    return tokens / elapsed, tokens


def bench_teacher(n: int) -> None:
    import tempfile

    from reflectune import prompts
    from reflectune.engines.hf import TransformersTeacher
    from reflectune.engines.openai_compat import OpenAITeacher
    from reflectune.engines.vllm_serve import Server
    from reflectune.testing.servers import free_port
    from reflectune.reflection import Sampling

    rows, source = pairs(min(n, int(os.environ.get("BENCH_TEACHER_N", "16"))))
    new_tokens = int(os.environ.get("BENCH_GEN_TOKENS", "128"))
    chats = [prompts.instruction_reflection(r["instruction"], r["input"], r["output"]) for r in rows]
    # min_new_tokens is not a chat API parameter: greedy decoding of the same chats keeps the work comparable
    sampling = Sampling(max_new_tokens=new_tokens)
    print(f"\n== teacher generation: {MODEL}, instruction-reflection chats from {source}, up to {new_tokens} new tokens")
    results = {}
    teacher = TransformersTeacher(MODEL, batch_size=len(chats))
    _generation_rate(teacher, chats[:2], Sampling(max_new_tokens=4))  # warm-up
    results["transformers, batch of %d" % len(chats)] = _generation_rate(teacher, chats, sampling)
    teacher.batch_size = 1
    results["transformers, one at a time"] = _generation_rate(teacher, chats[:4], sampling)
    teacher.close()

    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        start = time.perf_counter()
        with Server(MODEL, free_port(), "bench", log.name) as server:
            print(f"vllm serve healthy after {time.perf_counter() - start:.0f}s")
            for concurrency, subset in ((1, chats[:4]), (16, chats)):
                engine = OpenAITeacher("bench", base_url=f"{server.url}/v1", concurrency=concurrency)
                _generation_rate(engine, subset[:1], Sampling(max_new_tokens=4))
                results[f"vllm serve via openai engine, concurrency {concurrency}"] = _generation_rate(engine, subset, sampling)
    from reflectune.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(MODEL)
    _generation_rate(engine, chats[:2], Sampling(max_new_tokens=4))
    results[f"vllm offline engine, {len(chats)} requests at once"] = _generation_rate(engine, chats, sampling)
    engine.close()
    base = results["transformers, one at a time"][0]
    for name, (rate, tokens) in results.items():
        print(f"{name:45s} {rate:8.1f} new tok/s  ({tokens} tokens)  {rate / base:5.2f}x one-at-a-time")


def installed_teachers() -> list[str]:
    """The packaged teachers BENCH_TEACHERS names (default: all) that are installed here; the
    rest are printed as skipped."""
    from reflectune.packaged import PACKAGED, part_paths

    names = []
    for name in [m for m in os.environ.get("BENCH_TEACHERS", ",".join(PACKAGED)).split(",") if m]:
        try:
            part_paths(name)
            names.append(name)
        except Exception as exc:  # not installed here
            print(f"{name:32s} skipped: {exc}")
    return names


def bench_formats(n: int) -> None:
    """Constrained against free generation for each packaged teacher installed here, on the
    bundled sample with vLLM's offline engine: how many generations are well formed (every
    field present and closed), how many are ok (and not loops), and what the constraint costs
    in new tokens/s. Also the repetition penalty's effect under the constraint."""
    from reflectune import intake
    from reflectune.engines.vllm_engine import VLLMEngine
    from reflectune.reflection import Sampling, reflect

    rows = int(os.environ.get("BENCH_FORMAT_ROWS", "41"))
    new_tokens = int(os.environ.get("BENCH_FORMAT_TOKENS", "256"))
    penalties = [float(p) for p in os.environ.get("BENCH_PENALTIES", "1.0,1.1").split(",")]
    records = intake.load(str(SAMPLE), limit=rows).valid
    print(f"\n== teacher output formats: {records.height} sample pairs x (ins, res, ins_res), up to {new_tokens} new "
          "tokens, greedy first attempt and one sampled retry, vLLM offline")
    print(f"{'teacher':32s} {'constrained':>11s} {'rep.pen.':>8s} {'well formed':>11s} {'ok':>6s} "
          f"{'new tok/s':>9s} {'vs free':>7s}")
    for name in installed_teachers():
        engine = VLLMEngine(f"packaged:{name}")
        free_rate = None
        for constrained, penalty in [("off", 1.0), *[("on", p) for p in penalties]]:
            tokens = [0]
            start = time.perf_counter()
            variants = reflect(records, engine, "both", Sampling(max_new_tokens=new_tokens, constrained=constrained,
                                                                 repetition_penalty=penalty),
                               progress=lambda n, k: tokens.__setitem__(0, tokens[0] + k))
            rate = tokens[0] / (time.perf_counter() - start)
            status = variants["parse_status"]
            formed = status.is_in(["ok", "degenerate"]).mean()
            ok = (status == "ok").mean()
            free_rate = free_rate or rate
            print(f"{name:32s} {constrained:>11s} {penalty:>8.2f} {formed:>11.0%} {ok:>6.0%} {rate:>9.1f} "
                  f"{rate / free_rate:>6.2f}x")
            by = variants.group_by("variant", "parse_status").len().sort("variant", "parse_status")
            print("    " + ", ".join(f"{v}/{s}: {c}" for v, s, c in by.iter_rows()))
        engine.close()


def bench_flow(n: int) -> None:
    """Orchestration overhead: the recycle flow's wall time against the time spent in engine
    work (shard compute plus engine loads), on the sample split into 8 shards."""
    import tempfile

    from reflectune.flows.recycle import recycle
    from reflectune.config import RecycleParams

    teacher_engine = os.environ.get("BENCH_FLOW_TEACHER", "vllm")
    with tempfile.TemporaryDirectory() as out:
        params = RecycleParams(dataset=str(SAMPLE), output=out, limit=40, shard_size=5,
                               teacher={"engine": teacher_engine, "max_new_tokens": 32},
                               training={"enabled": False})
        start = time.perf_counter()
        manifest = recycle(params)
        outside = time.perf_counter() - start
    flow_wall = manifest["seconds"]
    compute = sum(r["seconds"] for r in manifest["shard_results"])
    engine = compute + manifest["engine_load_seconds"]
    print(f"\n== orchestration: recycle flow on {SAMPLE.name} (40 rows, {manifest['shards']} shards, teacher {teacher_engine})")
    print(f"flow run wall time          {flow_wall:8.1f}s  (with the local Prefect API start: {outside:.1f}s)")
    print(f"engine work: shard compute  {compute:8.1f}s + engine loads {manifest['engine_load_seconds']:.1f}s")
    print(f"orchestration overhead      {flow_wall - engine:8.1f}s = {(flow_wall - engine) / flow_wall:.1%} of the flow (target < 10%)")


def bench_methods(n: int) -> None:
    """What skipping the teacher saves: the recycle flow's wall time for selective, cherry and
    superfilter on the same pairs (no training). BENCH_STUDENT sets the student (default the
    packaged model); superfilter scores with the packaged 135M model whatever the student."""
    import tempfile

    from reflectune.flows.recycle import recycle
    from reflectune.config import RecycleParams

    rows, source = pairs(n)
    student = os.environ.get("BENCH_STUDENT", MODEL)
    teacher_engine = os.environ.get("BENCH_FLOW_TEACHER", "vllm")
    print(f"\n== methods: recycle flow on {source}, student {student}, teacher {MODEL} on {teacher_engine} "
          "(32 new tokens), no training")
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for method in ("selective", "cherry", "superfilter"):
            params = RecycleParams(dataset=str(data), output=str(Path(tmp) / method), shard_size=50,
                                   teacher={"engine": teacher_engine, "max_new_tokens": 32},
                                   student={"model": student}, training={"enabled": False},
                                   selection={"method": method, "scorer": MODEL})
            manifest = recycle(params)
            walls[method] = manifest["seconds"]
            print(f"{method:12s} {walls[method]:8.1f}s  selected {manifest['counts']['selected_rows']:4d}  "
                  f"teacher tokens {manifest['token_usage']['completion_tokens']:6d}  engine loads "
                  f"{manifest['engine_loads']}  ratio to selective {walls[method] / walls['selective']:.2f}")


def bench_scale(n: int) -> None:
    """Cost against work: the recycle deployment on 2, 4 and 8 shards (2 rows each) on a real
    Prefect server with two GPU-pool process workers, each stage split in two batches."""
    import tempfile

    from prefect.deployments import run_deployment

    from reflectune.testing.servers import Cluster, api, prefect_server, write_rows

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp, prefect_server(Path(tmp) / "home") as server:
        root = Path(tmp)
        (root / "cluster").mkdir()
        cluster = Cluster(server, root / "cluster", ROOT)
        try:
            cluster.deploy()
            print("\n== scale: recycle deployment, 2 rows per shard, two GPU-pool workers (transformers teacher, "
                  "8 new tokens, no training)")
            print(f"{'shards':>6} {'rows':>5} {'wall':>8} {'per shard':>10} {'vs 2 shards':>12}")
            walls: dict[int, float] = {}
            for shards in (2, 4, 8):
                data = root / f"data-{shards}.jsonl"
                write_rows(data, rows[: 2 * shards])
                params = {"dataset": str(data), "output": str(root / f"out-{shards}"), "shard_size": 2,
                          "teacher": {"max_new_tokens": 8}, "training": {"enabled": False},
                          "execution": {"mode": "cluster", "shards_per_batch": shards // 2, "retry_delay_seconds": 0}}
                with api(cluster):
                    run = run_deployment("reflectune-recycle/recycle", parameters={"params": params}, timeout=1800)
                if not run.state.is_completed():
                    raise RuntimeError(f"flow run {run.name} ({run.id}) of reflectune-recycle/recycle on {shards} "
                                       f"shards is {run.state.name}, not Completed: {run.state.message}")
                wall = (run.end_time - run.start_time).total_seconds()
                walls[shards] = wall
                base = walls[2] / 2
                print(f"{shards:>6} {2 * shards:>5} {wall:>7.1f}s {wall / shards:>9.1f}s {wall / shards / base:>11.2f}x")
            # least squares: wall = fixed + marginal * shards (process starts and model loads are the fixed part)
            mean_s, mean_w = sum(walls) / len(walls), sum(walls.values()) / len(walls)
            marginal = (sum((s - mean_s) * (w - mean_w) for s, w in walls.items())
                        / sum((s - mean_s) ** 2 for s in walls))
            print(f"fit: {mean_w - marginal * mean_s:.1f}s fixed + {marginal:.1f}s per added shard "
                  f"(two workers, {len(walls)} points)")
        finally:
            cluster.stop()


def bench_precision(n: int) -> None:
    """The fast default (bfloat16 where the CPU has it) against --exact (float32, the
    reference's precision): speed, and how many of the selection's threshold decisions flip."""
    import math

    import torch

    from reflectune.engines.hf import TransformersScorer, cpu_has_fast_bf16
    from reflectune.scoring import score_rows

    rows, source = pairs(n)
    print(f"\n== precision: the fast default against --exact, {MODEL} on {source}")
    results, rates = {}, {}
    for name, dtype in (("bfloat16", "bfloat16"), ("exact", "float32")):
        scorer = TransformersScorer(MODEL, dtype=dtype)
        score_rows(rows[:4], scorer)  # warm-up
        start = time.perf_counter()
        results[name] = score_rows(rows, scorer)
        rates[name] = time.perf_counter() - start
        scorer.close()
    fast, exact = results["bfloat16"], results["exact"]
    ok = [i for i in range(len(rows)) if all(math.isfinite(r[k]) for r in (fast[i], exact[i]) for k in ("ifd_ppl", "rifd_ppl"))]

    def flips(test) -> int:
        return sum(test(fast[i]) != test(exact[i]) for i in ok)

    def rel(key) -> float:
        return float(torch.tensor([abs(fast[i][key] / exact[i][key] - 1) for i in ok]).median())

    print(f"pairs {len(rows)} ({len(ok)} with all scores); bfloat16 native on this CPU: {cpu_has_fast_bf16()}")
    print(f"time bfloat16 {rates['bfloat16']:.1f} s, float32 {rates['exact']:.1f} s: "
          f"the fast default is {rates['exact'] / rates['bfloat16']:.2f}x --exact")
    print(f"median relative difference: IFD {rel('ifd_ppl'):.2%}, r-IFD {rel('rifd_ppl'):.2%}")
    print(f"decision flips against --exact: IFD < 1 {flips(lambda r: r['ifd_ppl'] < 1)}/{len(ok)}, "
          f"r-IFD < 1 {flips(lambda r: r['rifd_ppl'] < 1)}/{len(ok)}, "
          f"both (the selection's threshold) {flips(lambda r: r['ifd_ppl'] < 1 and r['rifd_ppl'] < 1)}/{len(ok)} "
          f"= {flips(lambda r: r['ifd_ppl'] < 1 and r['rifd_ppl'] < 1) / max(len(ok), 1):.1%}")


def bench_copies(n: int) -> None:
    """A shard whose every variant fell back: its sequences are the originals' four times over.
    Scored once each (the scorer's rule) against scoring every copy."""
    from reflectune.engines.hf import TransformersScorer
    from reflectune.scoring import TokenSequence, build_sequences, score_rows

    rows, source = pairs(min(n, 48))
    print(f"\n== copies: a shard where every variant fell back, {MODEL} on {source}")
    scorer = TransformersScorer(MODEL)
    long = [r for r in rows for _ in range(4)]  # orig, ins, res, ins_res: the same pair
    score_rows(rows[:4], scorer)  # warm-up
    counts: dict[str, int] = {}
    start = time.perf_counter()
    score_rows(long, scorer, counts=counts)
    once = time.perf_counter() - start
    every = [s for parts in build_sequences(long, scorer.tokenizer) for s in parts.values() if isinstance(s, TokenSequence)]
    start = time.perf_counter()
    scorer.token_nll(every)
    each = time.perf_counter() - start
    scorer.close()
    print(f"sequences {counts['sequences']}, scored {counts['sequences_scored']}")
    print(f"scored once {once:.1f} s, every copy {each:.1f} s: {each / once:.2f}x less work   (up to 4x)")


# The independent measure of a rewrite: a question worded apart from the filter's checks (it
# shares no code with reflectune.checks), put to a judge model under a Yes/No constraint.
USABLE_QUESTION = (
    "You check training data for a chat assistant. Below is a user's request and the reply that would be used "
    "to train the assistant.\n\n[Request]\n{instruction}\n\n[Reply]\n{output}\n\n"
    "Would you train an assistant on this reply as it stands? Say No if the reply comments on or grades some "
    "other answer instead of simply answering, if it stops in the middle of a sentence, if it suddenly changes "
    "language without being asked to, or if the request is not a real request. Otherwise say Yes. Answer with "
    "one word: Yes or No.")


def _judge_usable(engine, rows: list[dict[str, str]]) -> list[bool]:
    from reflectune.formats import OutputFormat
    from reflectune.reflection import Sampling

    yes_no = OutputFormat("verdict", "(Yes|No)", {"type": "string", "enum": ["Yes", "No"]}, ())
    chats = [[{"role": "user", "content": USABLE_QUESTION.format(
        instruction=(r["instruction"] + ("\n" + r["input"] if r.get("input") else ""))[:2000],
        output=r["output"][:4000])}] for r in rows]
    gens = engine.generate(chats, Sampling(max_new_tokens=2, constrained="on"), formats=[yes_no] * len(chats))
    return [g.text.strip().startswith("Yes") for g in gens]


def bench_quality(n: int) -> None:
    """What a run hands to training, on Alpaca pairs the demo never sees: for each packaged
    teacher at the demo's settings (vLLM, constrained, 384 new tokens), the recycle flow's
    rewrites by parse status (usable or the reason they fell back), the selection's share of
    rewrites, and how much of the selection an independent judge (the 1.5B model asked a
    question worded apart from the filter) would train on. Then the filter and the judge
    against the hand labels in tests/data/labelled_rewrites.jsonl (precision and recall)."""
    import tempfile

    import polars as pl

    from reflectune.config import RecycleParams
    from reflectune.engines.vllm_engine import VLLMEngine
    from reflectune.flows.recycle import recycle

    start_at = int(os.environ.get("BENCH_QUALITY_START", "1000"))  # the demo uses examples/sample.jsonl only
    rows = json.loads(ALPACA.read_text())[start_at : start_at + n] if ALPACA.exists() else []
    if not rows:
        print("\n== quality: the Alpaca benchmark file is absent; skipped")
        return
    tokens = int(os.environ.get("BENCH_QUALITY_TOKENS", "384"))
    judge_spec = os.environ.get("BENCH_JUDGE", "packaged:qwen2.5-coder-1.5b-instruct")
    print(f"\n== quality: {len(rows)} Alpaca pairs (from row {start_at}), each packaged teacher on vLLM, constrained, "
          f"{tokens} new tokens, the released rule; judge {judge_spec}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r.get("input", ""),
                                            "output": r["output"]}) + "\n" for r in rows))
        for name in installed_teachers():
            out = Path(tmp) / name
            start = time.perf_counter()
            manifest = recycle(RecycleParams(dataset=str(data), output=str(out), shard_size=max(1, len(rows)),
                                             teacher={"model": f"packaged:{name}", "engine": "vllm",
                                                      "max_new_tokens": tokens},
                                             training={"enabled": False}))
            wall = time.perf_counter() - start
            selected = pl.read_parquet(out / "selected.parquet")
            results[name] = (manifest, selected.filter(pl.col("variant") != "orig").to_dicts(), wall)
        engine = VLLMEngine(judge_spec)
        labelled = [json.loads(line) for line in (ROOT / "tests" / "data" / "labelled_rewrites.jsonl").read_text()
                    .splitlines() if line.strip()]
        verdicts = _judge_usable(engine, [r["pair"] for r in labelled])
        judged = {name: _judge_usable(engine, rewrites) if rewrites else [] for name, (_, rewrites, _) in results.items()}
        engine.close()
    print(f"{'teacher':32s} {'generated':>9s} {'usable':>7s}  fell back by reason")
    for name, (manifest, rewrites, wall) in results.items():
        status = manifest["counts"]["parse_status"]
        total = sum(sum(v.values()) for v in status.values())
        usable = sum(v.get("ok", 0) for v in status.values())
        reasons: dict[str, int] = {}
        for v in status.values():
            for k, c in v.items():
                if k != "ok":
                    reasons[k] = reasons.get(k, 0) + c
        print(f"{name:32s} {total:9d} {usable / total:7.0%}  " + ", ".join(f"{k} {c}" for k, c in sorted(reasons.items()))
              + f"   ({wall:.0f} s)")
    print(f"{'teacher':32s} {'selected':>8s} {'rewrites':>8s} {'share':>6s} {'judged usable':>14s}")
    for name, (manifest, rewrites, _) in results.items():
        picked = manifest["counts"]["selected_rows"]
        ok = sum(judged[name])
        print(f"{name:32s} {picked:8d} {len(rewrites):8d} {len(rewrites) / max(picked, 1):6.0%} "
              f"{ok:>5d}/{len(rewrites)} ({ok / max(len(rewrites), 1):.0%})")
    # the filter and the judge against the hand labels
    from reflectune.reflection import read_text

    passed = [read_text(r["variant"], {"sample_id": "s", "source_index": 0, **r["base"]}, r["text"], r["cut_off"])
              ["parse_status"] == "ok" for r in labelled]
    print(f"on {len(labelled)} hand-labelled rewrites:")
    for who, says in (("filter", passed), ("judge", verdicts)):
        _rates(who, says, labelled)


def bench_verify(n: int) -> None:
    """teacher.verify against the hand labels: each packaged teacher (vLLM, constrained) asked
    the verification of each labelled rewrite, its precision and recall for 'usable' alone and
    after the content checks (what a run with teacher.verify keeps), beside the checks alone."""
    from reflectune.engines.vllm_engine import VLLMEngine
    from reflectune.reflection import Sampling, read_text, verdict, verification

    labelled = [json.loads(line) for line in (ROOT / "tests" / "data" / "labelled_rewrites.jsonl").read_text()
                .splitlines() if line.strip()]
    passed = [read_text(r["variant"], {"sample_id": "s", "source_index": 0, **r["base"]}, r["text"], r["cut_off"])
              ["parse_status"] == "ok" for r in labelled]
    print(f"\n== verify: {len(labelled)} hand-labelled rewrites ({sum(r['usable'] for r in labelled)} usable), "
          "each packaged teacher on vLLM, constrained to Yes|No")
    _rates("checks alone", passed, labelled)
    for name in installed_teachers():
        engine = VLLMEngine(f"packaged:{name}")
        start = time.perf_counter()
        gens = verification([r["pair"] for r in labelled], engine, Sampling(constrained="on"))
        wall = time.perf_counter() - start
        engine.close()
        said = [verdict(g) == "yes" for g in gens]
        print(f"{name}: {sum(said)} Yes of {len(said)} in {wall:.0f} s "
              f"({sum(g.prompt_tokens for g in gens) / len(gens):.0f} prompt tokens each)")
        _rates("  verify alone", said, labelled)
        _rates("  checks, then verify", [p and s for p, s in zip(passed, said)], labelled)


def _rates(who: str, says: list[bool], labelled: list[dict]) -> None:
    tp = sum(s and r["usable"] for s, r in zip(says, labelled))
    fp = sum(s and not r["usable"] for s, r in zip(says, labelled))
    fn = sum(not s and r["usable"] for s, r in zip(says, labelled))
    tn = len(labelled) - tp - fp - fn
    print(f"{who:24s} precision of 'usable' {tp / max(tp + fp, 1):4.0%}, recall {tp / max(tp + fn, 1):4.0%}; "
          f"of the unusable it stops {tn / max(tn + fp, 1):4.0%} (tp {tp}, fp {fp}, fn {fn}, tn {tn})")


SECTIONS = {"scoring": bench_scoring, "precision": bench_precision, "copies": bench_copies, "teacher": bench_teacher,
            "formats": bench_formats, "quality": bench_quality, "verify": bench_verify, "flow": bench_flow, "methods": bench_methods, "scale": bench_scale,
            **teacher_scale.SECTIONS}


def main() -> None:
    n = int(os.environ.get("BENCH_N", "100"))
    only = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]
    for name, fn in SECTIONS.items():
        if not only or name in only:
            fn(n)


if __name__ == "__main__":
    main()
