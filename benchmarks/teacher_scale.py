"""`make bench` sections for the teacher at production scale, against the provider emulator.

pacing: 2,000 requests against an emulated API that advertises 600 requests and 150,000
tokens a minute, with its rate-limit headers and without them: the share answered 429 and
the rate reached against the advertised one.

teacher-scale: the recycle command on 20,000 synthetic pairs in 157 shards (BENCH_SCALE_PAIRS,
BENCH_SCALE_SHARD), the emulated teacher and a randomly initialised tiny student with its own
small tokenizer, no training; its process group is killed with SIGKILL at three random points
and the command is run again each time. Printed: wall time, orchestration time per shard
task, peak RSS of the flow process, requests sent against distinct requests needed, the share
of 429s, the rate reached against the advertised limit, and every row accounted for.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic pairs whose lengths vary as Alpaca's do: instructions of about a dozen
    words, an input on two rows in five, answers log-normal around 40 words with a long tail."""
    from reflectune.emulator import WORDS

    rng = random.Random(seed)

    def words(mu: float, sigma: float, cap: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, min(cap, int(rng.lognormvariate(mu, sigma))))))

    return [{"instruction": f"Task {i}: {words(2.4, 0.5, 80).capitalize()}?",
             "input": words(2.3, 0.8, 200) if rng.random() < 0.4 else "",
             "output": words(3.6, 0.9, 500).capitalize() + "."} for i in range(n)]


def tiny_student(path: Path, texts: list[str]) -> str:
    """A randomly initialised two-layer Llama with a 1,024-token BPE tokenizer trained on
    `texts`: real scoring at a cost this CPU can carry for tens of thousands of pairs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from reflectune import prompts, templates

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    scaffolding = [templates.render("vicuna", "x", ""), templates.reverse("vicuna", "y"), *[
        m["content"] for m in prompts.instruction_reflection("x", "", "y") + prompts.response_reflection("x", "", "y")]]
    tok.train_from_iterator(texts + scaffolding * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _chats(n: int) -> list:
    from reflectune import prompts

    pairs = synthetic_pairs(n, seed=1)
    return [prompts.response_reflection(p["instruction"], "", " ".join(p["output"].split()[:12])) for p in pairs]


def bench_pacing(n: int) -> None:
    from reflectune.emulator import Emulator
    from reflectune.engines.openai_compat import OpenAITeacher
    from reflectune.reflection import Sampling

    requests = int(os.environ.get("BENCH_PACING_REQUESTS", "2000"))
    rpm, tpm = 600, 150_000
    print(f"\n== pacing: {requests} requests against an emulated API advertising {rpm} requests and {tpm:,} tokens "
          "a minute (latency 0.2 s, concurrency 32)")
    print(f"{'headers':>9} {'wall':>7} {'429s':>12} {'requests/min':>13} {'tokens/min':>11} {'of the limit':>13}")
    for style in ("openai", "anthropic", "none"):
        with Emulator(rpm=rpm, tpm=tpm, headers=style, latency=0.2, answer_words=(20, 45)) as emulator:
            engine = OpenAITeacher("emulated", base_url=emulator.url, api_key="sk-bench", concurrency=32)
            start = time.perf_counter()
            gens = engine.generate(_chats(requests), Sampling(max_new_tokens=256))
            wall = time.perf_counter() - start
            stats = emulator.snapshot()
            rate_r, rate_t = emulator.stats.rate(emulator.stats.times[0][0] + emulator.window)
            share = emulator.utilisation()
        refused = stats["statuses"].get("429", 0)
        failed = sum(g.error is not None for g in gens)
        print(f"{style:>9} {wall:>6.0f}s {refused:>5} ({refused / (refused + stats['answered']):.1%}) "
              f"{rate_r * 60:>13,.0f} {rate_t * 60:>11,.0f} {share:>12.1%}" + (f"  {failed} failed" if failed else ""))
    print("(the rate is measured from one minute after the first answer: the bucket's first fill is not the rate)")


def _vmhwm(pid: int) -> int:
    """Peak resident memory of a process, in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _markers(out: Path) -> list[Path]:
    return [m for stage in ("variants", "scores") for m in (out / stage).glob("*.parquet.json")]


def bench_teacher_scale(n: int) -> None:
    from reflectune.emulator import Emulator

    pairs = int(os.environ.get("BENCH_SCALE_PAIRS", "20000"))
    shard_size = int(os.environ.get("BENCH_SCALE_SHARD", "128"))
    rpm, tpm = 6000, 2_400_000
    shards = -(-pairs // shard_size)
    tasks = 2 * shards
    rng = random.Random(int(os.environ.get("BENCH_SCALE_SEED", "7")))
    kills = sorted(rng.sample(range(int(0.05 * tasks), int(0.95 * tasks)), 3))
    # after the shard count is reached, a random moment inside the next shard's work
    delays = [rng.uniform(0.5, 4.0) for _ in kills]
    print(f"\n== teacher at scale: recycle on {pairs:,} synthetic pairs in {shards} shards, emulated teacher "
          f"({rpm:,} requests and {tpm:,} tokens a minute, latency 0.05 s), tiny random student, no training; "
          f"SIGKILL of the process group after {', '.join(map(str, kills))} of {tasks} shard tasks")
    with tempfile.TemporaryDirectory() as tmp, Emulator(rpm=rpm, tpm=tpm, latency=0.05,
                                                         answer_words=(20, 60)) as emulator:
        root = Path(tmp)
        rows = synthetic_pairs(pairs)
        data = root / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        student = tiny_student(root / "student", [" ".join(r.values()) for r in rows[:3000]])
        out = root / "out"
        command = [sys.executable, "-m", "reflectune.cli", "recycle", str(data), "--out", str(out),
                   "--shard-size", str(shard_size), "--teacher", "emulated", "--teacher-engine", "openai",
                   "--base-url", emulator.url, "--max-new-tokens", "256", "--no-train", "--student", student,
                   "teacher.concurrency=32", "student.max_length=1024", "execution.retry_delay_seconds=1"]
        # the command's own temporary Prefect server, as a user's first run has it
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env |= {"PREFECT_HOME": str(root / "prefect"), "OPENAI_API_KEY": "sk-bench",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
        segments = []
        for kill, delay in zip([*kills, None], [*delays, 0.0]):
            start = time.monotonic()
            reached = None
            with open(root / "log.txt", "ab") as log:
                proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
            peak = 0
            while proc.poll() is None:
                peak = max(peak, _vmhwm(proc.pid))
                if kill is not None and reached is None and len(_markers(out)) >= kill:
                    reached = time.monotonic()
                if reached is not None and time.monotonic() >= reached + delay:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.25)
            segments.append({"start": time.time() - (time.monotonic() - start), "wall": time.monotonic() - start,
                             "peak": peak, "rc": proc.returncode, "done": len(_markers(out))})
        if segments[-1]["rc"] != 0:
            tail = (root / "log.txt").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the last recycle run ended with {segments[-1]['rc']}:\n{tail}")
        manifest = json.loads((out / "manifest.json").read_text())
        stats = emulator.snapshot()
        times = list(emulator.stats.times)
        markers = [(m.stat().st_mtime, json.loads(m.read_text())) for m in _markers(out)]

    wall = sum(s["wall"] for s in segments)
    work = sum(r["seconds"] for _, r in markers)
    c = manifest["counts"]
    accounted = c["selected_rows"] + c["dropped_rows"] + c["rejected_rows"]
    refused = stats["statuses"].get("429", 0)
    print(f"{'run':>4} {'wall':>8} {'shard tasks done':>17} {'peak RSS':>9}  ended")
    for i, s in enumerate(segments):
        print(f"{i + 1:>4} {s['wall']:>7.0f}s {s['done']:>17} {s['peak'] / 2**20:>8.0f}M  "
              + ("killed (SIGKILL)" if s["rc"] == -signal.SIGKILL else f"exit {s['rc']}"))
    print(f"wall time {wall:.0f}s over {len(segments)} runs; shard work (teacher requests and scoring) {work:.0f}s; "
          f"orchestration {(wall - work) / tasks:.2f}s per shard task (process starts included)")
    for stage in ("teacher", "student"):
        gaps = _gaps([(t, r) for t, r in markers if r["stage"] == stage], [s["start"] for s in segments])
        if len(gaps) >= 6:
            third = len(gaps) // 3
            print(f"{stage}: orchestration between shards, first third {statistics.median(gaps[:third]):.2f}s, "
                  f"last third {statistics.median(gaps[-third:]):.2f}s (median)")
    print(f"teacher requests answered {stats['answered']:,}, distinct {stats['distinct']:,}: sent / needed = "
          f"{stats['answered'] / max(stats['distinct'], 1):.4f} ({stats['duplicates']} paid twice: in flight or "
          "not yet journaled at the kills)")
    rate, per_min = _busy_rate(times, rpm, tpm)
    print(f"429s {refused:,} ({refused / max(refused + stats['answered'], 1):.2%} of answers); while the teacher "
          f"ran: {per_min[0]:,.0f} requests and {per_min[1]:,.0f} tokens a minute, {rate:.1%} of the advertised limit")
    print(f"rows: {c['input_rows']:,} in = {c['selected_rows']:,} selected + {c['dropped_rows']:,} dropped + "
          f"{c['rejected_rows']:,} rejected ({'all' if accounted == c['input_rows'] else 'NOT all'} accounted for)")
    spend = manifest["teacher_spend"]
    print(f"journal: {spend['journal']['requests']:,} requests, "
          f"{spend['journal']['prompt_tokens'] + spend['journal']['completion_tokens']:,} tokens; the last run sent "
          f"{spend['requests_sent']:,} and replayed {spend['requests_replayed']:,}")


def _gaps(markers: list, starts: list[float]) -> list[float]:
    """Time between consecutive shard results of one run less the second one's own work, in
    finishing order: what orchestration adds per shard."""
    ordered = sorted(markers, key=lambda m: m[0])
    run = lambda t: sum(s <= t for s in starts)
    return [max(b[0] - a[0] - b[1]["seconds"], 0.0) for a, b in zip(ordered, ordered[1:]) if run(a[0]) == run(b[0])]


def _busy_rate(times: list[tuple[float, int]], rpm: int, tpm: int) -> tuple[float, tuple[float, float]]:
    """Requests and tokens answered per second against the limits while the teacher ran: over
    stretches of answers no more than 5 s apart, every second counted (an idle second between
    shards is a missed one), each stretch's first minute left out (the provider's bucket
    refilled while no one asked: a burst, not the rate)."""
    if not times:
        return 0.0, (0.0, 0.0)
    bins: dict[int, list[int]] = {}
    for t, tokens in times:
        b = bins.setdefault(int(t), [0, 0])
        b[0] += 1
        b[1] += tokens
    keys = sorted(bins)
    seconds = requests = tokens = 0
    start = keys[0]
    for prev, key in zip(keys, keys[1:] + [None]):
        if key is None or key - prev > 5:  # a stretch ends at prev
            for s in range(start + 60, prev + 1):
                seconds += 1
                requests += bins.get(s, [0, 0])[0]
                tokens += bins.get(s, [0, 0])[1]
            start = key
    if not seconds:
        return 0.0, (0.0, 0.0)
    per_min = (60 * requests / seconds, 60 * tokens / seconds)
    return max(per_min[0] / rpm, per_min[1] / tpm), per_min


SECTIONS = {"pacing": bench_pacing, "teacher-scale": bench_teacher_scale}
