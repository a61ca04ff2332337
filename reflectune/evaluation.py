"""Did the student get better? Pairwise judging and held-out loss (docs/method.md).

Both models answer every test instruction in the template they were trained with. A judge
scores the two answers 1-10 twice, once in each order, so a judge that favours the first (or
second) position cannot decide the outcome: per order, A wins when its score is higher; then
win/win, win/tie and tie/win are a win, win/lose, lose/win and tie/tie a tie, the rest a loss.
Winning score = (wins - losses) / N + 1: 1 is parity, 2 all wins, 0 all losses. Where the test
set has reference answers, each model's loss on them (mean per-token NLL of the reference given
the prompt) is reported too.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from reflectune import formats, io, journal, records, templates, training
from reflectune.config import BASELINES, RecycleParams
from reflectune.engines import DEFAULT_ENGINE
from reflectune.engines.vllm_args import DEFAULT_CONTEXT
from reflectune.errors import InputFileError
from reflectune.reflection import Sampling
from reflectune.run_folder import RunFolder
from reflectune.scoring import MAX_LENGTH

BUNDLED_TEST_SET = Path(__file__).resolve().parent / "data" / "test_set.jsonl"
JUDGE_VERSION = "pairwise-judge/v2"
# field names of the common test sets (Vicuna, Koala, WizardLM, Self-instruct, LIMA) as shipped
INSTRUCTION_NAMES = ("instruction", "text", "prompt", "question", "Instruction")
INPUT_NAMES = ("input", "instances_input")
OUTPUT_NAMES = ("output", "reference", "answer", "target")

# The pairwise protocol of the paper's evaluation (Vicuna's reviewer prompt, as Cherry_LLM and
# Reflection-Tuning use it); each pair is judged in both orders.
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_CRITERIA = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first output a single line containing only two values indicating the "
    "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that "
    "the order in which the responses were presented does not affect your judgment."
)


def judge_messages(question: str, first: str, second: str) -> list[dict[str, str]]:
    user = (
        f"[Question]\n{question}\n\n"
        f"[The Start of Assistant 1's Answer]\n{first}\n\n[The End of Assistant 1's Answer]\n\n"
        f"[The Start of Assistant 2's Answer]\n{second}\n\n[The End of Assistant 2's Answer]\n\n"
        f"[System]\n{JUDGE_CRITERIA}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_SCORES = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*[,;\s]\s*(\d+(?:\.\d+)?)")


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores from the judge's first line that has two numbers; None when there are none
    (or they are not 0-10)."""
    for line in text.strip().splitlines():
        m = _SCORES.search(line)
        if m:
            a, b = float(m.group(1)), float(m.group(2))
            if 0 <= a <= 10 and 0 <= b <= 10:
                return a, b
    return None


def order_verdict(scores: tuple[float, float] | None, a_first: bool) -> str:
    """win / tie / lose for model A in one judging order; unparsed judge output is a tie."""
    if scores is None:
        return "tie"
    a, b = scores if a_first else (scores[1], scores[0])
    return "win" if a > b else "lose" if a < b else "tie"


def combine(first: str, second: str) -> str:
    """The outcome of both orders (docs/method.md)."""
    pair = {first, second}
    if pair <= {"win", "tie"} and "win" in pair:
        return "win"
    if pair == {"win", "lose"} or pair == {"tie"}:
        return "tie"
    return "loss"


def winning_score(outcomes: list[str]) -> float:
    n = len(outcomes)
    return (outcomes.count("win") - outcomes.count("loss")) / n + 1 if n else float("nan")


@dataclass
class Result:
    model: str
    baseline: str
    judge: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    loss_model: float | None = None
    loss_baseline: float | None = None

    @property
    def summary(self) -> dict[str, Any]:
        outcomes = [r["outcome"] for r in self.rows]
        return {"model": self.model, "baseline": self.baseline, "judge": self.judge, "judge_prompt": JUDGE_VERSION,
                "n": len(outcomes), "wins": outcomes.count("win"), "ties": outcomes.count("tie"),
                "losses": outcomes.count("loss"), "winning_score": round(winning_score(outcomes), 4),
                "unparsed_judgements": sum((r["scores_ab"] is None) + (r["scores_ba"] is None) for r in self.rows),
                "heldout_loss_model": self.loss_model, "heldout_loss_baseline": self.loss_baseline}


def load_test_set(uri: str | None = None) -> list[dict[str, str]]:
    """JSONL (or a JSON array) with an instruction and optional input and reference output."""
    uri = uri or str(BUNDLED_TEST_SET)
    text = io.read_bytes(uri).decode("utf-8-sig")
    stripped = text.lstrip()
    rows = json.loads(text) if stripped.startswith("[") else []
    if not rows:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputFileError(f"{uri}: line {number}: invalid JSON ({exc.msg}): one object per line") from None
    out = []
    for i, row in enumerate(rows):
        item = _test_item(row)
        if item is None:
            raise InputFileError(f"{uri}: item {i + 1}: {_refused(row)}")
        out.append(item)
    if not out:
        raise InputFileError(f"{uri}: no test items: give a JSON Lines file (or a JSON array) of objects, each with "
                             f"one of the fields {list(INSTRUCTION_NAMES)}")
    return out


def _test_item(row: Any) -> dict[str, str] | None:
    """One test item as the common sets ship it: Vicuna `text`, WizardLM `Instruction`,
    Koala `prompt`, Self-instruct `instruction` with its first instance's input and output,
    LIMA `conversations` (the first turn asks, the second answers)."""
    if not isinstance(row, dict):
        return None
    conversations = row.get("conversations")
    if isinstance(conversations, list) and conversations and isinstance(conversations[0], str):
        answer = conversations[1] if len(conversations) > 1 and isinstance(conversations[1], str) else ""
        return {"instruction": conversations[0], "input": "", "output": answer}
    instruction = next((row[k] for k in INSTRUCTION_NAMES if isinstance(row.get(k), str) and row[k].strip()), None)
    if instruction is None:
        return None
    instances = row.get("instances")
    first = instances[0] if isinstance(instances, list) and instances and isinstance(instances[0], dict) else {}
    return {"instruction": instruction,
            "input": next((v for k in INPUT_NAMES if isinstance(v := row.get(k, first.get(k)), str)), ""),
            "output": next((v for k in OUTPUT_NAMES if isinstance(v := row.get(k, first.get(k)), str)), "")}


def _refused(row: Any) -> str:
    """Why `_test_item` found no test item in `row`, and the fix."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object: give each item as an object with an instruction"
    conversations = row.get("conversations")
    if conversations is not None:  # LIMA's form, mistyped: advice to use it would not help
        return (f"`conversations` is a JSON {type(conversations).__name__}, not LIMA's list of turns: give it as "
                'an array of strings, the question first (["What is a haiku?", "A three-line poem ..."])')
    return f"no instruction: give it one of the fields {list(INSTRUCTION_NAMES)}, or LIMA's `conversations`"


def answer(engine: Any, tests: list[dict[str, str]], template: str, sampling: Sampling) -> list[str]:
    """Each test instruction answered in `template`, as the student was trained; the chat
    template goes through the engine's chat path."""
    if template == "chat":
        chats = [[{"role": "user", "content": templates.user_turn(t["instruction"], t["input"])}] for t in tests]
        gens = engine.generate(chats, sampling)
    else:
        prompts = [templates.render(template, t["instruction"], t["input"]) for t in tests]
        gens = engine.complete(prompts, sampling)
    return [g.text.strip() if not g.error else "" for g in gens]


def judge(judge_engine: Any, tests: list[dict[str, str]], answers_a: list[str], answers_b: list[str],
          sampling: Sampling) -> list[dict[str, Any]]:
    """Each pair judged in both orders; one row per test item with both verdicts and the outcome."""
    questions = [templates.question(t["instruction"], t["input"], "newline") for t in tests]
    chats = [judge_messages(q, a, b) for q, a, b in zip(questions, answers_a, answers_b)]
    chats += [judge_messages(q, b, a) for q, a, b in zip(questions, answers_a, answers_b)]
    # the first line must be the two scores: enforced at decode time where the engine can
    fmt = formats.judge_format()
    gens = judge_engine.generate(chats, sampling, None, [fmt] * len(chats))
    texts = [(formats.from_json(g.text, fmt) or g.text) if g.constrained in ("json_schema", "tool_use") else g.text
             for g in gens]
    n = len(tests)
    rows = []
    for i, test in enumerate(tests):
        ab, ba = parse_scores(texts[i]), parse_scores(texts[n + i])
        first, second = order_verdict(ab, a_first=True), order_verdict(ba, a_first=False)
        rows.append({"instruction": test["instruction"], "input": test["input"], "answer_model": answers_a[i],
                     "answer_baseline": answers_b[i], "judge_ab": gens[i].text, "judge_ba": gens[n + i].text,
                     "scores_ab": list(ab) if ab else None, "scores_ba": list(ba) if ba else None,
                     "verdict_ab": first, "verdict_ba": second, "outcome": combine(first, second),
                     "judge_constrained": [gens[i].constrained, gens[n + i].constrained]})
    return rows


def heldout_loss(scorer: Any, tests: list[dict[str, str]], template: str, max_length: int = MAX_LENGTH) -> float | None:
    """Mean of each reference answer's loss given its prompt (loss_a_condition), over the
    test items that have one."""
    from reflectune import scoring

    refs = [t for t in tests if t["output"].strip()]
    if not refs:
        return None
    losses = [r["loss_a_condition"] for r in scoring.score_rows(refs, scorer, template, max_length)]
    losses = [x for x in losses if isinstance(x, float) and math.isfinite(x)]  # failed rows are left out
    return round(sum(losses) / len(losses), 4) if losses else None


def _loss(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "n/a"


def render_table(summary: dict[str, Any]) -> str:
    """An evaluation as text: a run's table (one row per baseline and test set), or one pair's."""
    if "table" in summary:
        lines = [f"evaluation: {summary['model']} against each baseline, judge {summary['judge']} (both orders; "
                 "winning score 1 = parity)",
                 f"  {'baseline':<9} {'test set':<22} {'n':>4} {'wins':>5} {'ties':>5} {'losses':>6} {'score':>6}  "
                 "held-out loss (model / baseline)"]
        for r in summary["table"]:
            lines.append(f"  {r['baseline']:<9} {r['test_set']:<22} {r['n']:>4} {r['wins']:>5} {r['ties']:>5} "
                         f"{r['losses']:>6} {r['winning_score']:>6.3f}  {_loss(r['heldout_loss_model'])} / "
                         f"{_loss(r['heldout_loss_baseline'])}")
        return "\n".join(lines)
    loss = _loss
    return "\n".join([
        f"evaluation: {summary['model']} vs {summary['baseline']} on {summary['n']} test instructions, "
        f"judge {summary['judge']} (both orders)",
        f"  wins {summary['wins']}  ties {summary['ties']}  losses {summary['losses']}  "
        f"winning score {summary['winning_score']:.3f}  (1 = parity; unparsed judgements: {summary['unparsed_judgements']})",
        f"  held-out loss on reference answers: model {loss(summary['heldout_loss_model'])}, "
        f"baseline {loss(summary['heldout_loss_baseline'])}",
    ])


def evaluate(model: str, baseline: str, judge_spec: str, tests: list[dict[str, str]], **options: Any) -> Result:
    """One model against one baseline on one test set (`compare`'s options)."""
    return compare(model, {"baseline": baseline}, {"test": tests}, judge_spec, **options)[("baseline", "test")]


def compare(model: str, baselines: dict[str, str], test_sets: dict[str, list[dict[str, str]]], judge_spec: str, *,
            template: str = templates.DEFAULT_TEMPLATE, judge_engine: str = DEFAULT_ENGINE, judge_base_url: str | None = None,
            judge_api_key_env: str | None = None, max_new_tokens: int = 1024, judge_max_new_tokens: int = 32,
            max_length: int = MAX_LENGTH, batch_size: int = 8, constrained: str = "auto",
            engine: str = DEFAULT_ENGINE, judge_journal: str | None = None,
            judge_budget: journal.Budget | None = None) -> dict[tuple[str, str], Result]:
    """`model` against each baseline on each test set: every model answers every set (one model
    loaded at a time, on `engine`: transformers or vllm), with its held-out loss; then one judge
    compares each pair in both orders. Results by (baseline name, test set name).

    The judge is paid as the teacher is: behind the request journal at `judge_journal` (a rerun
    pays for no verdict twice) and `judge_budget` (nothing sent that could pass it)."""
    from reflectune import models
    from reflectune.engines import judge_options, load_teacher
    from reflectune.engines.hf import TransformersScorer, TransformersTeacher

    sampling = Sampling(0.0, 1.0, max_new_tokens, 0)
    answers: dict[str, dict[str, list[str]]] = {}
    losses: dict[str, dict[str, float | None]] = {}
    for name, spec in {"model": model, **baselines}.items():
        if engine == "vllm":  # one engine answers and scores
            from reflectune.engines.vllm_engine import VLLMEngine

            writer = scorer = VLLMEngine(spec, max_model_len=max(max_length + 1, DEFAULT_CONTEXT))
        else:
            writer = TransformersTeacher(spec, batch_size=batch_size)
        answers[name] = {set_name: answer(writer, tests, template, sampling) for set_name, tests in test_sets.items()}
        if engine != "vllm":
            writer.close()
            scorer = TransformersScorer(spec)
        losses[name] = {set_name: heldout_loss(scorer, tests, template, max_length) for set_name, tests in test_sets.items()}
        scorer.close()
    judge_engine_ = load_teacher(judge_engine, judge_spec,
                                 **judge_options(judge_engine, judge_base_url, judge_api_key_env, batch_size))
    judging = Sampling(0.0, 1.0, judge_max_new_tokens, 0, constrained=constrained)
    results = {}
    try:
        with journal.behind(judge_engine_, judge_journal, budget=judge_budget) if judge_journal \
                else nullcontext(judge_engine_) as judged:
            for name, spec in baselines.items():
                for set_name, tests in test_sets.items():
                    rows = judge(judged, tests, answers["model"][set_name], answers[name][set_name], judging)
                    results[(name, set_name)] = Result(
                        models.model_id(model), models.model_id(spec), getattr(judge_engine_, "teacher_id", judge_spec),
                        rows, losses["model"][set_name], losses[name][set_name])
    finally:
        judge_engine_.close()
    return results


def judge_budget(ev: Any) -> journal.Budget | None:
    """The judge's budget of an evaluation's settings (config.EvaluationConfig), None where none is set."""
    if ev.judge_budget_tokens is None and ev.judge_budget_usd is None:
        return None
    return journal.Budget(ev.judge_budget_tokens, ev.judge_budget_usd, ev.judge_price_input_per_m,
                          ev.judge_price_output_per_m, who="judge",
                          settings=("evaluation.judge_budget_tokens", "evaluation.judge_budget_usd"))


def baseline_pairs(kind: str, decisions: pl.DataFrame, n: int, tokenizer: Any = None, seed: int = 0) -> pl.DataFrame:
    """The original pairs a baseline student trains on (records.BASELINE), from the run's
    decisions: `random`, n pairs sampled with `seed`; `length`, the n with the longest
    responses in the student's tokens (`tokenizer`); `ifd`, the n that Cherry's rule keeps on
    the run's own scores (IFD < 1, highest first); `full`, every valid pair. Ties go to the
    earlier source row. `rank_value` is what ranked them (tokens, IFD) where something did."""
    originals = decisions.select("sample_id", "source_index", instruction="orig_instruction", input="orig_input",
                                 output="orig_output", ifd="orig_ifd_ppl")
    n = min(n, originals.height)
    if kind == "random":
        chosen = originals.sample(n=n, seed=seed, shuffle=True).with_columns(rank_value=pl.lit(None, pl.Float64))
    elif kind == "length":
        ids = tokenizer(originals["output"].to_list(), add_special_tokens=False)["input_ids"] if n else []
        chosen = (originals.with_columns(rank_value=pl.Series([float(len(x)) for x in ids], dtype=pl.Float64))
                  .sort(["rank_value", "source_index"], descending=[True, False]).head(n))
    elif kind == "ifd":
        chosen = (originals.filter(pl.col("ifd") < 1).with_columns(rank_value=pl.col("ifd"))
                  .sort(["rank_value", "source_index"], descending=[True, False]).head(n))
    elif kind == "full":
        chosen = originals.with_columns(rank_value=pl.lit(None, pl.Float64))
    else:
        raise ValueError(f"unknown baseline '{kind}': choose one of {', '.join(BASELINES)}")
    return chosen.with_columns(baseline=pl.lit(kind)).select(list(records.BASELINE))


def test_set_name(uri: str | None) -> str:
    """A test set's name in tables: its file's stem (vicuna_test_set), or `bundled`."""
    return "bundled" if uri is None else uri.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]


def train_baseline(params: RecycleParams, kind: str) -> dict[str, Any]:
    """One baseline's student: its original pairs (written beside the run) and its training
    with the run's settings, kept with a key of what determines it so a rerun, or the cluster's
    evaluation run after the baselines' own GPU runs, reuses it. {"rows", "training"}."""
    import hashlib

    out = RunFolder(params.output)
    selected = records.read(out.selected, records.SELECTED, "evaluation")
    key = hashlib.sha256(json.dumps([kind, selected["sample_id"].to_list(), params.student.model_dump(),
                                     params.training.model_dump(), params.evaluation.seed]).encode()).hexdigest()[:16]
    if io.exists(out.baseline_training(kind)) and io.exists(out.baseline_model(kind)):
        kept = io.read_json(out.baseline_training(kind))
        if kept.get("key") == key and kept["baseline"]["training"].get("trained"):
            return kept["baseline"]
    decisions = records.read(out.decisions, records.DECISION, "evaluation")
    tokenizer = None
    if kind == "length":
        from transformers import AutoTokenizer

        from reflectune.models import resolve

        tokenizer = AutoTokenizer.from_pretrained(resolve(params.student.model))
    pairs = baseline_pairs(kind, decisions, selected.height, tokenizer, params.evaluation.seed)
    records.write(pairs, out.baseline_pairs(kind))
    metrics = training.train(pairs.select("instruction", "input", "output"), params.student, params.training,
                             out.baseline_model(kind))
    result = {"rows": pairs.height, "training": metrics}
    io.write_json({"key": key, "baseline": result}, out.baseline_training(kind))
    return result


def evaluate_run(params: RecycleParams) -> dict[str, Any]:
    """A run's evaluation: a student trained with the same settings on each baseline's original
    pairs (`train_baseline`; already trained ones are reused); the selected data's student and
    each baseline's answer every test set, and the judge compares them in both orders. Verdicts,
    the table and the summary go to the run folder."""
    ev, out = params.evaluation, RunFolder(params.output)
    trained = {}
    for kind in ev.baseline_kinds:
        trained[kind] = train_baseline(params, kind)
        if not trained[kind]["training"].get("trained"):
            return {"evaluated": False,
                    "reason": f"the {kind} baseline was not trained: {trained[kind]['training'].get('reason')}"}
    test_sets = {test_set_name(uri): load_test_set(uri)[: ev.limit] for uri in ev.test_set_uris}
    results = compare(out.model, {kind: out.baseline_model(kind) for kind in trained}, test_sets, ev.judge,
                      template=params.student.template, judge_engine=ev.judge_engine,
                      judge_base_url=ev.judge_base_url, max_new_tokens=ev.max_new_tokens,
                      max_length=params.student.max_length, judge_journal=out.judge_journal,
                      judge_budget=judge_budget(ev))
    verdicts = [{"baseline": kind, "test_set": name, **row} for (kind, name), r in results.items() for row in r.rows]
    table = [{**{k: r.summary.get(k) for k in records.EVALUATION}, "baseline": kind, "test_set": name}
             for (kind, name), r in results.items()]
    records.write(pl.DataFrame(verdicts), out.evaluation_table)
    records.write(pl.DataFrame(table, schema=records.EVALUATION), out.evaluation_summary_table)
    first = next(iter(results.values()))
    summary = {"evaluated": True, "model": first.model, "judge": first.judge, "judge_prompt": JUDGE_VERSION,
               "table": table, "baselines": trained}
    io.write_json(summary, out.evaluation)
    return summary
