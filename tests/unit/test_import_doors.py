"""DESIGN.md's one-way doors, checked by parsing every module under pyngora/ with ``ast``.

Rooms that do not exist yet are simply not checked; a module that exists and breaks a door
fails, with every violation listed. A new top-level room must be placed in ROOMS below (and
in DESIGN.md) before it can exist.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "pyngora"

# Door 1: the floor. Leaves import only stdlib and third-party packages; anyone may import
# them. (`version` is a constant and counts as a leaf.)
LEAVES = (
    "pyngora.errors",
    "pyngora.headers",
    "pyngora.config.schema",
    "pyngora.config.model",
    "pyngora.config.fields",
    "pyngora.config.pem_store",
    "pyngora.pool",
    "pyngora.upgrade",
    "pyngora.metrics.multiproc",
    "pyngora.metrics.metric_defs",
    "pyngora.metrics.multiproc_format",
    "pyngora.version",
    "pyngora.log",
)
# A leaf kept in several files is still one leaf: its files may import one another, and
# nothing else of pyngora. (A leaf package, like `upgrade`, needs no entry: it is one name.)
LEAF_GROUPS = (
    ("pyngora.config.schema", "pyngora.config.model", "pyngora.config.fields"),
    ("pyngora.metrics.multiproc", "pyngora.metrics.metric_defs",
     "pyngora.metrics.multiproc_format"),
)

# Rooms and the rooms each may import (besides itself and the leaves), most specific first.
# Doors 2-5; where a room may import A and A may import B, importing B directly opens no door
# backwards, so it is listed too (lb -> upstreams -> protocols). `server` gets no such
# widening: the master stays small.
ROOMS: dict[str, tuple[str, ...]] = {
    "pyngora.protocols": (),
    "pyngora.upstreams": ("pyngora.protocols",),
    "pyngora.services": ("pyngora.protocols", "pyngora.config"),
    "pyngora.lb": ("pyngora.upstreams", "pyngora.services.base", "pyngora.protocols",
                   "pyngora.config"),
    "pyngora.proxy": ("pyngora.services", "pyngora.upstreams", "pyngora.protocols",
                      "pyngora.metrics.registry", "pyngora.config"),
    "pyngora.server": ("pyngora.services.base", "pyngora.config", "pyngora.upgrade",
                       "pyngora.metrics.multiproc", "pyngora.log", "pyngora.errors",
                       # stdlib-only counters a worker starts (never prometheus_client)
                       "pyngora.metrics.registry"),
    "pyngora.config": (),
    # the `prometheus` service type is a service: metrics may build on services (never the reverse)
    # ... and reads the shared health table (a file format) for pyngora_backend_healthy
    "pyngora.metrics": ("pyngora.services", "pyngora.protocols", "pyngora.config",
                        "pyngora.lb.health_table"),
}
# Door 6: the composition root and the public face import across rooms. Examples are user
# programs written against the public API.
FREE = ("pyngora.cli", "pyngora.__main__", "pyngora.examples")

# Door 2: the sans-IO protocol modules never touch an event loop.
SANS_IO = ("pyngora.protocols.h1", "pyngora.protocols.h2", "pyngora.protocols.h2_fields",
           "pyngora.protocols.events")
EVENT_LOOP = ("asyncio", "uvloop", "pyngora.protocols.transport")
# Door 5: what the master must not load at module level.
HEAVY = ("uvloop", "httptools", "h2", "prometheus_client")


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Import:
    target: str        # absolute module name (pyngora.x.y, or a stdlib/third-party name)
    line: int
    module_level: bool  # executed when the module is imported (not in a def, not TYPE_CHECKING)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def exists(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every import in the file (or in ``source`` as if it lived there), resolved to absolute
    names, with whether it runs when the module is imported."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    text = path.read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            level = module_level
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                level = False
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(alias.name, child.lineno, level))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    # `from pyngora.services import base` imports the submodule when it is one.
                    sub = f"{base}.{alias.name}"
                    target = sub if within(base, "pyngora") and exists(sub) else base
                    found.append(Import(target, child.lineno, level))
            if isinstance(child, ast.If) and is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, False)
                for stmt in child.orelse:
                    visit_stmt(stmt, level)
                continue
            visit(child, level)

    def visit_stmt(stmt: ast.stmt, module_level: bool) -> None:
        wrapper = ast.Module(body=[stmt], type_ignores=[])
        visit(wrapper, module_level)

    visit(tree, True)
    return found


def room_of(name: str) -> str | None:
    for prefix in sorted(ROOMS, key=len, reverse=True):
        if within(name, prefix):
            return prefix
    return None


def violations_of(path: Path) -> list[str]:
    name = module_name(path)
    where = path.relative_to(ROOT)
    if name == "pyngora" or any(within(name, f) for f in FREE):
        return []
    leaf = next((p for p in LEAVES if within(name, p)), None)
    room = room_of(name)
    if leaf is not None:
        allowed: tuple[str, ...] = next((g for g in LEAF_GROUPS if leaf in g), (leaf,))
        rule = "door 1: a leaf imports only stdlib, third-party packages and its own files"
    elif room is not None:
        allowed = (room, *ROOMS[room], *LEAVES)
        rule = f"doors 2-5: {room} may import only {', '.join(ROOMS[room]) or 'leaves'}"
    else:
        return [f"{where}: {name} is in no room; place it in DESIGN.md and in ROOMS"]
    out = []
    for imp in imports_of(path):
        if within(imp.target, "pyngora"):
            if not any(within(imp.target, a) for a in allowed):
                out.append(f"{where}:{imp.line}: imports {imp.target} ({rule})")
        if any(within(name, m) for m in SANS_IO) and any(within(imp.target, e) for e in EVENT_LOOP):
            out.append(f"{where}:{imp.line}: imports {imp.target} (door 2: sans-IO, no event loop)")
        if room == "pyngora.server" and imp.module_level and any(
                within(imp.target, h) for h in HEAVY):
            out.append(f"{where}:{imp.line}: imports {imp.target} at module level (door 5)")
    return out


MODULES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_keeps_the_doors(path: Path) -> None:
    problems = violations_of(path)
    assert not problems, "\n".join(problems)


def test_leaf_groups_hold_leaves() -> None:
    """Only leaves may share a group: a group never lets a room's module in through the floor."""
    assert all(name in LEAVES for group in LEAF_GROUPS for name in group)


def test_proxy_and_lb_never_import_each_other() -> None:
    problems = []
    for path in MODULES:
        name = module_name(path)
        for a, b in (("pyngora.proxy", "pyngora.lb"), ("pyngora.lb", "pyngora.proxy")):
            if within(name, a):
                problems += [f"{path.relative_to(ROOT)}:{i.line}: imports {i.target}"
                             for i in imports_of(path) if within(i.target, b)]
    assert not problems, "\n".join(problems)


def test_the_checker_resolves_imports() -> None:
    """Relative, submodule, guarded and function-level imports resolve as intended."""
    code = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from . import events\n"
        "from ..services import base\n"
        "from .. import nothing_here\n"
        "if TYPE_CHECKING:\n"
        "    import uvloop\n"
        "def f():\n"
        "    import asyncio\n"
    )
    found = {(i.target, i.module_level)
             for i in imports_of(PKG / "protocols" / "h1.py", source=code)}
    assert ("os", True) in found
    assert ("pyngora.protocols.events", True) in found or not exists("pyngora.protocols.events")
    assert ("pyngora.services.base", True) in found or not exists("pyngora.services.base")
    assert ("pyngora", True) in found           # a name from the package root, not a module
    assert ("uvloop", False) in found
    assert ("asyncio", False) in found


@pytest.mark.parametrize("module", ["pyngora.server.master", "pyngora.server.worker",
                                    "pyngora.server.server"])
def test_master_modules_load_nothing_heavy(module: str) -> None:
    """Door 5 at run time: importing the process room pulls in no event loop or parser."""
    if not exists(module):
        pytest.skip(f"{module} does not exist yet")
    code = (f"import sys, {module}\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing {module} loads {proc.stdout.strip()}"
