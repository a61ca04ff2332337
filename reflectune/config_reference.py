"""The configuration reference (docs/configuration.md), written from the config models: every
setting of a recycle run by its dotted name, with its type, default and description, as the
Prefect UI's form and `reflectune recycle --help` show them. `make docs` writes it; a test
fails when the file and the models disagree.

    python -m reflectune.config_reference > docs/configuration.md
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from reflectune.config import RecycleParams

HEADER = """# Configuration reference

Every setting of a recycle run, by the dotted name that `reflectune recycle` takes
(`selection.budget=0.05` or `--selection.budget 0.05`), the Prefect UI's form shows, and a
`--params FILE.json` nests (`{"selection": {"budget": 0.05}}`). Written from the config
models in `reflectune/config.py` by `make docs`; do not edit by hand.
"""


def markdown() -> str:
    """The reference as Markdown: the run's own settings, then one table per section."""
    parts = [HEADER]
    top = [(name, field) for name, field in RecycleParams.model_fields.items() if not _section(field)]
    parts.append(_table("The run", [(name, field) for name, field in top]))
    for name, field in RecycleParams.model_fields.items():
        model = _section(field)
        if model is not None:
            rows = [(f"{name}.{sub}", f) for sub, f in model.model_fields.items()]
            parts.append(_table(f"`{name}`: {field.description}", rows))
    return "\n".join(parts)


def _section(field: Any) -> type[BaseModel] | None:
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _table(title: str, rows: list[tuple[str, Any]]) -> str:
    lines = [f"## {title}", "", "| setting | type | default | meaning |", "|---|---|---|---|"]
    for name, field in rows:
        lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    if text.startswith("Literal["):
        return "one of " + text[len("Literal["):-1].replace("'", "`")
    return _cell(text)


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        value = field.default_factory() if field.default_factory is not None else None
    else:
        value = field.default
    if value is None:
        return "empty"
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


if __name__ == "__main__":
    sys.stdout.write(markdown())
