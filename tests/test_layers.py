"""The library stays importable without an orchestrator: no module of `reflectune` imports
Prefect, the flows or the tasks when it is imported (the command line and reflectune.testing
import them inside the functions that need them). The layers themselves are import-linter's
contracts in pyproject.toml, checked by `make test` on the package as it installs.

flows/ and tasks/ are folders of the repository installed as `reflectune.flows` and
`reflectune.tasks`: nothing imports them by their folder's name, which works only from the
repository's root."""

import ast
from pathlib import Path

from .conftest import ROOT

ORCHESTRATION = ("prefect", "reflectune.flows", "reflectune.tasks")


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
                 if any(module == o or module.startswith(o + ".") for o in ORCHESTRATION)]
    assert not offending, offending


def test_the_check_sees_a_module_level_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\ntry:\n    from prefect import flow\nexcept ImportError:\n    pass\n\n"
                      "def f():\n    import tasks\n")
    assert _module_level_imports(module) == [(1, "os"), (3, "prefect")]


def _every_import(path: Path) -> list[tuple[int, str]]:
    return [(node.lineno, alias.name if isinstance(node, ast.Import) else node.module)
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0
            for alias in (node.names if isinstance(node, ast.Import) else [node])]


def test_flows_and_tasks_install_inside_the_package():
    from importlib.metadata import distribution
    from importlib.util import find_spec

    assert distribution("reflectune").read_text("top_level.txt").split() == ["reflectune"]
    assert find_spec("reflectune.flows").submodule_search_locations == [str(ROOT / "flows")]
    assert find_spec("reflectune.tasks").submodule_search_locations == [str(ROOT / "tasks")]
    offending = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for folder in ("reflectune", "flows", "tasks", "tests", "benchmarks", "examples")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 for line, module in _every_import(path)
                 if module and module.split(".")[0] in ("flows", "tasks")]
    assert not offending, offending


def test_the_folder_name_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from . import x\n\ndef f():\n    import tasks.shards\n    from flows.recycle import recycle\n")
    assert _every_import(module) == [(4, "tasks.shards"), (5, "flows.recycle")]


# what the engines may import of the library: the engine-level modules, nothing of the pipeline
# or its configuration (an allow-list: a new pipeline module is kept out without being named)
ENGINE_LEVEL = {"reflectune.errors", "reflectune.formats", "reflectune.models", "reflectune.progress",
                "reflectune.reflection", "reflectune.scoring", "reflectune.secrets"}


def _library_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every reflectune module a file imports, anywhere in it: `from
    reflectune import models` names reflectune.models."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("reflectune")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "reflectune":
            found += [(node.lineno, f"reflectune.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("reflectune."):
            found.append((node.lineno, node.module))
    return found


def test_the_engines_import_only_the_engine_level_modules():
    offending = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in sorted((ROOT / "reflectune" / "engines").rglob("*.py"))
                 for line, module in _library_imports(path)
                 if module not in ENGINE_LEVEL and not module.startswith("reflectune.engines")]
    assert not offending, offending


def test_the_allow_list_sees_every_way_of_importing(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from reflectune import models, stages\nimport reflectune.config\n\n"
                      "def f():\n    from reflectune.journal import Budget\n")
    assert _library_imports(module) == [(1, "reflectune.models"), (1, "reflectune.stages"),
                                        (2, "reflectune.config"), (5, "reflectune.journal")]
