"""The `reflectune` command line.

Output: a command whose results are files (score, reflect, recycle) writes its progress and its
summary to stderr and nothing to stdout; a command whose result is text (plan, compare,
evaluate, report, models prepare) prints it to stdout. Errors go to stderr, with exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from pydantic import BaseModel

from reflectune import intake, io, lock, preflight, records
from reflectune.cli_options import (RECYCLE_HELP, RECYCLE_SECTION_SHORTCUTS, RECYCLE_SHORTCUTS, _config,
                                    _config_options, _default, _dotted, recycle_params)
from reflectune.cli_progress import _progress, _RunBars
from reflectune.config import RecycleParams, StudentConfig, TeacherConfig, config_fields
from reflectune.errors import Interrupted, ReflectuneError
from reflectune.secrets import redact
from reflectune.engines import STUDENT_ENGINES, TEACHER_ENGINES
from reflectune.models import DEFAULT_MODEL
from reflectune.reflection import KINDS
from reflectune.templates import DEFAULT_TEMPLATE, TEMPLATES


def main(argv: list[str] | None = None) -> int:
    # a run started here may start Prefect's temporary server: it does not phone home
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect 3.7 keeps task results under ~/.prefect/storage even when PREFECT_HOME is elsewhere
    if os.environ.get("PREFECT_HOME"):
        os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(os.environ["PREFECT_HOME"], "storage"))
    parser = _parser()
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["emulator"]:  # its options are the emulator's own (argparse cannot pass them through)
        from reflectune import emulator

        return emulator.main(given[1:], prog="reflectune emulator")
    args = parser.parse_args(_dotted(given))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except Interrupted as exc:
        print(f"reflectune: {exc}", file=sys.stderr)
        return exc.exit_code
    except ReflectuneError as exc:
        print(f"reflectune: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reflectune: interrupted", file=sys.stderr)
        return 130


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
    score.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    _intake_options(score)
    score.set_defaults(func=_score, config=_config_options(score, StudentConfig, {"model": "student"}, kebab=True))
    score.add_argument("--exact", dest="dtype", action="store_const", const="float32", default=argparse.SUPPRESS,
                       help="short for --dtype float32, the reference's precision")

    reflect = sub.add_parser("reflect", help="teacher reflection: write the ins, res and ins_res variants")
    reflect.add_argument("input", help="dataset: .json array, .jsonl or .parquet; local path or s3:// URI")
    reflect.add_argument("--out", required=True, help="variants file (.parquet or .jsonl)")
    reflect.add_argument("--kind", default="both", choices=KINDS,
                         help="instruction: ins; response: res; both: ins, res and ins_res (default)")
    reflect.add_argument("--dtype", default="auto", help="transformers and vllm: auto, float32, bfloat16")
    reflect.add_argument("--device", default="auto", help="transformers: auto, cpu or cuda[:N]")
    reflect.add_argument("--journal", help="the request journal: every answer kept as it returns, so a rerun pays "
                         "for nothing twice and the budget counts what it holds (default: beside --out, "
                         "NAME.journal/)")
    _intake_options(reflect)
    reflect.set_defaults(func=_reflect, config=_config_options(
        reflect, TeacherConfig, {"model": "teacher", "request-timeout": "timeout"}, kebab=True))

    rec = sub.add_parser("recycle", conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="the whole pipeline as a Prefect flow: shards, teacher, student, selection, training",
                         description=RECYCLE_HELP)
    rec.add_argument("input", nargs="?", help="short for --dataset: a .json array, .jsonl or .parquet; local path or "
                     "s3:// URI")
    rec.add_argument("--params", help="a JSON file of flow parameters (the UI's form); options given here override it")
    rec.add_argument("--map", action="append", metavar="FIELD=COLUMN", default=[],
                     help="read FIELD (instruction, input, output) from another column; repeatable (column_map)")
    rec.set_defaults(func=_recycle, config=_config_options(rec, RecycleParams, RECYCLE_SHORTCUTS))
    # the short names of fields whose dotted prefix is also a section (--teacher is teacher.model)
    for path, alias in RECYCLE_SECTION_SHORTCUTS.items():
        rec.add_argument(f"--{alias}", dest=path, default=argparse.SUPPRESS, metavar="str",
                         help=f"short for --{path}")
    rec.add_argument("--exact", dest="student.dtype", action="store_const", const="float32", default=argparse.SUPPRESS,
                     help="short for --student.dtype float32: scores in the reference's precision")

    pl_ = sub.add_parser("plan", help="before spending GPU hours: rows, shards, tokens and time per stage")
    pl_.add_argument("input", help="dataset: .json array, .jsonl or .parquet; local path or s3:// URI")
    pl_.add_argument("--student", default=DEFAULT_MODEL, help="student model spec: its tokenizer counts tokens")
    pl_.add_argument("--teacher-engine", default=_default("teacher.engine"), choices=TEACHER_ENGINES)
    pl_.add_argument("--student-engine", default=_default("student.engine"), choices=STUDENT_ENGINES)
    pl_.add_argument("--teacher-size", default="135M", help="teacher parameters, e.g. 70B (default: %(default)s)")
    pl_.add_argument("--student-size", default="135M", help="student parameters, e.g. 7B (default: %(default)s)")
    pl_.add_argument("--device", default="cpu", choices=["cpu", "h100"], help="throughput basis (default: %(default)s)")
    pl_.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES)
    pl_.add_argument("--shard-size", type=int, default=_default("shard_size"))
    pl_.add_argument("--max-length", type=int, default=_default("student.max_length"))
    pl_.add_argument("--max-new-tokens", type=int, default=_default("teacher.max_new_tokens"))
    pl_.add_argument("--epochs", type=float, default=_default("training.epochs"))
    pl_.add_argument("--verify", action=argparse.BooleanOptionalAction, default=_default("teacher.verify"),
                     help=config_fields(RecycleParams)["teacher.verify"].description)
    for name in _PLAN_TEACHER:
        pl_.add_argument(f"--{name.replace('_', '-')}", type=int if name == "budget_tokens" else float,
                         default=_default(f"teacher.{name}"), help=config_fields(RecycleParams)[f"teacher.{name}"].description)
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

    cmp = sub.add_parser("compare", help="the evaluations of finished runs on the same data side by side (e.g. "
                         "selective, cherry and superfilter): a table, and with --html one page")
    cmp.add_argument("dirs", nargs="+", metavar="DIR", help="recycle output folders that ran --evaluate")
    cmp.add_argument("--html", help="also write the comparison as one HTML page to this file")
    cmp.set_defaults(func=_compare)

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
    ev.add_argument("--judge-engine", default=_default("evaluation.judge_engine"), choices=TEACHER_ENGINES)
    ev.add_argument("--engine", default=_default("student.engine"), choices=STUDENT_ENGINES,
                    help="engine the two models answer (and are scored) on")
    ev.add_argument("--base-url", help="openai judge: endpoint")
    ev.add_argument("--api-key-env", default=_default("teacher.api_key_env"), help="openai judge: variable holding the key")
    ev.add_argument("--test-set", help="JSONL with instruction (and optional input, output); default: the "
                    "bundled 40 instructions")
    ev.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES, help="the template both models "
                    "were trained with (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=int, default=_default("evaluation.max_new_tokens"),
                    help="answer length limit (default: %(default)s, as the paper)")
    ev.add_argument("--limit", type=int, help="only the first N test items")
    ev.add_argument("--out", help="write verdicts (.jsonl or .parquet) and OUT's .json summary")
    ev.add_argument("--journal", help="the judge's request journal: every verdict kept as it returns, so a rerun "
                    "pays for none twice and the budget counts what it holds (default: beside --out, NAME.journal/; "
                    "without --out, reflectune-judge.journal/)")
    ev.add_argument("--budget-tokens", type=int, help="the judge's budget in tokens (prompt + completion): no request "
                    "is sent that could pass it")
    ev.add_argument("--budget-usd", type=float, help="the judge's budget in dollars (needs --price-input-per-m and "
                    "--price-output-per-m)")
    ev.add_argument("--price-input-per-m", type=float, default=0.0, help="the judge's dollars per million prompt tokens")
    ev.add_argument("--price-output-per-m", type=float, default=0.0,
                    help="the judge's dollars per million completion tokens")
    ev.set_defaults(func=_evaluate)

    rehearse = sub.add_parser("emulator", add_help=False, help="a paid teacher's API on loopback, for a rehearsal of "
                              "a paid run at no cost: limits, 429s, faults, the batch APIs (`reflectune emulator "
                              "--help`; docs/rehearsal.md)")

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
    from reflectune import scoring
    from reflectune.config import VLLMConfig
    from reflectune.engine_options import student_options
    from reflectune.engines import load_student

    cfg, data = _one_stage(StudentConfig, args)
    engine = load_student(cfg.engine, cfg.model, **student_options(cfg, VLLMConfig(), device=args.device))
    try:
        with _progress("scoring") as advance:
            scored = scoring.score_table(data.valid, engine, cfg.template, cfg.max_length, advance, cfg.input_join)
    finally:
        engine.close()
    rejected_uri = _write(scored, data, args.out)
    failed = scored.filter(scored["score_error"].is_not_null()).height
    counts = data.counts
    print(
        f"reflectune: {counts['input_rows']} input rows: {counts['valid_rows']} scored, "
        f"{counts['rejected_rows']} rejected ({counts['duplicate_rows']} duplicates), {failed} with NaN scores -> {args.out}",
        file=sys.stderr,
    )
    if rejected_uri:
        print(f"reflectune: rejected rows and reasons -> {rejected_uri}", file=sys.stderr)
    return 0


def _one_stage(model: type[BaseModel], args: argparse.Namespace) -> tuple[Any, intake.Intake]:
    """`score` and `reflect`: the stage's configuration and the valid input, both checked
    before a model loads."""
    from reflectune.secrets import has_userinfo

    cfg = _config(model, args)
    # refused as recycle refuses them: a URL is printed and recorded, its password with it
    leaking = [name for name, url in (("the input", args.input), ("--out", args.out),
                                      ("--base-url", getattr(cfg, "base_url", None))) if has_userinfo(url)]
    if leaking:
        raise ReflectuneError(f"{' and '.join(leaking)} carries a user name or password in its URL: give the URL "
                              "without them, and the credentials in the environment (--api-key-env names the "
                              "variable of an API key; AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)")
    if not args.out.endswith((".parquet", ".jsonl")):
        raise ReflectuneError(f"--out '{args.out}': use a .parquet or .jsonl file name")
    if "://" not in args.out + args.input and os.path.abspath(args.out) == os.path.abspath(args.input):
        raise ReflectuneError(f"--out '{args.out}' is the input file: writing there would overwrite it; name "
                              "another file")
    _check_engine(cfg.engine)
    return cfg, intake.load(args.input, intake.parse_column_map(args.map), args.limit)


def _write(table: Any, data: intake.Intake, out: str) -> str | None:
    """The stage's output, and the rejected input rows beside it; returns where those went."""
    records.write(table, out)
    if not data.rejected.height:
        return None
    rejected = _beside(out, "rejected")
    records.write(data.rejected, rejected)
    return rejected


def _reflect(args: argparse.Namespace) -> int:
    from reflectune import reflection, stages
    from reflectune.config import VLLMConfig
    from reflectune.engine_options import teacher_options
    from reflectune.engines import load_teacher

    cfg, data = _one_stage(TeacherConfig, args)
    if cfg.api_key_block:  # a Prefect block: the flow's tasks read it, this command does not talk to Prefect
        raise ReflectuneError(f"--api-key-block '{cfg.api_key_block}': the reflect command reads the key from the "
                              "variable named by --api-key-env; Prefect Secret blocks are read by `reflectune "
                              "recycle` (teacher.api_key_block)")
    options = teacher_options(cfg, VLLMConfig(), dtype=args.dtype, device=args.device)
    teacher = load_teacher(cfg.engine, cfg.model, **options)
    sampling, retry = stages.teacher_sampling(cfg)
    per_row = {"instruction": 1, "response": 1, "both": 3}[args.kind]
    kept_at = args.journal or os.path.splitext(args.out)[0] + ".journal"
    try:
        planned = [per_row * data.valid.height]  # retries add to it
        # the journal and the budget, as in recycle: a rerun pays for nothing twice, a batch
        # engine's batches are kept and found again
        with _progress("reflecting", unit="gen") as advance, \
                stages.journaled(teacher, cfg, kept_at, data.valid) as journaled:
            variants = reflection.reflect(data.valid, journaled, args.kind, sampling, retry,
                                          progress=lambda n, tokens, note=None: advance(n, planned[0], tokens, note),
                                          plan=lambda total: planned.__setitem__(0, total), verify=cfg.verify)
    finally:
        teacher.close()
    _write(variants, data, args.out)
    status = variants.group_by("variant", "parse_status").len().sort("variant", "parse_status")
    summary = ", ".join(f"{v}/{s}: {n}" for v, s, n in status.iter_rows())
    print(
        f"reflectune: {data.input_rows} input rows, {data.valid.height} reflected, {data.rejected.height} rejected; "
        f"{summary}; tokens in {variants['prompt_tokens'].sum()}, out {variants['completion_tokens'].sum()} "
        f"({journaled.sent.requests} requests sent, {journaled.replayed.requests} answered from the journal "
        f"{kept_at}) -> {args.out}",
        file=sys.stderr,
    )
    return 0


def _recycle(args: argparse.Namespace) -> int:
    from reflectune import progress

    params = recycle_params(args)
    if "vllm" in (params.teacher.engine, params.student.engine):
        _check_engine("vllm")
    preflight.check(params)
    lock.check(params.output)  # a busy folder named at once, not after the server's start-up
    _prefect_api()
    recycle = _flows("recycle").recycle
    from prefect.exceptions import TerminationSignal  # Prefect is imported by now

    _quiet_user_errors()
    previous = signal.signal(signal.SIGINT, _interrupt), signal.signal(signal.SIGTERM, _terminate)
    try:
        with _RunBars() as bars:
            progress.listen(bars.event)
            try:
                manifest = recycle(params)
            except TerminationSignal:
                # SIGTERM (`timeout`, `docker stop`, a scheduler): Prefect's engine raises it in
                # this thread, marks the flow run crashed, then hands the signal to _terminate,
                # which asks the shards at work to stop as Ctrl-C does
                stopped = Interrupted(progress.INTERRUPTED)
                stopped.exit_code = 143
                raise stopped from None
            finally:
                progress.listen(None)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    _summary(manifest)
    return 0


def _summary(manifest: dict[str, Any]) -> None:
    """A finished run's summary, its evaluation's table included: on stderr, as the results of
    every command that writes files (the module's note)."""
    from reflectune import manifest as run

    print(run.text(manifest), file=sys.stderr)
    ev = manifest.get("evaluation", {})
    if ev.get("evaluated"):
        from reflectune.evaluation import render_table

        print(render_table(ev), file=sys.stderr)


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C: the first asks the run to stop (the shard at work ends unmarked, the flow run
    records it); a second stops the process at once (its Prefect server dies with it)."""
    from reflectune import progress

    if progress.stop.is_set():
        os._exit(130)
    progress.stop.set()
    print("\nreflectune: stopping (Ctrl-C again to stop at once)", file=sys.stderr)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM: the run stops as after a Ctrl-C (the shard at work ends unmarked), at once."""
    from reflectune import progress

    progress.stop.set()
    print("\nreflectune: stopping (terminated)", file=sys.stderr)


def _prefect_api() -> None:
    """The Prefect server the flow reports to: PREFECT_API_URL's, else one of this command's
    own (reflectune.api_server), which ends with the command."""
    if not os.environ.get("PREFECT_API_URL"):
        from reflectune import api_server

        os.environ["PREFECT_API_URL"] = api_server.start()


# the teacher's settings `plan` takes, as options of the same names (--budget-usd)
_PLAN_TEACHER = ("price_input_per_m", "price_output_per_m", "batch_price_input_per_m", "batch_price_output_per_m",
                 "budget_tokens", "budget_usd")


def _plan(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from reflectune import plan
    from reflectune.models import resolve

    teacher = _plan_teacher(args)
    if args.shard_size < 1:
        raise ReflectuneError(f"invalid options:\n  --shard-size: {args.shard_size}: give 1 or more records per shard, "
                              "as recycle takes it")
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
                       teacher_params=sizes[0], student_params=sizes[1], throughput=given,
                       price_input_per_m=args.price_input_per_m, price_output_per_m=args.price_output_per_m,
                       budget_tokens=args.budget_tokens, budget_usd=args.budget_usd, verify=args.verify,
                       batch_prices=teacher.prices if teacher.batched else None)
    print(plan.render(result))
    return 0


def _plan_teacher(args: argparse.Namespace) -> TeacherConfig:
    """The teacher's prices and budgets checked as `recycle` checks them (a budget of 0, a
    dollar budget without prices), each problem named by plan's own option."""
    import re

    from reflectune.cli_options import problems

    try:
        return TeacherConfig(engine=args.teacher_engine, max_new_tokens=args.max_new_tokens,
                             **{name: getattr(args, name) for name in _PLAN_TEACHER})
    except ValueError as exc:
        names = "|".join((*_PLAN_TEACHER, "max_new_tokens"))
        text = re.sub(rf"\b(?:teacher\.)?({names})\b", lambda m: "--" + m[1].replace("_", "-"), problems(exc))
        raise ReflectuneError(f"invalid options:\n{text}") from None


def _compare(args: argparse.Namespace) -> int:
    import polars as pl

    from reflectune import report, run_folder

    problems, seen, runs, samples = [], {}, [], []
    roots = [os.path.realpath(d) if "://" not in d else d.rstrip("/") for d in args.dirs]
    for d, root, label in zip(args.dirs, roots, _labels(roots)):
        folder = run_folder.RunFolder(d)
        if root in seen:
            problems.append(f"{d}: the same folder as {seen[root]}: give each run once")
            continue
        seen[root] = d
        if not io.exists(d):
            problems.append(f"{d}: no such folder: check the path")
            continue
        try:
            summary, manifest = io.read_json(folder.evaluation), io.read_json(folder.manifest)
            ids = pl.read_parquet(io.read_bytes(folder.decisions), columns=["sample_id"])["sample_id"]
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{d}: no finished evaluation ({run_folder.MANIFEST}, {run_folder.DECISIONS} or the "
                            "evaluation's summary is missing): give folders of finished runs with --evaluate")
            continue
        if not summary.get("table"):
            problems.append(f"{d}: its evaluation has no table of baselines: run it again with --evaluate")
            continue
        parameters = manifest.get("parameters", {})
        runs.append((f"{label} ({parameters.get('selection', {}).get('method', '?')})", summary))
        samples.append((d, parameters.get("dataset", "?"), set(ids.to_list())))
    # runs are compared on one dataset: the same samples (ids are hashes of the pairs), wherever it was read
    for d, dataset, ids in samples[1:]:
        first, first_dataset, first_ids = samples[0]
        if ids != first_ids:
            problems.append(f"{d} ran on other data than {first}: {len(ids):,} samples of {dataset} against "
                            f"{len(first_ids):,} of {first_dataset}, {len(ids & first_ids):,} in common: compare "
                            "runs of one dataset, with the same limit and column map")
    if problems:
        raise ReflectuneError(problems[0] if len(problems) == 1 else
                              "cannot compare:\n" + "\n".join(f"  {p}" for p in problems))
    print(report.compare_text(runs))
    if args.html:
        io.write_bytes(args.html, report.compare_page(runs).encode("utf-8"))
        print(f"wrote {args.html}")
    return 0


def _labels(roots: list[str]) -> list[str]:
    """Each folder's name, with as many of its parents as it takes to tell folders of one name
    apart (runs/a/out and runs/b/out: a/out and b/out)."""
    parts = [root.split("/") for root in roots]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(set(roots)):
            return labels
    return roots


def _publish(args: argparse.Namespace) -> int:
    from reflectune import card

    print(card.publish(args.dir, args.repo, args.token_env, args.private))
    return 0


def _report(args: argparse.Namespace) -> int:
    from reflectune import report

    import json

    from reflectune import run_folder

    folder = run_folder.RunFolder(args.dir)
    if not io.exists(folder.manifest):
        raise ReflectuneError(f"{args.dir}: no {run_folder.MANIFEST}: give the output folder of a finished recycle run")
    try:
        manifest = io.read_json(folder.manifest)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ReflectuneError(f"{folder.manifest} is not valid JSON (cut short?): run the recycle command "
                              "into this folder again to write it anew (finished shards are reused)") from None
    missing = [run_folder.DECISIONS] if not io.exists(folder.decisions) else []
    if missing or not isinstance(manifest, dict) or "counts" not in manifest:
        what = f"{', '.join(missing)} is missing" if missing else f"{run_folder.MANIFEST} is not a run's manifest"
        raise ReflectuneError(f"{args.dir}: {what}: the run did not finish there; run the recycle command into "
                              "this folder again (finished shards are reused)")
    print(report.write(args.dir, manifest, price_in=args.price_in, price_out=args.price_out))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import re

    import polars as pl

    from reflectune import evaluation, journal
    from reflectune.cli_options import problems
    from reflectune.config import EvaluationConfig

    # the judge's budget as recycle's evaluation takes it, so both refuse the same settings alike
    names = ("budget_tokens", "budget_usd", "price_input_per_m", "price_output_per_m")
    try:
        settings = EvaluationConfig(**{f"judge_{name}": getattr(args, name) for name in names})
    except ValueError as exc:
        text = re.sub(rf"\b(?:evaluation\.)?judge_({'|'.join(names)})\b", lambda m: "--" + m[1].replace("_", "-"),
                      problems(exc))
        raise ReflectuneError(f"invalid options:\n{text}") from None
    tests = evaluation.load_test_set(args.test_set)[: args.limit]
    _check_engine(args.judge_engine)
    _check_engine(args.engine)
    kept_at = args.journal or (os.path.splitext(args.out)[0] + ".journal" if args.out else "reflectune-judge.journal")
    before = journal.spend(kept_at)
    result = evaluation.evaluate(args.model, args.baseline, args.judge, tests, template=args.template,
                                 judge_engine=args.judge_engine,
                                 judge_base_url=args.base_url, judge_api_key_env=args.api_key_env,
                                 max_new_tokens=args.max_new_tokens, engine=args.engine, judge_journal=kept_at,
                                 judge_budget=evaluation.judge_budget(settings))
    sent = journal.spend(kept_at).requests - before.requests
    print(f"reflectune: judge requests: {sent} sent, {2 * len(tests) - sent} answered from the journal {kept_at}",
          file=sys.stderr)
    if args.out:
        records.write(pl.DataFrame(result.rows), args.out)
        io.write_json(result.summary, os.path.splitext(args.out)[0] + ".json")
    print(evaluation.render_table(result.summary))
    return 0


def _flows(module: str):
    """reflectune.flows.MODULE. flows/ and tasks/ are installed inside the package: a source
    checkout ahead of a regular (not editable) install on sys.path hides them."""
    import importlib

    try:
        return importlib.import_module(f"reflectune.flows.{module}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("reflectune.flows", "reflectune.tasks"):
            raise
        raise ReflectuneError(
            f"{exc.name} is not importable: reflectune is imported from {os.path.dirname(__file__)}, a source "
            "checkout that hides the installed package. Install the checkout editable (pip install -e ., as make "
            "setup does) or run outside it") from None


def _cluster_setup(args: argparse.Namespace) -> int:
    setup = _flows("cluster").setup

    pools = dict(item.split("=", 1) for item in args.pool if "=" in item) or {"reflectune": "process", "gpu": "process"}
    result = setup(pools, args.heartbeat, args.grace)
    print(f"reflectune: work pools created: {', '.join(result['pools_created']) or 'none (all existed)'}; "
          f"automation {result['automation']} marks runs Crashed after {args.heartbeat + args.grace}s "
          "without a heartbeat")
    return 0


class _UserErrorFilter(logging.Filter):
    """A user's error (ReflectuneError) reaches the terminal once, as this command's message:
    Prefect's log records of it keep their text and lose the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ReflectuneError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict) if name.startswith("prefect")]
    for handler in {h for logger in [logging.getLogger(), *loggers] for h in logger.handlers}:
        if not any(isinstance(f, _UserErrorFilter) for f in handler.filters):
            handler.addFilter(_UserErrorFilter())


def _check_engine(engine: str) -> None:
    """Fail before reading data or loading models when the engine's package is missing."""
    if engine == "vllm":
        from reflectune.engines.vllm_args import require_vllm

        require_vllm("--engine vllm")


def _beside(uri: str, tag: str) -> str:
    stem, ext = os.path.splitext(uri)
    return f"{stem}.{tag}{ext}"


if __name__ == "__main__":
    sys.exit(main())
