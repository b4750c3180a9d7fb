"""How ``kernels/`` (installed as ``pplfast.kernels``) is put together, read with ``ast``.

- it imports nothing from the rest of the package and reads no environment: the launchers take
  the switches and the SM count as arguments (``pplfast._triton`` reads them);
- a kernel file (one op: ``token_nll.py``, ``compare.py``, ...) imports no other kernel file,
  only the shared modules: ``_common`` (math and constants), ``_plan`` (launch plans), ``_tiles``
  (the fused kernels' tiles) and ``partials`` (the records' layout);
- each constant is defined once: the numbers of ``LOG2E``, the no-index sentinel and the
  interpreter's SM count appear in one module only.

Each rule is also run on a small source that breaks it, so that it can fail.
"""
from __future__ import annotations

import ast
import pathlib

import pplfast.kernels

FOLDER = pathlib.Path(pplfast.kernels.__file__).parent
SHARED = {"_common", "_plan", "_tiles", "partials"}
ALLOWED = {"__future__", "contextlib", "functools", "typing", "torch", "triton",
           "triton.language"}
# the package's __init__ hands a top-level `kernels` import over to the unrelated distribution
INIT_ALLOWED = {"importlib.machinery", "importlib.util", "pathlib", "sys"}
# constant -> the module that defines it, and how its value is written
CONSTANTS = {"LOG2E": ("_common", ("1.4426950408889634",)),
             "NO_INDEX": ("_common", ("2**31 - 1", "2147483647", "2**62")),
             "INTERPRETER_SM_COUNT": ("_plan", ("INTERPRETER_SM_COUNT =",)),
             "FUSED_INTERPRETER_SM_COUNT": ("_plan", ("FUSED_INTERPRETER_SM_COUNT =",))}


def imports_of(source: str) -> list:
    """Every module a source imports (relative ones with their dots)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def import_problems(name: str, source: str) -> list:
    problems = []
    allowed = ALLOWED | (INIT_ALLOWED if name == "__init__" else set())
    for module in imports_of(source):
        if module.startswith(".") and module.lstrip(".") in SHARED and module.count(".") == 1:
            continue
        if module.startswith(("pplfast", "os", "..")) or module.startswith("."):
            problems.append(f"{name} imports {module}")
        elif module not in allowed:
            problems.append(f"{name} imports {module}")
    return problems


def constant_problems(sources: dict) -> list:
    problems = []
    for constant, (home, spellings) in CONSTANTS.items():
        for name, source in sources.items():
            if name == home:
                continue
            for spelling in spellings:
                if spelling in source:
                    problems.append(f"{name} writes {constant} ({spelling}) again")
    return problems


def sources() -> dict:
    return {path.stem: path.read_text() for path in sorted(FOLDER.glob("*.py"))}


def test_kernels_import_only_the_shared_modules_and_nothing_of_the_package():
    found = sources()
    assert {"_common", "_plan", "_tiles", "partials", "token_nll", "token_stats", "compare",
            "linear_token_nll", "linear_token_stats"} <= set(found)
    problems = [p for name, source in found.items() for p in import_problems(name, source)]
    assert not problems, problems


def test_each_constant_is_defined_once():
    assert not constant_problems(sources())


def test_the_rules_can_fail():
    assert import_problems("compare", "from .token_nll import plan\n") == [
        "compare imports .token_nll"]
    assert import_problems("compare", "from ._plan import plan\nimport triton\n") == []
    assert import_problems("token_nll", "import os\n") == ["token_nll imports os"]
    assert import_problems("token_nll", "from pplfast import _env\n") == [
        "token_nll imports pplfast"]
    assert import_problems("token_nll", "from .. import _env\n") == ["token_nll imports .."]
    assert constant_problems({"compare": "_LOG2E = 1.4426950408889634\n",
                              "_common": "LOG2E = tl.constexpr(1.4426950408889634)\n"}) == [
        "compare writes LOG2E (1.4426950408889634) again"]
    assert constant_problems({"linear_token_nll": "    sm_count = INTERPRETER_SM_COUNT\n"}) == []
