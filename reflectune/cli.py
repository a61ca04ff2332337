"""The `reflectune` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from reflectune import intake, io
from reflectune.config import TeacherConfig
from reflectune.errors import ReflectuneError
from reflectune.engines import STUDENT_ENGINES, TEACHER_ENGINES
from reflectune.models import DEFAULT_MODEL
from reflectune.reflection import KINDS
from reflectune.templates import DEFAULT_TEMPLATE, TEMPLATES


def main(argv: list[str] | None = None) -> int:
    # a run started here may start Prefect's temporary server: it does not phone home
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except ReflectuneError as exc:
        print(f"reflectune: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflectune", description=__doc__)
    sub = parser.add_subparsers()

    models = sub.add_parser("models", help="prepare model weights").add_subparsers()
    prepare = models.add_parser("prepare", help="convert a packaged model into $REFLECTUNE_HOME ahead of time")
    prepare.add_argument("spec", nargs="?", default=DEFAULT_MODEL)
    prepare.set_defaults(func=_models_prepare)

    score = sub.add_parser("score", help="score pairs with the student: IFD and r-IFD")
    score.add_argument("input", help="dataset: .json array, .jsonl or .parquet; local path or s3:// URI")
    score.add_argument("--out", required=True, help="output file (.parquet or .jsonl)")
    score.add_argument("--student", default=DEFAULT_MODEL, help="model spec (default: %(default)s)")
    score.add_argument("--engine", default="transformers", choices=STUDENT_ENGINES,
                       help="transformers (the CPU default) or vllm (GPU workers)")
    score.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES, help="prompt template P (default: %(default)s)")
    score.add_argument("--max-length", type=int, default=2048, help="truncation length in tokens (default: %(default)s)")
    score.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware has it, else fp32), float32, bfloat16")
    score.add_argument("--exact", action="store_true", help="float32, the reference's precision (same as --dtype float32)")
    score.add_argument("--input-join", default="none", choices=["none", "newline"],
                       help="r-IFD: instruction and input concatenated as the reference (none) or on two lines")
    score.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    _intake_options(score)
    score.set_defaults(func=_score)

    reflect = sub.add_parser("reflect", help="teacher reflection: write the ins, res and ins_res variants")
    reflect.add_argument("input", help="dataset: .json array, .jsonl or .parquet; local path or s3:// URI")
    reflect.add_argument("--out", required=True, help="variants file (.parquet or .jsonl)")
    reflect.add_argument("--teacher", default=DEFAULT_MODEL,
                         help="model spec; for --engine openai the served model name (default: %(default)s)")
    reflect.add_argument("--engine", default="transformers", choices=TEACHER_ENGINES, help="teacher engine")
    reflect.add_argument("--kind", default="both", choices=KINDS,
                         help="instruction: ins; response: res; both: ins, res and ins_res (default)")
    reflect.add_argument("--max-new-tokens", type=int, default=2048, help="generation limit per request (at most the context minus the prompt)")
    reflect.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as the reference")
    reflect.add_argument("--top-p", type=float, default=1.0)
    reflect.add_argument("--seed", type=int, default=0)
    reflect.add_argument("--constrained", default="auto", choices=["auto", "on", "off"],
                         help="enforce the output format at decode time: auto where the engine can (default)")
    reflect.add_argument("--repetition-penalty", type=float, default=TeacherConfig.model_fields["repetition_penalty"].default,
                         help="penalty on tokens already written (1 = none; default: %(default)s)")
    reflect.add_argument("--base-url", help="openai: endpoint, e.g. http://gpu-host:8000/v1")
    reflect.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: variable holding the key")
    reflect.add_argument("--concurrency", type=int, default=16, help="openai: requests in flight")
    reflect.add_argument("--timeout", type=float, default=300.0, help="openai: seconds per request")
    reflect.add_argument("--request-retries", type=int, default=6, help="openai: retries of a request the endpoint "
                         "did not answer (429, 5xx, timeout, no connection)")
    reflect.add_argument("--batch-size", type=int, default=8, help="transformers: chats per generate call")
    reflect.add_argument("--dtype", default="auto", help="transformers: auto, float32, bfloat16")
    reflect.add_argument("--device", default="auto", help="transformers: auto, cpu or cuda[:N]")
    _intake_options(reflect)
    reflect.set_defaults(func=_reflect)

    rec = sub.add_parser("recycle", help="the whole pipeline as a Prefect flow: shards, teacher, student, "
                         "selection, training")
    rec.add_argument("input", help="dataset: .json array, .jsonl or .parquet; local path or s3:// URI")
    rec.add_argument("--out", required=True, help="output folder (local or s3://); rerunning resumes")
    rec.add_argument("--params", help="a JSON file of flow parameters; options given here override it")
    rec.add_argument("--teacher", help="teacher model spec (openai: the served model name)")
    rec.add_argument("--teacher-engine", choices=TEACHER_ENGINES)
    rec.add_argument("--base-url", help="openai teacher: endpoint")
    rec.add_argument("--api-key-env", help="openai teacher: variable holding the key")
    rec.add_argument("--request-retries", type=int, help="openai teacher: retries of a request the endpoint did "
                     "not answer")
    rec.add_argument("--max-new-tokens", type=int, help="teacher generation limit")
    rec.add_argument("--constrained", choices=["auto", "on", "off"], help="teacher output format enforced at decode "
                     "time: auto where the engine can")
    rec.add_argument("--student", help="student model spec")
    rec.add_argument("--student-engine", choices=STUDENT_ENGINES)
    rec.add_argument("--template", choices=TEMPLATES)
    rec.add_argument("--exact", action="store_true", help="student scores in float32, the reference's precision")
    rec.add_argument("--input-join", choices=["none", "newline"], help="r-IFD: how instruction and input are joined")
    rec.add_argument("--shard-size", type=int, help="records per shard")
    rec.add_argument("--method", choices=["selective", "reflection", "cherry", "superfilter"],
                     help="selective (default), reflection, cherry (IFD only, no teacher) or superfilter (cherry "
                     "scored by --scorer)")
    rec.add_argument("--scorer", help="superfilter: the small scoring model's spec")
    rec.add_argument("--license", help="license of the output data for its dataset card (a Hugging Face id); "
                     "default: the same as the source's")
    rec.add_argument("--selection", choices=["released", "paper"], help="selection rule")
    rec.add_argument("--budget", type=float, help="keep the top fraction by IFD, e.g. 0.05")
    rec.add_argument("--no-train", action="store_true", help="stop after selection")
    rec.add_argument("--epochs", type=float)
    rec.add_argument("--learning-rate", type=float)
    rec.add_argument("--batch-size", type=int, help="global training batch")
    rec.add_argument("--per-device-batch-size", type=int)
    rec.add_argument("--train-max-length", type=int)
    rec.add_argument("--lora", action="store_true", help="train LoRA adapters (merged when saved)")
    rec.add_argument("--evaluate", action="store_true", help="also train a student on as many original pairs and "
                     "judge the two (see `reflectune evaluate`)")
    rec.add_argument("--judge", help="evaluation judge model spec")
    rec.add_argument("--judge-engine", choices=TEACHER_ENGINES, help="evaluation judge engine")
    rec.add_argument("--eval-limit", type=int, help="evaluation: only the first N test instructions")
    rec.add_argument("--eval-max-new-tokens", type=int, help="evaluation: answer length limit")
    rec.add_argument("--mode", choices=["local", "cluster"], help="where shard work runs")
    rec.add_argument("--max-workers", type=int)
    rec.add_argument("--retries", type=int, help="retries of a failed shard task")
    _intake_options(rec)
    rec.set_defaults(func=_recycle)

    pl_ = sub.add_parser("plan", help="before spending GPU hours: rows, shards, tokens and time per stage")
    pl_.add_argument("input", help="dataset: .json array, .jsonl or .parquet; local path or s3:// URI")
    pl_.add_argument("--student", default=DEFAULT_MODEL, help="student model spec: its tokenizer counts tokens")
    pl_.add_argument("--teacher-engine", default="transformers", choices=TEACHER_ENGINES)
    pl_.add_argument("--student-engine", default="transformers", choices=STUDENT_ENGINES)
    pl_.add_argument("--teacher-size", default="135M", help="teacher parameters, e.g. 70B (default: %(default)s)")
    pl_.add_argument("--student-size", default="135M", help="student parameters, e.g. 7B (default: %(default)s)")
    pl_.add_argument("--device", default="cpu", choices=["cpu", "h100"], help="throughput basis (default: %(default)s)")
    pl_.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES)
    pl_.add_argument("--shard-size", type=int, default=512)
    pl_.add_argument("--max-length", type=int, default=2048)
    pl_.add_argument("--max-new-tokens", type=int, default=2048)
    pl_.add_argument("--epochs", type=float, default=3.0)
    for stage in ("teacher", "student", "train"):
        pl_.add_argument(f"--{stage}-tps", type=float, help=f"{stage} tokens/s measured on your workers "
                         "(teacher: new tokens; others: tokens read)")
    _intake_options(pl_)
    pl_.set_defaults(func=_plan)

    rep = sub.add_parser("report", help="write DIR/report.html from a finished run's outputs")
    rep.add_argument("dir", help="a recycle output folder (local or s3://)")
    rep.add_argument("--price-in", type=float, default=0.0, help="teacher price per million prompt tokens, for the cost")
    rep.add_argument("--price-out", type=float, default=0.0, help="teacher price per million completion tokens")
    rep.set_defaults(func=_report)

    pub = sub.add_parser("publish", help="push a finished run's folder to a dataset hub (the card, the data, "
                         "the manifest and the report)")
    pub.add_argument("dir", help="a local recycle output folder")
    pub.add_argument("--repo", required=True, help="dataset repository id, e.g. my-org/alpaca-recycled")
    pub.add_argument("--token-env", default="HF_TOKEN", help="variable holding the hub token (default: %(default)s)")
    pub.add_argument("--private", action="store_true", help="create the repository private")
    pub.set_defaults(func=_publish)

    ev = sub.add_parser("evaluate", help="judge model A against baseline B on a test set (both orders) and "
                        "compare held-out loss")
    ev.add_argument("--model", required=True, help="model A, e.g. the student trained on the selected data (DIR/model)")
    ev.add_argument("--baseline", required=True, help="model B, e.g. the student trained on the original data")
    ev.add_argument("--judge", default=DEFAULT_MODEL, help="judge model spec; openai: the served model name")
    ev.add_argument("--judge-engine", default="transformers", choices=TEACHER_ENGINES)
    ev.add_argument("--engine", default="transformers", choices=STUDENT_ENGINES,
                    help="engine the two models answer (and are scored) on")
    ev.add_argument("--base-url", help="openai judge: endpoint")
    ev.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai judge: variable holding the key")
    ev.add_argument("--test-set", help="JSONL with instruction (and optional input, output); default: the "
                    "bundled 40 instructions")
    ev.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES, help="the template both models "
                    "were trained with (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit (the paper: 1024)")
    ev.add_argument("--limit", type=int, help="only the first N test items")
    ev.add_argument("--out", help="write verdicts (.jsonl or .parquet) and OUT's .json summary")
    ev.set_defaults(func=_evaluate)

    cluster = sub.add_parser("cluster", help="Prefect server setup for deployments").add_subparsers()
    setup = cluster.add_parser("setup", help="create the work pools and the automation that marks runs of "
                               "dead workers Crashed (PREFECT_API_URL names the server)")
    setup.add_argument("--pool", action="append", metavar="NAME=TYPE", default=[],
                       help="work pools to create when missing (default: reflectune=process gpu=process); "
                       "TYPE process or kubernetes (uses infra/kubernetes/gpu-base-job-template.json)")
    setup.add_argument("--heartbeat", type=int, default=30, help="flow run heartbeat seconds set on the workers")
    setup.add_argument("--grace", type=int, default=60, help="seconds past a missed heartbeat before Crashed")
    setup.set_defaults(func=_cluster_setup)
    return parser


def _intake_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", action="append", metavar="FIELD=COLUMN", default=[],
                   help="read FIELD (instruction, input, output) from another column; repeatable")
    p.add_argument("--limit", type=int, default=None, help="only the first N input rows")


def _models_prepare(args: argparse.Namespace) -> int:
    from reflectune.models import resolve

    print(resolve(args.spec))
    return 0


def _score(args: argparse.Namespace) -> int:
    from reflectune import intake, scoring
    from reflectune.engines import load_student

    if not args.out.endswith((".parquet", ".jsonl")):
        raise ReflectuneError(f"--out '{args.out}': use a .parquet or .jsonl file name")
    _check_engine(args.engine)
    data = intake.load(args.input, intake.parse_column_map(args.map), args.limit)
    from reflectune.config import StudentConfig, VLLMConfig
    from reflectune.engines import student_options

    cfg = StudentConfig(model=args.student, engine=args.engine, template=args.template, max_length=args.max_length,
                        dtype="float32" if args.exact else args.dtype, input_join=args.input_join)
    options = student_options(cfg, VLLMConfig()) | ({"device": args.device} if args.engine == "transformers" else {})
    engine = load_student(args.engine, args.student, **options)
    try:
        with _progress("scoring") as advance:
            scored = scoring.score_table(data.valid, engine, args.template, args.max_length, advance, args.input_join)
    finally:
        engine.close()
    io.write_table(scored, args.out)
    if data.rejected.height:
        rejected_uri = _beside(args.out, "rejected")
        io.write_table(data.rejected, rejected_uri)
    failed = scored.filter(scored["score_error"].is_not_null()).height
    counts = data.counts
    print(
        f"reflectune: {counts['input_rows']} input rows: {counts['valid_rows']} scored, "
        f"{counts['rejected_rows']} rejected ({counts['duplicate_rows']} duplicates), {failed} with NaN scores -> {args.out}",
        file=sys.stderr,
    )
    if data.rejected.height:
        print(f"reflectune: rejected rows and reasons -> {rejected_uri}", file=sys.stderr)
    return 0


def _reflect(args: argparse.Namespace) -> int:
    from reflectune import intake, reflection, stages
    from reflectune.engines import load_teacher

    if not args.out.endswith((".parquet", ".jsonl")):
        raise ReflectuneError(f"--out '{args.out}': use a .parquet or .jsonl file name")
    _check_engine(args.engine)
    data = intake.load(args.input, intake.parse_column_map(args.map), args.limit)
    from reflectune.config import VLLMConfig
    from reflectune.engines import teacher_options

    cfg = TeacherConfig(model=args.teacher, engine=args.engine, base_url=args.base_url, api_key_env=args.api_key_env,
                        concurrency=args.concurrency, request_timeout=args.timeout,
                        request_retries=args.request_retries, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, constrained=args.constrained, repetition_penalty=args.repetition_penalty)
    options = teacher_options(cfg, VLLMConfig())
    if args.engine != "openai":
        options |= {"dtype": args.dtype} | ({"device": args.device} if args.engine == "transformers" else {})
    teacher = load_teacher(args.engine, args.teacher, **options)
    sampling, retry = stages.teacher_sampling(cfg)
    per_row = {"instruction": 1, "response": 1, "both": 3}[args.kind]
    try:
        with _progress("reflecting", unit="gen") as advance:
            variants = reflection.reflect(data.valid, teacher, args.kind, sampling, retry,
                                          progress=lambda n, tokens: advance(n, per_row * data.valid.height))
    finally:
        teacher.close()
    io.write_table(variants, args.out)
    if data.rejected.height:
        io.write_table(data.rejected, _beside(args.out, "rejected"))
    status = variants.group_by("variant", "parse_status").len().sort("variant", "parse_status")
    summary = ", ".join(f"{v}/{s}: {n}" for v, s, n in status.iter_rows())
    print(
        f"reflectune: {data.input_rows} input rows, {data.valid.height} reflected, {data.rejected.height} rejected; "
        f"{summary}; tokens in {variants['prompt_tokens'].sum()}, out {variants['completion_tokens'].sum()} -> {args.out}",
        file=sys.stderr,
    )
    return 0


def recycle_params(args: argparse.Namespace):
    """RecycleParams from a JSON file (optional) and the options given."""
    import json

    from reflectune.config import RecycleParams

    base = json.loads(io.read_bytes(args.params)) if args.params else {}
    given = {
        ("dataset",): args.input, ("output",): args.out, ("limit",): args.limit, ("shard_size",): args.shard_size,
        ("teacher", "model"): args.teacher, ("teacher", "engine"): args.teacher_engine,
        ("teacher", "base_url"): args.base_url, ("teacher", "api_key_env"): args.api_key_env,
        ("teacher", "request_retries"): args.request_retries,
        ("teacher", "max_new_tokens"): args.max_new_tokens, ("teacher", "constrained"): args.constrained,
        ("student", "model"): args.student, ("student", "engine"): args.student_engine,
        ("student", "template"): args.template, ("student", "dtype"): "float32" if args.exact else None,
        ("student", "input_join"): args.input_join,
        ("selection", "mode"): args.selection, ("selection", "budget"): args.budget,
        ("selection", "method"): args.method, ("selection", "scorer"): args.scorer, ("license",): args.license,
        ("training", "enabled"): False if args.no_train else None, ("training", "epochs"): args.epochs,
        ("training", "learning_rate"): args.learning_rate, ("training", "batch_size"): args.batch_size,
        ("training", "per_device_batch_size"): args.per_device_batch_size,
        ("training", "max_length"): args.train_max_length, ("training", "lora"): True if args.lora else None,
        ("evaluation", "enabled"): True if args.evaluate else None, ("evaluation", "judge"): args.judge,
        ("evaluation", "judge_engine"): args.judge_engine,
        ("evaluation", "limit"): args.eval_limit, ("evaluation", "max_new_tokens"): args.eval_max_new_tokens,
        ("execution", "mode"): args.mode, ("execution", "max_workers"): args.max_workers,
        ("execution", "retries"): args.retries,
    }
    if args.map:
        base["column_map"] = intake.parse_column_map(args.map)
    for path, value in given.items():
        if value is None:
            continue
        node = base
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    try:
        return RecycleParams.model_validate(base)
    except ValueError as exc:  # pydantic lists every problem at once
        raise ReflectuneError(f"invalid recycle parameters:\n{exc}") from None


def _recycle(args: argparse.Namespace) -> int:
    from reflectune import progress

    params = recycle_params(args)
    if "vllm" in (params.teacher.engine, params.student.engine):
        _check_engine("vllm")
    from flows.recycle import recycle

    with _RunBars() as bars:
        progress.listen(bars.event)
        try:
            manifest = recycle(params)
        finally:
            progress.listen(None)
    c = manifest["counts"]
    print(f"reflectune: {c['input_rows']} input rows: {c['valid_rows']} valid, {c['rejected_rows']} rejected; "
          f"{c['selected_rows']} selected, {c['dropped_rows']} dropped", file=sys.stderr)
    t = manifest["training"]
    if t.get("trained"):
        print(f"reflectune: trained on {t['rows']} rows, {t['steps']} steps, loss {t['first_loss']:.3f} -> "
              f"{t['last_loss']:.3f}", file=sys.stderr)
    ev = manifest.get("evaluation", {})
    if ev.get("evaluated"):
        from reflectune.evaluation import render_table

        print(render_table(ev))
    print(f"reflectune: outputs in {params.output}: report.html, selected.jsonl, selected.parquet, decisions.parquet, "
          f"rejected.parquet, manifest.json" + (", model/" if t.get("trained") else ""), file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from reflectune import plan
    from reflectune.models import resolve

    try:
        sizes = plan.parse_size(args.teacher_size), plan.parse_size(args.student_size)
    except ValueError as exc:
        raise ReflectuneError(str(exc)) from None
    tokenizer = AutoTokenizer.from_pretrained(resolve(args.student))
    given = {k: v for k, v in (("teacher", args.teacher_tps), ("student", args.student_tps),
                                 ("train", args.train_tps)) if v}
    result = plan.plan(args.input, tokenizer, column_map=intake.parse_column_map(args.map), limit=args.limit,
                       shard_size=args.shard_size, teacher_engine=args.teacher_engine,
                       student_engine=args.student_engine, template=args.template, max_length=args.max_length,
                       max_new_tokens=args.max_new_tokens, epochs=args.epochs, device=args.device,
                       teacher_params=sizes[0], student_params=sizes[1], throughput=given)
    print(plan.render(result))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from reflectune import card

    print(card.publish(args.dir, args.repo, args.token_env, args.private))
    return 0


def _report(args: argparse.Namespace) -> int:
    from reflectune import report

    if not io.exists(io.join(args.dir, "manifest.json")):
        raise ReflectuneError(f"{args.dir}: no manifest.json: give the output folder of a finished recycle run")
    print(report.write(args.dir, price_in=args.price_in, price_out=args.price_out))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import polars as pl

    from reflectune import evaluation

    tests = evaluation.load_test_set(args.test_set)[: args.limit]
    options = {}
    if args.judge_engine == "openai":
        options = {"base_url": args.base_url, "api_key_env": args.api_key_env}
    _check_engine(args.judge_engine)
    _check_engine(args.engine)
    result = evaluation.evaluate(args.model, args.baseline, args.judge, tests, template=args.template,
                                 judge_engine=args.judge_engine, judge_options=options,
                                 max_new_tokens=args.max_new_tokens, engine=args.engine)
    if args.out:
        io.write_table(pl.DataFrame(result.rows), args.out)
        io.write_json(result.summary, os.path.splitext(args.out)[0] + ".json")
    print(evaluation.render_table(result.summary))
    return 0


def _cluster_setup(args: argparse.Namespace) -> int:
    from flows.cluster import setup

    pools = dict(item.split("=", 1) for item in args.pool if "=" in item) or {"reflectune": "process", "gpu": "process"}
    result = setup(pools, args.heartbeat, args.grace)
    print(f"reflectune: work pools created: {', '.join(result['pools_created']) or 'none (all existed)'}; "
          f"automation {result['automation']} marks runs Crashed after {args.heartbeat + args.grace}s "
          "without a heartbeat")
    return 0


def _check_engine(engine: str) -> None:
    """Fail before reading data or loading models when the engine's package is missing."""
    if engine == "vllm":
        from reflectune.engines.vllm_engine import require_vllm

        require_vllm("--engine vllm")


def _beside(uri: str, tag: str) -> str:
    stem, ext = os.path.splitext(uri)
    return f"{stem}.{tag}{ext}"


class _RunBars:
    """Two bars on stderr: shard tasks finished, and the work inside the shard running now
    (generations or tokens, with tokens/s), so a slow run can be told from a stuck one."""

    def __enter__(self) -> "_RunBars":
        self.shards = self.work = None
        self.current = None
        return self

    def event(self, name: str, info: dict) -> None:
        from tqdm import tqdm

        if name == "shard":
            if self.shards is None:
                self.shards = tqdm(total=info["total"], desc="shards", unit="task", file=sys.stderr, position=0)
            self.shards.update(1)
        elif name == "work":
            which = (info["stage"], info["shard"])
            if which != self.current:
                if self.work is not None:
                    self.work.close()
                self.current = which
                self.work = tqdm(total=info["total"], desc=f"{info['stage']} {info['shard']}", file=sys.stderr,
                                 position=1, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/"
                                 "{total_fmt} " + info["unit"] + " [{elapsed}] {postfix}")
            self.work.total = max(info["total"], info["done"])
            self.work.n = info["done"]
            self.work.set_postfix_str(f"{info['rate']:,.0f} tok/s", refresh=False)
            self.work.refresh()

    def __exit__(self, *exc: object) -> None:
        for bar in (self.work, self.shards):
            if bar is not None:
                bar.close()


class _progress:
    """A tqdm bar on stderr driven by `advance(n, total)` callbacks."""

    def __init__(self, label: str, unit: str = "tok"):
        self.label = label
        self.unit = unit
        self.bar = None

    def __enter__(self) -> Callable[[int, int], None]:
        def advance(n: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit=self.unit, unit_scale=True, file=sys.stderr)
            self.bar.update(n)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
