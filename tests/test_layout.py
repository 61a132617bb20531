"""The layout's import rules, read from the import statements and followed through the project's
own modules: the build side never imports the read side, and the model imports neither the
reader nor DeepSpeed, Ray or MLflow. Imports under `if TYPE_CHECKING:` do not run and do not
count. And setup.py installs what the code imports."""
import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("data_shards", "trainer", "launch")
MODEL = ("trainer.model", "trainer.visual", "trainer.token_reduction")


def source_of(module: str) -> Path | None:
    path = ROOT / module.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _runtime_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def direct_imports(module: str) -> set[str]:
    names = set()
    for node in _runtime_nodes(ast.parse(source_of(module).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            # `from package import module` imports that module too
            names |= {f"{node.module}.{a.name}" for a in node.names if source_of(f"{node.module}.{a.name}")}
    return names


def imported_by(module: str) -> set[str]:
    """Every module `module` imports when it is imported, through our modules (and their packages)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            current = ".".join(parts[:depth])
            if current in seen:
                continue
            seen.add(current)
            if current.split(".")[0] in OURS and source_of(current):
                todo.extend(direct_imports(current))
    return seen - {module}


def modules_under(package: str) -> list[str]:
    folder = ROOT / package.replace(".", "/")
    return sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", modules_under("data_shards.build"))
def test_build_side_never_imports_the_read_side(module):
    assert not {m for m in imported_by(module) if m.startswith("data_shards.read")}


@pytest.mark.parametrize("module", MODEL)
def test_model_imports_no_reader_and_no_distributed_or_tracking_library(module):
    imported = imported_by(module)
    assert not {m for m in imported if m.startswith("data_shards.read")}
    assert not {m.split(".")[0] for m in imported} & {"deepspeed", "ray", "mlflow"}


def test_the_check_follows_imports_through_our_modules():
    """The rules above can fail: the stage runner reaches the reader and DeepSpeed through others."""
    imported = imported_by("trainer.stage")
    assert "data_shards.read.stream" in imported and "deepspeed" in imported and "trainer.token_reduction" in imported
    assert "data_shards.read.stream" in imported_by("data_shards.config")


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_setup_py_installs_exactly_the_libraries_the_code_imports():
    """`pip install .` alone runs every command; a test-only library is no install dependency."""
    setup_call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                      if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    required = _requirement_names(ast.literal_eval(next(k.value for k in setup_call.keywords
                                                        if k.arg == "install_requires")))
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for package in OURS:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            imported |= {name.split(".")[0] for name in direct_imports(module)}
    third_party = imported - set(OURS) - set(sys.stdlib_module_names)
    dists_of = {name: _requirement_names(distributions[name]) for name in third_party}  # mlflow: 3 of them
    missing = sorted(name for name, dists in dists_of.items() if not dists & required)
    unused = sorted(req for req in required if not any(req in dists for dists in dists_of.values()))
    assert not missing and not unused, f"imported but not required: {missing}; required but not imported: {unused}"
