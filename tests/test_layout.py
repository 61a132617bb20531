"""The layout's import rules, read from the import statements (those under `if TYPE_CHECKING:`
do not run and do not count) and followed through our own modules: the write side never imports
the read side, the model imports neither the reader nor DeepSpeed, Ray or MLflow; and setup.py
installs exactly what the code imports."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
OURS = ("data_shards", "trainer", "launch")


def source_of(module: str) -> Path | None:
    path = ROOT / module.replace(".", "/")
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def direct_imports(module: str) -> set[str]:
    names, todo = set(), [ast.parse(source_of(module).read_text())]
    while todo:
        for node in ast.iter_child_nodes(todo.pop()):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                continue
            todo.append(node)
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:  # `from a import b` may import module a.b
                names |= {node.module} | {
                    f"{node.module}.{a.name}" for a in node.names if source_of(f"{node.module}.{a.name}")
                }
    return names


def imported_by(module: str) -> set[str]:
    """Every module that importing `module` imports (a.b.c runs a and a.b first)."""
    seen, todo = set(), [module]
    while todo:
        parts = todo.pop().split(".")
        for current in (".".join(parts[:depth]) for depth in range(1, len(parts) + 1)):
            if current not in seen:
                seen.add(current)
                if parts[0] in OURS and source_of(current):
                    todo.extend(direct_imports(current))
    return seen - {module}


def _modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in ROOT.glob(f"{package}/**/*.py")
    )


@pytest.mark.parametrize("module", _modules("data_shards") + _modules("trainer"))
def test_dependencies_point_one_way(module):
    """launch -> trainer -> data_shards: data_shards imports neither, trainer never launch."""
    above = ("trainer", "launch") if module.startswith("data_shards") else ("launch",)
    assert not [m for m in imported_by(module) if m.split(".")[0] in above]


@pytest.mark.parametrize("module", sorted(f"data_shards.write.{p.stem}" for p in ROOT.glob("data_shards/write/*.py")))
def test_write_side_never_imports_the_read_side(module):
    assert not [m for m in imported_by(module) if m.startswith("data_shards.read")]


@pytest.mark.parametrize("module", ["trainer.model", "trainer.visual", "trainer.token_reduction"])
def test_model_imports_no_reader_and_no_distributed_or_tracking_library(module):
    imported = imported_by(module)
    assert not [m for m in imported if m.startswith("data_shards.read")]
    assert not {m.split(".")[0] for m in imported} & {"deepspeed", "ray", "mlflow"}


@pytest.mark.parametrize("module", ["data_shards.config", "trainer.config", "launch.config"])
def test_config_modules_are_leaves(module):
    """A config schema imports other schemas only, and the batch layout's rule (which the workers
    apply to a resumed layout too), never an implementation of ours."""
    ours = {m for m in imported_by(module) if m.split(".")[0] in OURS and "." in m}
    assert ours <= {"data_shards.config", "trainer.config", "trainer.layout", "data_shards.errors"}, sorted(ours)


def test_the_check_follows_imports_through_our_modules():
    """The rules above can fail: the stage runner reaches the reader and DeepSpeed through others."""
    assert {"data_shards.read.stream", "deepspeed", "trainer.token_reduction"} <= imported_by("trainer.stage")


def _names(requirements) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_setup_py_installs_exactly_the_libraries_the_code_imports():
    """`pip install .` alone runs every command; a test-only library is no install dependency."""
    setup = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if getattr(n, "keywords", None))
    required = _names(ast.literal_eval(next(k.value for k in setup.keywords if k.arg == "install_requires")))
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for pkg in OURS for p in ROOT.glob(f"{pkg}/**/*.py")]
    imported = {name.split(".")[0] for module in modules for name in direct_imports(module)}
    distributions = importlib.metadata.packages_distributions()  # mlflow: three of them
    dists_of = {name: _names(distributions[name]) for name in imported - set(OURS) - set(sys.stdlib_module_names)}
    missing = sorted(name for name, dists in dists_of.items() if not dists & required)
    unused = sorted(req for req in required if not any(req in dists for dists in dists_of.values()))
    assert not missing and not unused, f"imported but not required: {missing}; required but not imported: {unused}"
