"""The package's layering rule (CONTRIBUTING.md), checked on the source: no import runs back up a layer,
no module grows past the size limit, no function past the length limit without a written reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_influence"

#: Layer of each top-level part, lowest first. A module may import its own layer and the ones below.
LAYERS = {
    "config": 0, "results": 0,
    "core": 1,
    "distributed": 2,
    "functional": 3,
    "analysis": 4,
    "reporting": 4,
    "callbacks": 5, "correct": 5, "cli": 5, "dashboard": 5,
}
#: Pairs on the same layer that must not meet: the writers never import the analysis, and vice versa.
FORBIDDEN = {("reporting", "analysis"), ("reporting", "functional"), ("reporting", "distributed"),
             ("analysis", "reporting")}
MAX_MODULE_LINES = 450
#: The aim (issue #24): every module under 400 lines. The ones still above it, each with its cap until it is split;
#: a module leaves this list when it gets under the aim, and a new one never joins it.
AIM_MODULE_LINES = 400
ABOVE_THE_AIM: dict[str, int] = {}
MAX_FUNCTION_LINES = 60
#: A function may be longer when a comment on its ``def`` line (or the line above) starts with this.
LONG_REASON = "# long:"


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_influence."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightning_influence."))
    return found


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_up_a_layer(path):
    own = _part(_module_name(path))
    if own == "__init__":  # the public facade re-exports from every layer
        return
    assert own in LAYERS, f"{path}: put the new top-level module into LAYERS (and CONTRIBUTING.md)"
    for imported in _imports(path):
        target = _part(imported)
        assert target in LAYERS, f"{path} imports {imported}: unknown part {target!r}"
        assert LAYERS[target] <= LAYERS[own], f"{path} ({own}) imports {imported} ({target}): an upward import"
        assert (own, target) not in FORBIDDEN, f"{path} ({own}) must not import {imported} ({target})"


def test_config_is_torch_free():
    for path in (PACKAGE / "config").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert "import torch" not in source and "from torch" not in source, path


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_short(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path} has {len(lines)} lines: split it along its concerns"
    name = path.relative_to(PACKAGE).as_posix()
    aim = ABOVE_THE_AIM.get(name, AIM_MODULE_LINES - 1)
    assert len(lines) <= aim, f"{path} has {len(lines)} lines, over the aim of {AIM_MODULE_LINES}: split it along its concerns"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            nearby = " ".join(lines[max(node.lineno - 2, 0): node.lineno])
            assert length <= MAX_FUNCTION_LINES or LONG_REASON in nearby, (
                f"{path}:{node.lineno} {node.name} has {length} lines: split it or write `{LONG_REASON} why`")


SOLVER_CONFIGS = {"LissaConfig", "CGConfig", "ExactConfig", "LowRankConfig"}
CURVATURE_NAMES = {"gauss_newton", "hessian"}


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_dispatch_on_solver_configs_or_curvature_names(path):
    """Solvers and curvatures are objects with a registry: code asks the object (``solver.split``,
    ``curvature.psd``), it never branches on which config class or curvature name it holds."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            found = _names(node.args[1]) & SOLVER_CONFIGS if len(node.args) == 2 else set()
            assert not found, f"{path}:{node.lineno} dispatches on {found}: ask the solver object instead"
        if isinstance(node, ast.Compare):
            constants = {c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)}
            found = constants & CURVATURE_NAMES
            assert not found, f"{path}:{node.lineno} compares a curvature name {found}: ask the curvature object"
