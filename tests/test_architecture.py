"""The package map holds: imports point one way, and no command's module imports another command's module.

ARCHITECTURE.md draws the same map; this test is what keeps it true.
"""

import ast
from pathlib import Path

import pytest

import pneumoscope

PACKAGE = Path(pneumoscope.__file__).parent

# Lower ranks are imported by higher ones, never the other way. Modules of one package import each other freely.
RANKS = {
    "errors": 0,
    "outputs": 1,
    "runtime": 1,
    "choices": 1,
    "data": 2,
    "metrics": 2,
    "plots": 2,
    "models": 3,
    "inference": 4,
    "explain": 5,
    "api": 6,
    "training": 7,
    "adaptation": 8,
    "evaluation": 9,
    "serving": 10,
    "cli": 11,
    "__main__": 12,
}

# The modules that implement a command (what the CLI calls): none imports another.
COMMANDS = {
    "data.pack",
    "training.pipeline",
    "evaluation.evaluate",
    "evaluation.compare",
    "adaptation.adapt",
    "adaptation.calibrate",
    "explain.command",
    "inference.export",
    "inference.stream",
    "serving.app",
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def _imports(module: str, path: Path):
    """(imported module, line) for each import of this package's modules, absolute names below `pneumoscope`."""
    here = module.split(".") if path.name != "__init__.py" else [*module.split("."), "__init__"]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:  # `from . import x` may name a module
                name = [*target, alias.name]
                yield (
                    ".".join(
                        name if (PACKAGE.joinpath(*name).with_suffix(".py").is_file() or PACKAGE.joinpath(*name).is_dir()) else target
                    ),
                    node.lineno,
                )
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.startswith("pneumoscope."):
                    yield name.removeprefix("pneumoscope."), node.lineno


MODULES = dict(_modules())


def test_every_module_has_a_rank():
    tops = {m.split(".")[0] for m in MODULES if m}
    assert tops <= set(RANKS), f"add {sorted(tops - set(RANKS))} to RANKS (and to ARCHITECTURE.md)"
    assert set(MODULES) >= COMMANDS, sorted(COMMANDS - set(MODULES))


@pytest.mark.parametrize("module", [m for m in MODULES if m])  # the package's own __init__ loads the API lazily: exempt
def test_imports_point_down(module):
    top, wrong = module.split(".")[0], []
    for target, line in _imports(module, MODULES[module]):
        other = target.split(".")[0]
        if other and other != top and RANKS[other] >= RANKS[top]:
            wrong.append(f"line {line}: {target} ({other} is rank {RANKS[other]}, {top} is rank {RANKS[top]})")
    assert not wrong, wrong


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_no_command_imports_another(module):
    wrong = [f"line {line}: {t}" for t, line in _imports(module, MODULES[module]) if t in COMMANDS and t != module]
    assert not wrong, wrong


def test_the_rule_sees_a_wrong_import(tmp_path, monkeypatch):
    """The check itself: an upward import in a module is found."""
    bad = tmp_path / "m.py"
    bad.write_text("from ..cli.main import main\nfrom ..data import layouts\n")
    assert list(_imports("data.m", bad)) == [("cli.main", 1), ("data.layouts", 2)]


MAX_FUNCTION_LINES = 60


def _functions(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_no_function_is_over_60_lines():
    """Every function (nested ones and methods too), from its `def` to its last line, fits in 60 lines."""
    long = [
        f"{module}.{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for module, path in MODULES.items()
        for node in _functions(ast.parse(path.read_text()))
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def _public(tree: ast.Module):
    """(qualified name, node) of each public function and class at module level and each public method of a public class."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and not member.name.startswith("_"):
                        yield f"{node.name}.{member.name}", member


def test_every_public_function_and_class_has_a_docstring():
    missing = [
        f"{module}.{name} (line {node.lineno})"
        for module, path in MODULES.items()
        for name, node in _public(ast.parse(path.read_text()))
        if not ast.get_docstring(node)
    ]
    assert not missing, missing
