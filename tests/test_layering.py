"""The import graph of kardia_rl: no import cycle among its modules, and no module importing from a room above it.

Imports are read with `ast` from the source (nothing is imported), at module level and inside functions alike: a
function-level import only postpones a cycle to the first call, so both count; each violation says which it is.
Dynamic imports (importlib.import_module with a computed name) are not seen.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kardia_rl")

# Rooms from the bottom up. A module may import from its own room and from rooms in LOWER tiers only; rooms in
# the same tier are peers and do not import each other (e.g. the curriculum does not borrow evaluation's
# generation kit: both use a shared module below them).
TIERS: list[set[str]] = [
    {"errors", "utils"},
    {"config"},
    {"format"},                                  # span notation and prompt rendering
    {"data"},                                    # dialogues, samples, prompt/target encoding
    {"model"},                                   # model preparation (tokenizer with span tokens, tiny models)
    {"algo", "engines", "monitoring", "plan"},   # pure GRPO math; generation engines; logging; cluster planning
    {"rewards"},                                 # format/emotion rewards and judges (the vllm judge uses engines)
    {"learner"},                                 # DeepSpeed learner and SFT (emotion credit from rewards)
    {"cluster"},                                 # the Ray runtime of every stage: cluster start-up, rollout group,
                                                 # judge pool, learner group, weight sync, checkpoints, preemption
    {"trainer"},                                 # GRPO: the driver's step, its rollout and validation
    {"evaluation", "curriculum", "chat", "synth"},  # applications: eval, difficulty split (crossfit SFT via
                                                    # cluster), interactive chat, KardiaBench synthesis
    {"pipeline"},                                # the whole recipe
    {"cli"},                                     # the command line
]
# Top-level modules that belong to a room of another name.
ROOM_ALIASES = {"commands": "cli", "plan_estimate": "plan", "plan_placement": "plan"}


@dataclass(frozen=True)
class Edge:
    source: str       # importing module, dotted
    path: str         # its file, relative to the package's parent directory
    line: int
    target: str       # imported module, dotted (a package's __init__ when a name is not a submodule)
    in_function: bool

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "top-level"
        return f"{self.path}:{self.line} -> {self.target} ({where})"


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _is_module(root: str, dotted: str) -> bool:
    base = os.path.join(os.path.dirname(root), *dotted.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def _in_function(tree: ast.AST) -> dict[int, bool]:
    """id(import node) -> whether it sits inside a function body."""
    out: dict[int, bool] = {}

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out[id(child)] = inside
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def import_edges(root: str) -> list[Edge]:
    """Every import of a module of the package at `root` by a module of that package."""
    pkg = os.path.basename(os.path.normpath(root))
    edges = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            source = _module_name(root, path)
            package = source if name == "__init__.py" else source.rpartition(".")[0]
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            inside = _in_function(tree)
            rel = os.path.relpath(path, os.path.dirname(root))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(parts + ([node.module] if node.module else []))
                    # `from a.b import c` imports the submodule a.b.c when there is one, else a name of a.b
                    targets = [f"{base}.{a.name}" if _is_module(root, f"{base}.{a.name}") else base
                               for a in node.names]
                else:
                    continue
                for target in dict.fromkeys(targets):
                    if target == pkg or target.startswith(pkg + "."):
                        edges.append(Edge(source, rel, node.lineno, target, inside[id(node)]))
    return edges


def room_of(module: str) -> str:
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else ""
    return ROOM_ALIASES.get(room, room)


def tier_of(room: str) -> int:
    return next(i for i, rooms in enumerate(TIERS) if room in rooms)


def upward_imports(edges: list[Edge]) -> list[str]:
    out = []
    for e in edges:
        a, b = room_of(e.source), room_of(e.target)
        if a == b or "" in (a, b):
            continue
        ta, tb = tier_of(a), tier_of(b)
        if tb > ta:
            out.append(f"{e}: room '{a}' (tier {ta}) imports from room '{b}' above it (tier {tb})")
        elif tb == ta:
            out.append(f"{e}: room '{a}' imports from its peer room '{b}' (same tier {ta})")
    return out


def import_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """Each strongly connected set of modules (Tarjan), with the edges that run inside it; a module importing
    itself counts as well."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
        graph.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.target not in index:
                strongconnect(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in components:
        inner = [e for v in sorted(comp) for e in graph[v] if e.target in comp]
        if len(comp) > 1 or inner:
            cycles.append(inner)
    return cycles


def test_every_room_has_a_tier():
    rooms = {room_of(_module_name(PACKAGE_DIR, os.path.join(d, f))) for d, _, files in os.walk(PACKAGE_DIR)
             for f in files if f.endswith(".py")} - {""}
    placed = set().union(*TIERS)
    assert rooms <= placed, f"rooms without a place in TIERS (add them where they belong): {sorted(rooms - placed)}"


def test_no_module_imports_from_a_room_above_it():
    found = upward_imports(import_edges(PACKAGE_DIR))
    assert not found, "imports against the layering (tests/test_layering.py TIERS):\n" + "\n".join(found)


def test_no_import_cycle():
    cycles = import_cycles(import_edges(PACKAGE_DIR))
    text = "\n\n".join("cycle among " + ", ".join(sorted({e.source for e in c})) + ":\n  " +
                       "\n  ".join(str(e) for e in c) for c in cycles)
    assert not cycles, "import cycles:\n" + text


@pytest.fixture
def toy_package(tmp_path):
    """kardia_rl-shaped package with one cycle (data.a <-> data.b, one side in a function) and one upward
    import (config -> trainer)."""
    root = tmp_path / "kardia_rl"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "config/__init__.py": "from kardia_rl.errors import *\n",
        "config/schema.py": "def f():\n    from kardia_rl.trainer import driver\n",
        "data/__init__.py": "from .a import x\n",
        "data/a.py": "from kardia_rl.data import b\nx = 1\n",
        "data/b.py": "def g():\n    from . import a\n",
        "trainer/__init__.py": "",
        "trainer/driver.py": "import kardia_rl.config.schema\nfrom kardia_rl.data.a import x\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(root)


def test_the_checks_find_a_cycle_and_an_upward_import(toy_package):
    edges = import_edges(toy_package)
    up = upward_imports(edges)
    assert len(up) == 1 and up[0].startswith("kardia_rl/config/schema.py:2 -> kardia_rl.trainer.driver (in a "
                                             "function): room 'config' (tier 1)"), up
    cycles = import_cycles(edges)
    assert sorted(sorted(str(e) for e in c) for c in cycles) == [[
        "kardia_rl/config/schema.py:2 -> kardia_rl.trainer.driver (in a function)",
        "kardia_rl/trainer/driver.py:1 -> kardia_rl.config.schema (top-level)"], [
        "kardia_rl/data/a.py:1 -> kardia_rl.data.b (top-level)",
        "kardia_rl/data/b.py:2 -> kardia_rl.data.a (in a function)"]]
