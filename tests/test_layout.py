"""The house rules, checked on the source: the signature contract, and a structure where each concept has one home.

- docs/SIGNATURES.md names exactly the ids of the signature table (autopsy.signatures);
- no import cycle between modules, and no import that runs back up: detectors and replay do not import each other,
  report does not import detectors or replay, nothing imports the package ``__init__`` from inside it, an importer
  module does not import the importers package that discovers it;
- no module over 450 lines and no function over 80 (a long function is a sign of two jobs in one place).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from autopsy.signatures import SIGNATURES
from helpers.paths import REPO

SRC = REPO / "src"
PKG = SRC / "autopsy"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The autopsy modules a module imports (at any depth of its code, lazy imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


# The one import that runs back up on purpose: a Report renders itself in a notebook (_repr_html_, plot, save, to_html)
# through autopsy.report, imported inside those methods only; the module findings itself never imports report.
UPWARD_IN_METHODS = {"autopsy.findings": {"autopsy.report", "autopsy.report.html", "autopsy.report.plots"}}


def _module_level_imports(path: Path) -> set[str]:
    """The modules imported when a module is imported: every import outside a function body."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # imports when called
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                out.update({child.module} | {f"{child.module}.{a.name}" for a in child.names})
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return out


GRAPH = {name: _imports(path) - UPWARD_IN_METHODS.get(name, set()) for name, path in MODULES.items()}


def test_the_upward_imports_are_inside_methods_only():
    for name, targets in UPWARD_IN_METHODS.items():
        assert not (_module_level_imports(MODULES[name]) & targets), name


def test_signatures_doc_names_every_id_of_the_table():
    doc = (REPO / "docs" / "SIGNATURES.md").read_text(encoding="utf-8")
    documented = set()
    for line in doc.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            documented |= set(re.findall(r"`([a-z_]+)`", first_cell))
    assert documented == set(SIGNATURES), (documented ^ set(SIGNATURES))


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if nxt.startswith(node + "."):
                continue  # a package's __init__ imports its own modules: that is not a cycle
            if state.get(nxt) == 1:
                cycle.extend([*stack, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*stack, node]):
                return True
        state[node] = 2
        return False

    for name in sorted(GRAPH):
        if state.get(name) is None and visit(name, []):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize(("a", "b"), [("autopsy.detectors", "autopsy.replay"), ("autopsy.replay", "autopsy.detectors"),
                                      ("autopsy.report", "autopsy.detectors"), ("autopsy.report", "autopsy.replay"),
                                      ("autopsy.importers", "autopsy.detectors"), ("autopsy.importers", "autopsy.report")])
def test_layers_do_not_import_each_other(a, b):
    offenders = [f"{m} -> {t}" for m, targets in GRAPH.items() if m == a or m.startswith(a + ".")
                 for t in targets if t == b or t.startswith(b + ".")]
    assert not offenders, offenders


def test_nothing_imports_a_package_init_from_inside_it():
    offenders = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                 if MODULES[t].name == "__init__.py" and m.startswith(t + ".")]
    assert not offenders, offenders


def test_module_and_function_sizes():
    long_modules = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    long_modules = {n: k for n, k in long_modules.items() if k > MAX_MODULE_LINES}
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} ({length} lines)")
    assert not long_modules and not long_functions, (long_modules, long_functions)
