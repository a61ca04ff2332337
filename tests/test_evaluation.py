"""Evaluation: the pairwise scoring rules on every combination of verdicts, position
swapping, test-set formats, and a real run with the packaged model as judge."""

from __future__ import annotations

import itertools
import json

import polars as pl
import pytest

from reflectune import evaluation as ev
from reflectune import oracle

from .conftest import MODEL, ROOT

# docs/method.md: win/win, win/tie, tie/win = win; win/lose, lose/win, tie/tie = tie; else loss
EXPECTED = {
    ("win", "win"): "win", ("win", "tie"): "win", ("tie", "win"): "win",
    ("win", "lose"): "tie", ("lose", "win"): "tie", ("tie", "tie"): "tie",
    ("lose", "lose"): "loss", ("lose", "tie"): "loss", ("tie", "lose"): "loss",
}
FLIP = {"win": "lose", "lose": "win", "tie": "tie"}


@pytest.mark.parametrize("first,second", list(itertools.product(["win", "tie", "lose"], repeat=2)))
def test_both_orders_combine_as_the_method_says(first, second):
    assert ev.combine(first, second) == EXPECTED[(first, second)]


@pytest.mark.parametrize("ab,ba", list(itertools.product([(8, 5), (6, 6), (3, 9), None], repeat=2)))
def test_swapping_a_and_b_swaps_wins_and_losses(ab, ba):
    a_view = ev.combine(ev.order_verdict(ab, a_first=True), ev.order_verdict(ba, a_first=False))
    # the same judgements seen from B: B was second in the first order and first in the second
    b_view = ev.combine(ev.order_verdict(ba, a_first=True), ev.order_verdict(ab, a_first=False))
    assert {"win": "loss", "loss": "win", "tie": "tie"}[a_view] == b_view


def test_order_verdicts_and_a_position_biased_judge_is_neutralised():
    assert ev.order_verdict((9, 4), a_first=True) == "win" and ev.order_verdict((9, 4), a_first=False) == "lose"
    assert ev.order_verdict(None, a_first=True) == "tie"
    # a judge that always prefers the first answer: A wins one order, loses the other -> tie
    biased = ev.combine(ev.order_verdict((9, 2), True), ev.order_verdict((9, 2), False))
    assert biased == "tie"


def test_winning_score():
    assert ev.winning_score(["win"] * 3 + ["tie"] + ["loss"]) == pytest.approx((3 - 1) / 5 + 1)
    assert ev.winning_score(["tie", "tie"]) == 1.0 and ev.winning_score(["loss"]) == 0.0
    assert ev.winning_score(["win", "win"]) == 2.0


@pytest.mark.parametrize("text,scores", [
    ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)),
    ("Scores: 7/10, 9/10", (7.0, 9.0)),
    ("Here is my rating.\n5 5", (5.0, 5.0)),
    ("7.5 8", (7.5, 8.0)),
    ("I cannot decide.", None),
    ("42 17", None),
])
def test_parse_judge_scores(text, scores):
    assert ev.parse_scores(text) == scores


def test_test_sets_in_the_common_formats(tmp_path):
    bundled = ev.load_test_set()
    assert len(bundled) == 40 and sum(bool(t["output"]) for t in bundled) == 20
    assert all(t["instruction"].strip() for t in bundled)
    vicuna = tmp_path / "vicuna.jsonl"
    vicuna.write_text(json.dumps({"question_id": 1, "text": "How can I improve my time management?", "category": "generic"}) + "\n")
    koala = tmp_path / "koala.jsonl"
    koala.write_text(json.dumps({"prompt": "Write a limerick.", "id": "k1"}) + "\n")
    assert ev.load_test_set(str(vicuna))[0]["instruction"].startswith("How can I")
    assert ev.load_test_set(str(koala)) == [{"instruction": "Write a limerick.", "input": "", "output": ""}]
    sinstruct = tmp_path / "sinstruct.jsonl"
    sinstruct.write_text(json.dumps({"id": "user_oriented_task_0", "motivation_app": "Grammarly",
                                     "instruction": "Make the sentence shorter.",
                                     "instances": [{"input": "In my opinion I think it is good.", "output": "It is good."}]})
                         + "\n")
    assert ev.load_test_set(str(sinstruct)) == [{"instruction": "Make the sentence shorter.",
                                                 "input": "In my opinion I think it is good.", "output": "It is good."}]
    lima = tmp_path / "lima.jsonl"
    lima.write_text(json.dumps({"conversations": ["What is a haiku?", "A three-line poem of 5, 7 and 5 syllables."],
                                "source": "stackexchange"}) + "\n")
    assert ev.load_test_set(str(lima)) == [{"instruction": "What is a haiku?", "input": "",
                                            "output": "A three-line poem of 5, 7 and 5 syllables."}]
    wizard = tmp_path / "wizardlm.jsonl"
    wizard.write_text(json.dumps({"idx": 1, "Skill": "Math", "Instruction": "What is 2 + 2?"}) + "\n")
    assert ev.load_test_set(str(wizard))[0]["instruction"] == "What is 2 + 2?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x"}\n')
    with pytest.raises(Exception, match=r"item 1: no instruction"):
        ev.load_test_set(str(bad))


def test_a_lima_item_whose_conversations_is_not_a_list_is_named_for_what_it_is(tmp_path):
    """Not "no instruction ... or LIMA's conversations" to a file that has them, in the wrong type."""
    lima = tmp_path / "lima.jsonl"
    lima.write_text(json.dumps({"conversations": "What is a haiku?"}) + "\n")
    with pytest.raises(Exception, match=r"lima.jsonl: item 1: `conversations` is a JSON str, not LIMA's list of "
                                        r"turns: give it as an array of strings, the question first") as err:
        ev.load_test_set(str(lima))
    assert "no instruction" not in str(err.value)


@pytest.mark.slow
def test_evaluate_with_the_packaged_model_as_judge(tmp_path, student_fp32):
    import subprocess
    import sys

    out = tmp_path / "verdicts.jsonl"
    done = subprocess.run([sys.executable, "-m", "reflectune.cli", "evaluate", "--model", MODEL, "--baseline", MODEL,
                           "--judge", MODEL, "--limit", "2", "--max-new-tokens", "12", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "winning score" in done.stdout and "held-out loss" in done.stdout
    summary = json.loads((tmp_path / "verdicts.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["n"] == 2 == len(rows)
    # the same model on both sides answers identically (greedy), and says something
    assert all(r["answer_model"] == r["answer_baseline"] and r["answer_model"].strip() for r in rows)
    # every figure follows from the judge's own text: scores -> verdict per order -> outcome -> totals
    for r in rows:
        for order, a_first in (("ab", True), ("ba", False)):
            parsed = ev.parse_scores(r[f"judge_{order}"])
            assert r[f"scores_{order}"] == (list(parsed) if parsed else None)
            assert r[f"verdict_{order}"] == ev.order_verdict(parsed, a_first=a_first)
        assert r["outcome"] == EXPECTED[(r["verdict_ab"], r["verdict_ba"])]
    outcomes = [r["outcome"] for r in rows]
    assert [summary[k] for k in ("wins", "ties", "losses")] == [outcomes.count(o) for o in ("win", "tie", "loss")]
    assert summary["winning_score"] == pytest.approx((outcomes.count("win") - outcomes.count("loss")) / 2 + 1)
    assert summary["unparsed_judgements"] == sum((r["scores_ab"] is None) + (r["scores_ba"] is None) for r in rows)
    # held-out loss: the mean loss of the two reference answers, as the fp32 oracle computes it;
    # the CLI scores in `auto` dtype: bf16 moved these losses by at most 2.2% (20 bundled references)
    tests = ev.load_test_set()[:2]
    want = sum(oracle.score_pair(student_fp32.model, student_fp32.tokenizer, t["instruction"], t["input"],
                                 t["output"])["loss_a_condition"] for t in tests) / 2
    assert summary["heldout_loss_model"] == pytest.approx(want, rel=0.03)
    assert summary["heldout_loss_model"] == summary["heldout_loss_baseline"]


@pytest.mark.slow
def test_the_constrained_judge_always_gives_scores(teacher):
    """The packaged 135M judge on 10 bundled items, both orders: the first line is held to two
    scores at decode time, so (almost) every judgement parses."""
    from reflectune.reflection import Sampling

    tests = ev.load_test_set()[:10]
    answers = [t["output"] or "I do not know." for t in tests]
    rows = ev.judge(teacher, tests, answers, ["I do not know."] * 10, Sampling(0.0, 1.0, 32, 0, constrained="auto"))
    unparsed = sum((r["scores_ab"] is None) + (r["scores_ba"] is None) for r in rows)
    assert unparsed <= 1, unparsed  # at most 5% of 20
    assert all(r["judge_constrained"] == ["regex", "regex"] for r in rows)
    assert all(ev.parse_scores(r["judge_ab"]) == tuple(r["scores_ab"]) for r in rows if r["scores_ab"])


def decisions_table(n=40, seed=5):
    """Originals with their scores, as decisions.parquet holds them: IFD above and below 1, NaN,
    ties in length and IFD."""
    import random

    import polars as pl

    rng = random.Random(seed)
    ifd = [rng.choice([0.3, 0.5, 0.9, 0.95, 1.0, 1.2, float("nan")]) for _ in range(n)]
    return pl.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "source_index": list(range(n)),
                         "orig_instruction": [f"Q{i}" for i in range(n)], "orig_input": [""] * n,
                         "orig_output": [" ".join(["word"] * rng.randint(1, 12)) for _ in range(n)],
                         "orig_ifd_ppl": ifd, "orig_rifd_ppl": [0.5] * n})


def test_the_baseline_sets_are_what_they_say(tokenizer):
    import polars as pl

    from reflectune import records
    from reflectune.selection import select

    d = decisions_table()
    n = 9
    sets = {k: ev.baseline_pairs(k, d, n, tokenizer, seed=3) for k in ("random", "length", "ifd", "full")}
    for k, s in sets.items():
        records.check_columns(s, records.BASELINE, "test")
        assert set(s["baseline"]) == {k} and s["sample_id"].n_unique() == s.height
    # random: the sample today's evaluation drew (as many rows, the seed)
    drawn = d.select(instruction="orig_instruction", input="orig_input", output="orig_output").sample(
        n=n, seed=3, shuffle=True)
    assert sets["random"].select("instruction", "input", "output").equals(drawn)
    # length: the longest responses in the student's tokens, the earlier row first on a tie
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    longest = sorted(d.iter_rows(named=True), key=lambda r: (-count(r["orig_output"]), r["source_index"]))[:n]
    assert sets["length"]["sample_id"].to_list() == [r["sample_id"] for r in longest]
    assert sets["length"]["rank_value"].to_list() == [float(count(r["orig_output"])) for r in longest]
    # ifd: Cherry's own selection on these scores with a budget of n
    cherry = select(d, method="cherry", budget=n / d.height).filter(pl.col("selected"))
    assert sorted(sets["ifd"]["sample_id"]) == sorted(cherry["sample_id"]) and sets["ifd"].height == n
    assert (sets["ifd"]["rank_value"] < 1).all()
    assert sets["full"].height == d.height
    with pytest.raises(ValueError, match="unknown baseline 'longest'"):
        ev.baseline_pairs("longest", d, n)


def test_baselines_and_test_sets_are_read_from_their_settings():
    from reflectune.config import EvaluationConfig

    cfg = EvaluationConfig(baselines="random, length,random", test_sets="a.jsonl,s3://b/vicuna_test_set.jsonl")
    assert cfg.baseline_kinds == ["random", "length"]
    assert [ev.test_set_name(u) for u in cfg.test_set_uris] == ["a", "vicuna_test_set"]
    assert EvaluationConfig().test_set_uris == [None] and ev.test_set_name(None) == "bundled"
    with pytest.raises(ValueError, match="give one or more of random, length, ifd, full"):
        EvaluationConfig(baselines="random,longest")


def test_the_reports_most_helpful_rewrites_are_usable_ones():
    from reflectune import report
    from reflectune.records import DECISION

    def row(i, status, ifd):
        base = {name: None for name in DECISION} | {"sample_id": f"s{i}", "source_index": i, "orig_ifd_ppl": 0.5,
                                                    "orig_instruction": f"orig {i}", "orig_output": "old"}
        return base | {"ins_res_ifd_ppl": ifd, "ins_res_parse_status": status, "ins_res_instruction": f"rewrite {i}",
                       "ins_res_output": f"{status} answer {i}"}
    decisions = pl.DataFrame([row(0, "ok", 0.9), row(1, "review", 0.99), row(2, "ok", 0.7)], schema=DECISION)
    page = report._rewrites(decisions)
    assert "ok answer 0" in page and "ok answer 2" in page and "review answer 1" not in page
    assert "No usable rewrite" in report._rewrites(decisions.filter(pl.col("ins_res_parse_status") != "ok"))


def test_compare_sets_runs_side_by_side(tmp_path):
    from reflectune import report

    row = {"baseline": "random", "test_set": "vicuna", "n": 80, "wins": 30, "ties": 30, "losses": 20,
           "winning_score": 1.125, "unparsed_judgements": 0, "heldout_loss_model": None, "heldout_loss_baseline": None}
    runs = [("sel (selective)", {"model": "m1", "judge": "j", "table": [row]}),
            ("ch (cherry)", {"model": "m2", "judge": "j", "table": [row | {"winning_score": 0.9, "wins": 12}]})]
    text = report.compare_text(runs).splitlines()
    assert len(text) == 3 and text[1].split()[-1] == "1.125" and text[2].split()[-1] == "0.900"
    page = report.compare_page(runs)
    assert page.count("<svg class='plot'") == 2 and "sel (selective)" in page and "parity" in page


def test_an_empty_test_set_is_refused_by_name(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(Exception, match=r"empty.jsonl: no test items"):
        ev.load_test_set(str(empty))


def test_a_bad_test_set_stops_the_run_before_anything_is_paid_or_trained(tmp_path):
    """recycle --evaluate reads its test sets first (the command line and the flow alike)."""
    import subprocess
    import sys

    from reflectune.config import RecycleParams
    from reflectune.errors import InputFileError
    from reflectune.flows.recycle import recycle

    from .conftest import SAMPLE

    bad = tmp_path / "tests.jsonl"
    bad.write_text('{"prompt_id": 3, "category": "writing"}\n')
    done = subprocess.run([sys.executable, "-m", "reflectune.cli", "recycle", str(SAMPLE), "--out", str(tmp_path / "o"),
                           "--limit", "4", "--evaluate", "--test-sets", str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "tests.jsonl: item 1: no instruction" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "o" / "shards").exists()
    params = RecycleParams(dataset=str(SAMPLE), output=str(tmp_path / "p"), limit=4,
                           evaluation={"enabled": True, "test_sets": str(bad)})
    with pytest.raises(InputFileError, match="no instruction"):
        recycle.fn(params)
    assert not (tmp_path / "p" / "shards").exists()


@pytest.mark.parametrize("engine", ["openai", "openai-batch", "anthropic-batch"])
def test_an_api_judge_asks_the_server_it_is_given_with_the_key_it_is_given(engine, monkeypatch):
    """Every API judge (online or batch) goes to --base-url with the key of --api-key-env:
    never to the provider's public endpoint with the default key."""
    from reflectune.emulator import Emulator
    from reflectune.engines import judge_options, load_teacher
    from reflectune.reflection import Sampling

    monkeypatch.setenv("JUDGE_KEY", "sk-judge-own")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default-never-sent")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-default-never-sent")
    with Emulator(latency=0.0, batch_seconds=0.2) as emulator:
        # Anthropic's base is the server's root (it adds /v1 itself)
        options = judge_options(engine, emulator.root if engine == "anthropic-batch" else emulator.url, "JUDGE_KEY", 4)
        if engine != "openai":
            options |= {"poll_seconds": 0.1, "poll_max_seconds": 0.2}
        judge = load_teacher(engine, "emulated", **options)
        [gen] = judge.generate([[{"role": "user", "content": "Which answer is better, 1 or 2?"}]],
                               Sampling(max_new_tokens=32))
        stats = emulator.snapshot()
    assert gen.error is None and gen.text and stats["answered"] == 1, (gen, stats)
    assert emulator.keys_seen == {"sk-judge-own"}


def test_the_evaluate_commands_judge_is_journaled_and_held_to_its_budget(tmp_path):
    """`evaluate` pays its judge as recycle pays the teacher: each verdict kept as it returns (a
    rerun sends nothing), and a budget that stops it with exit 2 before it is passed."""
    import os
    import subprocess
    import sys

    from reflectune import journal
    from reflectune.emulator import Emulator

    def evaluate(*options):
        return subprocess.run(
            [sys.executable, "-m", "reflectune.cli", "evaluate", "--model", MODEL, "--baseline", MODEL, "--limit", "2",
             "--max-new-tokens", "8", "--judge", "emulated", "--judge-engine", "openai", "--base-url", emulator.url,
             *options],
            cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": "sk-judge-never-shown"}, capture_output=True, text=True,
            timeout=600)

    out = tmp_path / "verdicts.jsonl"
    with Emulator(latency=0.0, answer_words=(4, 8)) as emulator:
        first = evaluate("--out", str(out))
        assert first.returncode == 0, first.stderr[-3000:]
        paid = emulator.snapshot()
        held = journal.spend(str(tmp_path / "verdicts.journal"))
        assert paid["answered"] == held.requests == 4 and held.tokens == paid["prompt_tokens"] + paid["completion_tokens"]
        assert "judge requests: 4 sent, 0 answered from the journal" in first.stderr
        verdicts = out.read_text()

        again = evaluate("--out", str(out))
        assert again.returncode == 0, again.stderr[-3000:]
        assert emulator.snapshot()["answered"] == 4 and "judge requests: 0 sent, 4 answered" in again.stderr
        assert out.read_text() == verdicts

        # a fresh journal and a budget for about one verdict: stopped before the budget is passed
        stopped = evaluate("--journal", str(tmp_path / "small.journal"), "--budget-tokens", "600")
        spent = journal.spend(str(tmp_path / "small.journal"))
        answered = emulator.snapshot()["answered"] - 4
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    message = stopped.stderr.strip().splitlines()[-1]
    assert message.startswith("reflectune: error: the judge budget would be passed by the next request"), message
    assert "evaluation.judge_budget_tokens 600" in message and "Traceback" not in stopped.stderr
    assert 0 < spent.requests == answered < 4 and spent.tokens <= 600
    assert "sk-judge-never-shown" not in first.stderr + again.stderr + stopped.stderr + verdicts
