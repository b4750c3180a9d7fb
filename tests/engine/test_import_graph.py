"""The package's import graph is a DAG (docs/architecture.md), read with ``ast`` from the sources.

Every import of a package module counts, at module level or inside a function: an import moved
into a function to dodge a cycle still closes the cycle here. ``kernels/`` (installed as
``pplfast.kernels``) imports nothing from the rest of the package, and the engine modules import
strictly downwards: public API -> ops -> dispatch -> backends -> shared helpers and kernels.
The cycle finder is tested on graphs with deliberate cycles, including a package written to a
temporary directory, so that the checks can fail.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"pplfast": ROOT / "pplfast", "pplfast.kernels": ROOT / "kernels"}
EXTENSIONS = {"pplfast._C", "pplfast._cuda_C"}  # compiled modules: leaves

# engine layers, lowest first; an import between two listed modules must go to a lower layer
LAYERS = [
    {"pplfast._env", "pplfast._C", "pplfast._cuda_C", "pplfast.kernels",
     "pplfast.kernels.token_nll", "pplfast.kernels.linear_token_nll"},
    {"pplfast._chunked", "pplfast._validate", "pplfast.reference", "pplfast._cpu_tiles"},
    {"pplfast._cpu", "pplfast._cuda", "pplfast._triton", "pplfast._reference_backend"},
    {"pplfast._cpu_slices"},
    {"pplfast._dispatch"},
    {"pplfast._ops"},
    {"pplfast.api"},
]


class Edge(NamedTuple):
    source: str
    target: str
    lazy: bool  # inside a function
    line: int
    names: tuple = ()  # the names a `from target import ...` takes (not submodules)


def module_files(packages: Dict[str, Path]) -> Dict[str, Path]:
    files = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _edges_of(name: str, path: Path, known: set, root: str) -> List[Edge]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []

    def add(target: str, lazy: bool, line: int, names: tuple = ()) -> None:
        edge = Edge(name, target, lazy, line, names)
        if target != name and (target == root or target.startswith(root + ".")) and edge not in edges:
            edges.append(edge)

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, inner, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - child.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    if full in known:
                        add(full, inner, child.lineno)
                    else:
                        add(base, inner, child.lineno, (alias.name,))
            elif (isinstance(child, ast.Constant) and isinstance(child.value, str)
                  and child.value in known and child.value != root):
                add(child.value, True, child.lineno)  # importlib.import_module("pplfast.x")
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return edges


def import_graph(packages: Dict[str, Path], root: str = "pplfast",
                 extensions=frozenset(EXTENSIONS)) -> Dict[str, List[Edge]]:
    files = module_files(packages)
    known = set(files) | set(extensions)
    return {name: _edges_of(name, path, known, root) for name, path in files.items()}


def find_cycle(graph: Dict[str, List[Edge]]) -> Optional[List[Edge]]:
    """One cycle as its list of edges, or None when the graph is a DAG."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[Edge] = []

    def dfs(node: str) -> Optional[List[Edge]]:
        state[node] = 1
        for edge in graph.get(node, []):
            if edge.target == node:
                return [edge]
            if state.get(edge.target) == 1:
                start = next(i for i, e in enumerate(path) if e.source == edge.target) \
                    if any(e.source == edge.target for e in path) else len(path)
                return path[start:] + [edge]
            if state.get(edge.target) is None:
                path.append(edge)
                found = dfs(edge.target)
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = dfs(node)
            if found:
                return found
    return None


def describe(cycle: List[Edge]) -> str:
    return " -> ".join(
        f"{e.source} (line {e.line}{', inside a function' if e.lazy else ''})" for e in cycle
    ) + f" -> {cycle[-1].target}"


GRAPH = import_graph(PACKAGES)


def test_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"import cycle: {describe(cycle)}"


def test_every_package_import_names_a_module_that_exists():
    known = set(GRAPH) | EXTENSIONS
    missing = [e for edges in GRAPH.values() for e in edges if e.target not in known]
    assert not missing, "imports of modules that do not exist: " + ", ".join(
        f"{e.source}:{e.line} -> {e.target}" for e in missing)


def test_kernels_import_nothing_from_the_rest_of_the_package():
    outside = [e for name, edges in GRAPH.items() if name.startswith("pplfast.kernels")
               for e in edges if not e.target.startswith("pplfast.kernels")]
    assert not outside, "kernels/ imports from pplfast: " + ", ".join(
        f"{e.source}:{e.line} -> {e.target}" for e in outside)


def test_engine_imports_go_down_the_layers():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = [e for edges in GRAPH.values() for e in edges
              if e.source in rank and e.target in rank and rank[e.target] >= rank[e.source]]
    assert not upward, "imports that do not go down the layers: " + ", ".join(
        f"{e.source}:{e.line} -> {e.target}" for e in upward)
    assert set(rank) - EXTENSIONS <= set(GRAPH), "a layer names a module that does not exist"


# ---- the wings above the engine (docs/architecture.md) --------------------
# cli -> serve / corpus -> models -> engine -> kernels and the compiled extensions. A module
# imports its own wing or a lower one, never a sibling (serve and corpus know nothing of each
# other), and from another wing (the engine included) only public names of public modules:
# no leading underscore in the module path or in the imported name. The package-wide helpers
# below are the only underscore modules every layer may use.

WING_RANKS = {"kernels": 0, "engine": 1, "models": 2, "corpus": 3, "serve": 3, "cli": 4,
              "top": 5}
SHIMS = {"pplfast.windows": "models", "pplfast.lm_eval": "models", "pplfast.ray": "corpus",
         "pplfast.__main__": "cli"}  # documented import paths kept as re-exports
SHARED_HELPERS = {"pplfast._optional", "pplfast._version", "pplfast._env", "pplfast._memprobe"}
# what the engine may take from below: the compiled extensions (named with an underscore, as
# compiled modules are) and the kernels' launchers
ENGINE_BELOW = EXTENSIONS


def wing(module: str) -> str:
    if module == "pplfast":
        return "top"
    if module in SHIMS:
        return SHIMS[module]
    parts = module.split(".")
    if parts[1] in ("kernels", "_C", "_cuda_C"):
        return "kernels"
    return parts[1] if parts[1] in ("models", "corpus", "serve", "cli") else "engine"


def _private(module: str, names=()) -> bool:
    return (module not in SHARED_HELPERS | ENGINE_BELOW
            and any(part.startswith("_") and part != "__init__" for part in module.split(".")[1:])
            or any(n.startswith("_") and not n.endswith("__") for n in names))


def wing_violations(graph) -> List[str]:
    out = []
    for edges in graph.values():
        for e in edges:
            a, b = wing(e.source), wing(e.target)
            where = f"{e.source}:{e.line} -> {e.target}"
            if a == b:
                continue
            if WING_RANKS[b] > WING_RANKS[a] or (WING_RANKS[b] == WING_RANKS[a] and a != "top"):
                out.append(f"{where} (wing {a} imports wing {b})")
            elif a != "top" and _private(e.target, e.names):
                out.append(f"{where} {list(e.names) or ''} (a private name of wing {b})")
    return out


def command_imports(graph) -> List[str]:
    """Imports of one command by another (pplfast.cli.<command>[.*])."""
    def command(module):
        parts = module.split(".")
        if len(parts) > 2 and parts[1] == "cli" and parts[2] not in ("main", "_common"):
            return parts[2]
        return None

    return [f"{e.source}:{e.line} -> {e.target}" for edges in graph.values() for e in edges
            if command(e.source) and command(e.target) and command(e.source) != command(e.target)]


def test_wings_import_downwards_and_only_public_names():
    bad = wing_violations(GRAPH)
    assert not bad, "imports across the wings:\n" + "\n".join(bad)


def test_no_command_imports_another_command():
    bad = command_imports(GRAPH)
    assert not bad, "a command imports another command: " + ", ".join(bad)


def test_the_wings_exist():
    assert {wing(m) for m in GRAPH} >= {"kernels", "engine", "models", "corpus", "serve", "cli"}


def test_wing_rules_can_fail():
    graph = {
        "pplfast.models.score": [Edge("pplfast.models.score", "pplfast.cli.main", False, 3)],
        "pplfast.cli.score": [Edge("pplfast.cli.score", "pplfast.models.head", False, 4, ("_probe",)),
                              Edge("pplfast.cli.score", "pplfast._dispatch", False, 5, ("resolve",)),
                              Edge("pplfast.cli.score", "pplfast._optional", False, 6, ("require",)),
                              Edge("pplfast.cli.score", "pplfast.cli.compare", False, 7)],
        "pplfast.serve.app": [Edge("pplfast.serve.app", "pplfast.corpus.io", False, 8)],
    }
    bad = wing_violations(graph)
    assert len(bad) == 4 and not any("_optional" in b for b in bad), bad
    assert command_imports(graph) == ["pplfast.cli.score:7 -> pplfast.cli.compare"]


# ---- the checks can fail ------------------------------------------------------------------


def graph_of(edges: Dict[str, List[str]]) -> Dict[str, List[Edge]]:
    return {s: [Edge(s, t, False, 1) for t in ts] for s, ts in edges.items()}


@pytest.mark.parametrize("edges,cyclic", [
    ({"a": ["b"], "b": ["c"], "c": []}, False),
    ({"a": ["b", "c"], "b": ["c"], "c": []}, False),  # a diamond is no cycle
    ({"a": ["a"]}, True),
    ({"a": ["b"], "b": ["a"]}, True),
    ({"x": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}, True),
], ids=["chain", "diamond", "self", "two", "three-behind-an-entry"])
def test_find_cycle(edges, cyclic):
    cycle = find_cycle(graph_of(edges))
    assert (cycle is not None) == cyclic
    if cycle:
        assert cycle[-1].target == cycle[0].source  # a closed path
        assert all(a.target == b.source for a, b in zip(cycle, cycle[1:]))


def test_a_lazy_import_that_dodges_a_cycle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "backend.py").write_text(textwrap.dedent("""
        def run():
            from .loop import chunked  # the dodge
            return chunked()
    """))
    (pkg / "loop.py").write_text("from . import backend\n\ndef chunked():\n    return backend\n")
    (pkg / "kern.py").write_text("def f():\n    import pkg.loop\n")
    graph = import_graph({"pkg": pkg}, root="pkg", extensions=frozenset())
    cycle = find_cycle(graph)
    assert cycle is not None and {e.source for e in cycle} == {"pkg.backend", "pkg.loop"}
    assert any(e.lazy for e in cycle) and "inside a function" in describe(cycle)
    assert Edge("pkg.kern", "pkg.loop", True, 2) in graph["pkg.kern"]


# ---- a checkout's root on sys.path --------------------------------------------------------


def _run_in_checkout(*args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_checkout_root_does_not_shadow_an_installed_kernels_distribution():
    # `python -m pytest` or `python -m pplfast` in the checkout puts its root first on sys.path,
    # where kernels/ (the source of pplfast.kernels) would hide the unrelated `kernels`
    # distribution that transformers imports (CI failed on exactly this)
    import importlib.metadata
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed here")
    run = _run_in_checkout("-c", "import kernels, pplfast.kernels.token_nll as t\n"
                                 "print(kernels.__file__); print(t.__file__)")
    assert run.returncode == 0, run.stderr
    theirs, ours = (Path(line) for line in run.stdout.split())
    assert theirs.parent != ROOT / "kernels", theirs  # a virtualenv may live in the checkout
    assert ours.name == "token_nll.py"


def test_checkout_root_without_a_kernels_distribution_fails_as_if_absent():
    # -S: no site-packages, so no `kernels` distribution; the folder must not pass for one
    run = _run_in_checkout("-S", "-c", "import sys\ntry:\n    import kernels\n"
                                       "except ModuleNotFoundError as e:\n"
                                       "    print(e.name, 'kernels' in sys.modules)\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["kernels", "False"]


def test_transformers_models_import_from_the_checkout_root():
    pytest.importorskip("transformers")
    run = _run_in_checkout("-c", "import transformers; transformers.LlamaForCausalLM")
    assert run.returncode == 0, run.stderr[-2000:]
