"""The layers of dgaug, as data, and the check that imports only go down (ARCHITECTURE.md shows the
same table). Every import counts for the rules, those inside functions and under TYPE_CHECKING
too; the cycle check follows module-level imports only, the ones that run at import time."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

STAGE = "dgaug.stages.*"  # each stage package on its own: dgaug.stages.download, .edsam, ...


@dataclass(frozen=True)
class Layer:
    package: str
    job: str
    # None: any dgaug module not forbidden; a tuple: only these dgaug packages (and itself).
    only: tuple[str, ...] | None
    # Modules (with their submodules) it must not import; "dgaug.stages" in a stage's list means
    # every stage package but its own.
    forbidden: tuple[str, ...] = ()


# One row per package, top-down in ARCHITECTURE.md's order. The rules of issue 14.
LAYERS: tuple[Layer, ...] = (
    Layer(
        "dgaug.cli",
        "the typer app: parse, call dgaug.job, print; one place turns errors into exit codes",
        None,
    ),
    Layer(
        "dgaug.job",
        "the manifest with every section, the stage registry, the composition that runs a job",
        None,
        ("dgaug.cli",),
    ),
    Layer(
        "dgaug.pipeline",
        "stage contract, shard ledger, commit, lock, executors (local, ray); names no stage",
        None,
        ("dgaug.stages", "dgaug.trainer", "dgaug.cli", "dgaug.report", "dgaug.job"),
    ),
    Layer(
        STAGE,
        "one package per stage (download, edsam, features, ldfs): plain objects, no Ray",
        None,
        (
            "ray",
            "dgaug.pipeline.executors",
            "dgaug.stages",
            "dgaug.job",
            "dgaug.cli",
            "dgaug.report",
            "dgaug.trainer",
        ),
    ),
    Layer(
        "dgaug.trainer",
        "the lightweight trainer and evaluation; reads the shard formats only",
        None,
        ("dgaug.pipeline", "dgaug.stages", "dgaug.job", "dgaug.cli", "dgaug.report"),
    ),
    Layer(
        "dgaug.report",
        "the HTML report; reads outputs through storage and formats, gets the status from its caller",
        None,
        ("dgaug.pipeline", "dgaug.stages", "dgaug.job", "dgaug.cli", "dgaug.trainer"),
    ),
    Layer(
        "dgaug.models",
        "loading pretrained models (hub id or local path), presets, device and offline resolution, the toy models",
        ("dgaug.core",),
    ),
    Layer(
        "dgaug.sources",
        "where samples come from: url_list, image_folder, shards, synthetic (the demo's generator)",
        ("dgaug.core",),
    ),
    Layer(
        "dgaug.core",
        "the bottom: atomic writes, hashing and seeds, shard formats, storage, errors, constants",
        (),
    ),
)
# dgaug/__init__.py holds only the version; any module may read it, and it imports nothing.
ROOT = "dgaug"


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> tuple[Layer, str] | None:
    """The layer a module belongs to and the package it counts as its own (for a stage module,
    its stage package)."""
    for layer in LAYERS:
        if layer.package == STAGE:
            parts = module.split(".")
            if parts == ["dgaug", "stages"]:  # the folder of the stages: it imports none of them
                return layer, "dgaug.stages.__init__"
            if len(parts) >= 3 and parts[:2] == ["dgaug", "stages"]:
                return layer, ".".join(parts[:3])
        elif _within(module, layer.package):
            return layer, layer.package
    return None


def rule_text(layer: Layer) -> str:
    if layer.only == ():
        return f"{layer.package} imports nothing of dgaug"
    if layer.only is not None:
        return f"{layer.package} imports only {', '.join(layer.only)} of dgaug"
    names = [
        "another dgaug.stages.Y" if layer.package == STAGE and f == "dgaug.stages" else f
        for f in layer.forbidden
    ]
    return f"{layer.package} imports no {', '.join(names)}"


def may_import(layer: Layer) -> list[str]:
    """The dgaug packages a layer may import, as ARCHITECTURE.md lists them (markdown)."""
    if layer.only is not None:
        return [f"`{p}`" for p in layer.only]
    out = []
    for other in LAYERS:
        name = "dgaug.stages" if other.package == STAGE else other.package
        if other is layer or name in layer.forbidden:
            continue
        below = [f for f in layer.forbidden if f.startswith(name + ".")]
        out.append(f"`{name}`" + "".join(f" (not `{f}`)" for f in below))
    return out


def architecture_table() -> str:
    """The table ARCHITECTURE.md carries, rendered from LAYERS."""
    rows = [
        "| package | its job | may import (of dgaug) | must not import |",
        "| --- | --- | --- | --- |",
    ]
    for layer in LAYERS:
        may = ", ".join(may_import(layer)) or "nothing"
        if layer.only is not None:
            never = "anything else of dgaug" if layer.only else "anything of dgaug"
        else:
            never = (
                ", ".join(
                    "another `dgaug.stages.Y`"
                    if layer.package == STAGE and p == "dgaug.stages"
                    else f"`{p}`"
                    for p in layer.forbidden
                )
                or "(nothing: the top)"
            )
        rows.append(f"| `{layer.package}` | {layer.job} | {may} | {never} |")
    return "\n".join(rows)


# --- reading the imports ----------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # the module imported (a `from X import y` of a submodule y names X.y)
    line: int
    top_level: bool  # runs at import time: not inside a function, not under TYPE_CHECKING


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import in a module's source, relative ones resolved; `known` is the set of module
    names, to tell `from pkg import submodule` from `from pkg import name`."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def add(name: str, line: int, top: bool) -> None:
        found.append(Import(name, line, top))

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node.lineno, top)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            # importlib.import_module("x"): a rule counts it; it runs when called, not at import.
            add(node.args[0].value, node.lineno, False)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            top = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, top)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, top)

    visit(ast.parse(source), True)
    return found


def modules_under(root: Path, package: str = ROOT) -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is_package) of every .py file under root (the package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path.read_text(), is_package)
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, list[Import]]:
    known = set(sources)
    return {m: imports_of(src, m, pkg, known) for m, (src, pkg) in sources.items()}


# --- the checks -------------------------------------------------------------------------------


def violations(graph: dict[str, list[Import]]) -> list[str]:
    """One line per import that breaks a layer rule: importer, imported, rule."""
    problems: list[str] = []
    for module, imports in sorted(graph.items()):
        # `from x import a, b` is one import of x (when a and b are not modules).
        imports = list(dict.fromkeys(imports))
        if module == ROOT:
            problems += [
                f"{module} imports {i.module} (line {i.line}): rule: dgaug/__init__.py imports nothing of dgaug"
                for i in imports
                if _within(i.module, ROOT)
            ]
            continue
        placed = layer_of(module)
        if placed is None:
            problems.append(
                f"{module}: in no layer: add its package to LAYERS in tests/test_layers.py"
            )
            continue
        layer, own = placed
        for imp in imports:
            name = imp.module
            if _within(name, own) or name == ROOT:
                continue
            if layer.only is not None:
                bad = _within(name, ROOT) and not any(_within(name, p) for p in layer.only)
            else:
                bad = any(_within(name, f) for f in layer.forbidden)
            if bad:
                problems.append(
                    f"{module} imports {name} (line {imp.line}): rule: {rule_text(layer)}"
                )
    return problems


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The import cycles among dgaug modules (Tarjan's strongly connected components of the
    module-level import graph), each as its sorted module names."""
    edges = {
        m: sorted({i.module for i in imps if i.top_level and i.module in graph and i.module != m})
        for m, imps in graph.items()
    }
    self_loops = [
        [m] for m, imps in graph.items() if any(i.top_level and i.module == m for i in imps)
    ]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(found + self_loops)


def _cycle_path(graph: dict[str, list[Import]], component: list[str]) -> list[str]:
    """One import path around a cycle, from its first module back to it."""
    members = set(component)
    start = component[0]
    nexts = {
        m: sorted({i.module for i in graph[m] if i.top_level and i.module in members})
        for m in component
    }
    path, seen = [start], {start}
    while True:
        options = nexts[path[-1]]
        if start in options:
            return path
        step = next((m for m in options if m not in seen), None)
        if step is None:  # a dead end inside the component: back up
            path.pop()
            if not path:
                return component
            continue
        path.append(step)
        seen.add(step)


def _cycle_lines(graph: dict[str, list[Import]]) -> list[str]:
    lines = []
    for c in cycles(graph):
        path = _cycle_path(graph, c)
        lines.append(f"import cycle: {' -> '.join(path)} -> {path[0]}")
    return lines


# --- on the real tree -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dgaug_graph() -> dict[str, list[Import]]:
    return import_graph(modules_under(REPO / "dgaug"))


def test_every_import_goes_down_the_layers(dgaug_graph) -> None:
    problems = violations(dgaug_graph)
    assert not problems, "layer rules broken:\n" + "\n".join(problems)


def test_no_import_cycle_between_dgaug_modules(dgaug_graph) -> None:
    problems = _cycle_lines(dgaug_graph)
    assert not problems, "\n".join(problems)


def test_every_package_of_dgaug_has_a_row() -> None:
    packages = {
        f"dgaug.{p.name}" for p in (REPO / "dgaug").iterdir() if (p / "__init__.py").is_file()
    }
    packages |= {f"dgaug.{p.stem}" for p in (REPO / "dgaug").glob("*.py") if p.stem != "__init__"}
    rows = {"dgaug.stages" if layer.package == STAGE else layer.package for layer in LAYERS}
    assert packages <= rows, f"no row in LAYERS for {sorted(packages - rows)}"


def test_architecture_md_shows_the_same_rules() -> None:
    text = (REPO / "ARCHITECTURE.md").read_text()
    table = architecture_table()
    assert table in text, "ARCHITECTURE.md's table differs from LAYERS; it should read:\n" + table


# --- the checker fails on a deliberate violation ----------------------------------------------


def _graph(**modules: str) -> dict[str, list[Import]]:
    """A graph from sources keyed by module name with `__` for dots (and `__init` at the end of a
    package's name), e.g. dgaug__stages__edsam__stage."""
    sources = {}
    for key, src in modules.items():
        name = key.replace("__", ".")
        is_package = name.endswith(".init")
        sources[name.removesuffix(".init")] = (src, is_package)
    return import_graph(sources)


def _rule(package: str) -> str:
    return rule_text(next(layer for layer in LAYERS if layer.package == package))


def test_the_checker_names_importer_imported_and_rule() -> None:
    graph = _graph(
        dgaug__core__hashing="from dgaug.pipeline.stage import Plan\n",
        dgaug__pipeline__stage="",
        dgaug__pipeline__run="def f():\n    from dgaug.stages.edsam import stage\n",
        dgaug__stages__edsam__init="",
        dgaug__stages__edsam__stage=(
            "from typing import TYPE_CHECKING\n"
            "from . import config\n"
            "from ..download import merge\n"
            "if TYPE_CHECKING:\n"
            "    from dgaug.job.manifest import Manifest\n"
            "def setup():\n"
            "    import ray\n"
        ),
        dgaug__stages__edsam__config="from dgaug.pipeline import stage\n",
        dgaug__stages__download__merge="",
        dgaug__job__manifest="",
        dgaug__models__clip="import importlib\nimportlib.import_module('dgaug.sources.synthetic')\n",
        dgaug__sources__synthetic="import dgaug.core.hashing\n",
        dgaug__trainer__data="from dgaug.pipeline import stage\n",
        dgaug__report__build="from dgaug.pipeline.status import x\n",
        dgaug__job__run="from dgaug.cli import app\n",
        dgaug__cli__app="",
        dgaug__pipeline__status="",
    )
    got = violations(graph)
    assert got == [
        "dgaug.core.hashing imports dgaug.pipeline.stage (line 1): rule: "
        "dgaug.core imports nothing of dgaug",
        "dgaug.job.run imports dgaug.cli.app (line 1): rule: dgaug.job imports no dgaug.cli",
        "dgaug.models.clip imports dgaug.sources.synthetic (line 2): rule: "
        "dgaug.models imports only dgaug.core of dgaug",
        "dgaug.pipeline.run imports dgaug.stages.edsam.stage (line 2): rule: "
        + _rule("dgaug.pipeline"),
        "dgaug.report.build imports dgaug.pipeline.status (line 1): rule: " + _rule("dgaug.report"),
        "dgaug.stages.edsam.stage imports dgaug.stages.download.merge (line 3): rule: "
        + _rule(STAGE),
        "dgaug.stages.edsam.stage imports dgaug.job.manifest (line 5): rule: " + _rule(STAGE),
        "dgaug.stages.edsam.stage imports ray (line 7): rule: " + _rule(STAGE),
        "dgaug.trainer.data imports dgaug.pipeline.stage (line 1): rule: " + _rule("dgaug.trainer"),
    ]
    # A stage's own modules, the pipeline's stage contract and the bottom layer are fine.
    assert not any(g.startswith(("dgaug.stages.edsam.config", "dgaug.sources")) for g in got)


def test_the_checker_finds_a_cycle_in_a_package_on_disk(tmp_path: Path) -> None:
    pkg = tmp_path / "dgaug"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0"\n')
    (pkg / "core/__init__.py").write_text("")
    (pkg / "core/a.py").write_text("from dgaug.core import b\n")
    (pkg / "core/b.py").write_text("from . import c\n")
    (pkg / "core/c.py").write_text("import dgaug.core.a\n")
    # Not a cycle: d's import of a runs only when d's function is called.
    (pkg / "core/d.py").write_text("from dgaug.core import a\n")
    (pkg / "core/e.py").write_text("def f():\n    from dgaug.core import d\n")
    graph = import_graph(modules_under(pkg))
    assert cycles(graph) == [["dgaug.core.a", "dgaug.core.b", "dgaug.core.c"]]
    assert _cycle_lines(graph) == [
        "import cycle: dgaug.core.a -> dgaug.core.b -> dgaug.core.c -> dgaug.core.a"
    ]
    assert violations(graph) == []
    (pkg / "core/a.py").write_text("from dgaug.core import b\nfrom dgaug.models import clip\n")
    (pkg / "models").mkdir()
    (pkg / "models/__init__.py").write_text("")
    (pkg / "models/clip.py").write_text("")
    assert violations(import_graph(modules_under(pkg))) == [
        "dgaug.core.a imports dgaug.models.clip (line 2): rule: dgaug.core imports nothing of dgaug"
    ]


def test_the_architecture_table_is_rendered_from_the_rules() -> None:
    table = architecture_table()
    assert table.count("\n") == len(LAYERS) + 1
    stage_row = next(r for r in table.splitlines() if r.startswith(f"| `{STAGE}`"))
    assert "`dgaug.pipeline` (not `dgaug.pipeline.executors`)" in stage_row and "`ray`" in stage_row
    assert re.search(r"\| `dgaug.core` \|.*\| nothing \|", table)
