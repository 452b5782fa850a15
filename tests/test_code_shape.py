"""The size rule of STYLE.md, checked: no production module over 500 lines and no function over 80 in
``src/comfyfleet``. The emulators stand in for whole outside services and may be larger (700 lines a module),
but they too are split along their own seams (routes, executor, nodes). A module or a function that grows
past its limit is split where its responsibilities part, never exempted here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "comfyfleet"
EMULATORS = SRC / "emulators"
MODULE_LINES = 500
EMULATOR_MODULE_LINES = 700
FUNCTION_LINES = 80

MODULES = sorted(SRC.rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(SRC.parent))


def _module_limit(path: Path) -> int:
    return EMULATOR_MODULE_LINES if path.is_relative_to(EMULATORS) else MODULE_LINES


def long_functions(source: str, limit: int) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than ``limit`` lines, decorators and
    docstring included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - first + 1
            if length > limit:
                found.append((node.name, first, length))
    return found


def test_the_rule_sees_the_whole_package() -> None:
    assert len(MODULES) > 100
    assert any(path.is_relative_to(EMULATORS) for path in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_module_is_too_long(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= _module_limit(path), f"{_name(path)} has {lines} lines (limit {_module_limit(path)})"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_function_is_too_long(path: Path) -> None:
    assert long_functions(path.read_text(), FUNCTION_LINES) == []


def test_a_long_function_is_caught_with_its_decorators() -> None:
    body = "\n".join(f"    x{n} = {n}" for n in range(FUNCTION_LINES - 2))
    source = f"@decorator\nasync def shy():\n{body}\n\nclass C:\n    def fine(self):\n        return 1\n"
    assert long_functions(source, FUNCTION_LINES) == []
    # Its decorator makes it one line longer than its def and body alone.
    assert long_functions(source, FUNCTION_LINES - 1) == [("shy", 1, FUNCTION_LINES)]
