"""The library stays importable without an orchestrator: no module of `reflectune` imports
Prefect, the flows or the tasks when it is imported (the command line and the harness import
them inside the functions that need them). The layers themselves are import-linter's
contracts in pyproject.toml, checked by `make test`."""

import ast
from pathlib import Path

from .conftest import ROOT

ORCHESTRATION = ("prefect", "flows", "tasks")


def _module_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of the imports a module runs when it is imported: its top-level
    statements, and those inside top-level if/try blocks (TYPE_CHECKING blocks aside)."""
    found = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return found


def test_the_library_imports_no_orchestration_at_module_level():
    offending = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in sorted((ROOT / "reflectune").rglob("*.py"))
                 for line, module in _module_level_imports(path)
                 if module.split(".")[0] in ORCHESTRATION]
    assert not offending, offending


def test_the_check_sees_a_module_level_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\ntry:\n    from prefect import flow\nexcept ImportError:\n    pass\n\n"
                      "def f():\n    import tasks\n")
    assert _module_level_imports(module) == [(1, "os"), (3, "prefect")]
