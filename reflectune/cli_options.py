"""The command line's options from the configuration: every field of RecycleParams (and of a
stage's config) as an option by its dotted name, everyday short names, `key=value` overrides,
a parameters file, and every refused setting named."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel

from reflectune import intake, io
from reflectune.config import RecycleParams, config_fields
from reflectune.errors import ReflectuneError

RECYCLE_HELP = """The whole pipeline as the Prefect flow `reflectune-recycle`: every parameter of the flow's
form is an option, by its dotted name (--selection.budget 0.05, or selection.budget=0.05), with
the form's description; --params FILE.json gives many at once and options override it. The
everyday ones have short names (--teacher for --teacher.model, --no-train for
--no-training.enabled). Rerunning with the same parameters resumes: finished shards are not
redone."""

# Everyday options' short names: each is another name of one RecycleParams field.
RECYCLE_SHORTCUTS = {
    "output": "out", "shard_size": "shard-size",
    "teacher.engine": "teacher-engine", "teacher.base_url": "base-url", "teacher.api_key_env": "api-key-env",
    "teacher.request_retries": "request-retries", "teacher.max_new_tokens": "max-new-tokens",
    "teacher.constrained": "constrained",
    "student.engine": "student-engine", "student.template": "template", "student.input_join": "input-join",
    "selection.method": "method", "selection.budget": "budget", "selection.scorer": "scorer",
    "training.enabled": "train", "training.epochs": "epochs", "training.learning_rate": "learning-rate",
    "training.batch_size": "batch-size", "training.per_device_batch_size": "per-device-batch-size",
    "training.max_length": "train-max-length", "training.lora": "lora",
    "evaluation.enabled": "evaluate", "evaluation.judge": "judge", "evaluation.judge_engine": "judge-engine",
    "evaluation.limit": "eval-limit", "evaluation.max_new_tokens": "eval-max-new-tokens",
    "evaluation.baselines": "baselines", "evaluation.test_sets": "test-sets",
    "execution.mode": "mode", "execution.max_workers": "max-workers", "execution.retries": "retries",
}
# short names that are also a section's name: added after the section, which they replace
RECYCLE_SECTION_SHORTCUTS = {"teacher.model": "teacher", "student.model": "student", "selection.mode": "selection"}


def recycle_params(args: argparse.Namespace) -> RecycleParams:
    """RecycleParams from a JSON file (optional), overlaid with the options given."""
    base = _params_file(args.params) if args.params else {}
    given = _config_values(args)
    if args.input:
        given["dataset"] = args.input
    if args.map:
        given["column_map"] = intake.parse_column_map(args.map)
    try:
        return RecycleParams.model_validate(_merge(base, given))
    except ValueError as exc:  # pydantic lists every problem at once
        raise ReflectuneError(f"invalid recycle parameters:\n{problems(exc)}") from None


def _params_file(uri: str) -> dict[str, Any]:
    import json

    try:
        base = json.loads(io.read_bytes(uri))
    except (FileNotFoundError, IsADirectoryError):
        raise ReflectuneError(f"--params {uri}: no such file: give a JSON file of flow parameters") from None
    except UnicodeDecodeError:
        raise ReflectuneError(f"--params {uri}: not UTF-8 text: save it as a UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise ReflectuneError(f"--params {uri}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}): "
                              "fix the file there") from None
    if not isinstance(base, dict):
        raise ReflectuneError(f"--params {uri}: the top level is a JSON {type(base).__name__}, expected an object "
                              "of flow parameters ({\"dataset\": ..., \"teacher\": {...}})")
    return base


def problems(exc: ValueError) -> str:
    """Every problem of a refused configuration, a line each, naming the setting: the values
    given are not repeated (one may hold a secret)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def _default(path: str) -> Any:
    """A setting's one default: the configuration's (`training.epochs`)."""
    return config_fields(RecycleParams)[path].get_default(call_default_factory=True)


def _config_options(parser: argparse.ArgumentParser, model: type[BaseModel], shortcuts: dict[str, str],
                    kebab: bool = False) -> Any:
    """Add an option for every field of `model` (nested models as dotted names), with the
    field's description as help, to `parser`; the returned source reads them back."""
    from pydantic_settings import CliSettingsSource

    return CliSettingsSource(model, root_parser=parser, cli_avoid_json=True, cli_implicit_flags=True,
                             cli_kebab_case=kebab, cli_shortcuts=shortcuts, cli_exit_on_error=False)


def _config(model: type[BaseModel], args: argparse.Namespace) -> Any:
    try:
        return model.model_validate(_config_values(args))
    except ValueError as exc:
        raise ReflectuneError(f"invalid options:\n{problems(exc)}") from None


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration fields given on the command line, nested as the model."""
    from pydantic_settings import SettingsError

    try:
        return args.config(parsed_args=args)()
    except SettingsError as exc:
        raise ReflectuneError(str(exc)) from None


def _merge(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in given.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _dotted(argv: list[str]) -> list[str]:
    """`selection.budget=0.05` as `--selection.budget=0.05`: the recycle command takes overrides
    in the form `key=value` too, where the key is a parameter's dotted name (a switch takes
    true or false: `training.enabled=false` is `--no-training.enabled`)."""
    if not argv or argv[0] != "recycle":
        return argv
    fields = config_fields(RecycleParams)
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in fields:
            out.append(arg)
        elif fields[key].annotation is bool and value.lower() in ("true", "false"):
            out.append(f"--{key}" if value.lower() == "true" else f"--no-{key}")
        else:
            out.append(f"--{arg}")
    return out
