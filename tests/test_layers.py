"""The shape of the code: layers, no import circles, and the task decided only in kd_core/tasks.

`make test` runs the import-linter contracts of pyproject.toml (`lint-imports`) before pytest;
these tests run the same contracts in-process (so a plain `pytest` checks them too), prove that
they catch an upward import, find circles between any two modules (imports inside functions
count), and scan the library for code that branches on which task a job is.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from kd_core.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kd_core", "components", "pipelines")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the contracts of `cwd`'s pyproject.toml, on the packages under `cwd`."""
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_layer_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_build(tmp_path):
    """The contracts are not vacuous: a library module that imports a stage fails them."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "compiled"))
    loop = copy / "kd_core" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _upward():\n    from kd_core.stages.distill import distill  # noqa: F401\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "kd_core.train is not allowed to import kd_core.stages" in result.stdout


def test_no_two_modules_import_each_other_even_indirectly():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    cycles = [component for component in _strongly_connected(graph) if len(component) > 1]
    assert cycles == [], f"import circles: {cycles}"


NOT_A_TASK: dict[str, str] = {}
"""Comparisons with a task's name that are about something else, by file."""


def test_no_module_outside_tasks_branches_on_the_task():
    """A comparison with a task's name (`== "reward"`, `in ("causal_lm", ...)`) anywhere in the
    library but kd_core/tasks is a branch on the task."""
    names = {task.name for task in TASKS}
    found = []
    for path in sorted((ROOT / "kd_core").rglob("*.py")):
        if path.is_relative_to(ROOT / "kd_core" / "tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and any(_names_in(side) & names for side in (node.left, *node.comparators)):
                if NOT_A_TASK.get(str(path.relative_to(ROOT))) != ast.unparse(node):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def _names_in(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {element.value for element in node.elts if isinstance(element, ast.Constant) and isinstance(element.value, str)}
    return set()


def _strongly_connected(graph) -> list[list[str]]:
    """Tarjan's strongly connected components of the module import graph."""
    order, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in order:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], order[imported])
        if low[module] == order[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in order:
            visit(module)
    return components


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_every_task_implements_the_protocol(task):
    """Each task overrides every method the base leaves abstract (a new task that forgets one
    fails here, not in the middle of a run)."""
    from kd_core.tasks.base import Task

    abstract = [name for name, member in vars(Task).items() if callable(member) and _raises_not_implemented(member)]
    missing = [name for name in abstract if getattr(type(task), name) is getattr(Task, name)]
    assert abstract and missing == []


def _raises_not_implemented(function) -> bool:
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0].body
    return any(isinstance(node, ast.Raise) and "NotImplementedError" in ast.unparse(node) for node in body)


def test_the_gates_know_every_metric_of_every_task():
    """`kd_core.gates.METRICS` (core: gates are parsed before any task is known) is the union of
    the tasks' metrics, so a new task's metric names cannot be forgotten there."""
    from kd_core.gates import MAXIMIZED, METRICS

    assert set(METRICS) == {metric for task in TASKS for metric in task.metrics}
    assert MAXIMIZED <= set(METRICS)
