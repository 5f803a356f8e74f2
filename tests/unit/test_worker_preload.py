"""The worker imports, before it drops to ``user``, every pyngora module that worker-side code
imports lazily (inside a function): after the drop, a checkout only root may read could not
be imported any more. ``server.worker._LAZY_OWN`` lists them per importing module; this keeps
the list in step with the code (a module moved, or a new lazy import, must be listed)."""
from __future__ import annotations

import ast
from pathlib import Path

from pyngora.server.worker import _LAZY_OWN

PKG = Path(__file__).resolve().parents[2] / "pyngora"
# Code that runs in the master, the CLI or before the worker's drop, not on a worker's path.
NOT_WORKER_SIDE = ("pyngora.cli", "pyngora.server.", "pyngora.upgrade.", "pyngora.config.")


def lazy_imports() -> dict[str, set[str]]:
    """{module: the pyngora modules it imports inside a function (outside TYPE_CHECKING)}."""
    found: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module.startswith(NOT_WORKER_SIDE):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyngora"):
                    names = {f"{node.module}.{a.name}" for a in node.names}
                    # "from pyngora.metrics import exporter" imports a module: name it.
                    target = {n for n in names if (PKG.parent / (n.replace(".", "/") + ".py")
                                                   ).exists()} or {node.module}
                    found.setdefault(module, set()).update(target)  # type: ignore[arg-type]
    return found


def test_every_lazy_import_of_worker_side_code_is_preloaded() -> None:
    missing = {m: sorted(t - set(_LAZY_OWN.get(m, ()))) for m, t in lazy_imports().items()}
    missing = {m: t for m, t in missing.items() if t}
    assert not missing, f"add to server.worker._LAZY_OWN: {missing}"


def test_the_list_names_only_modules_that_exist() -> None:
    for parent, children in _LAZY_OWN.items():
        for name in (parent, *children):
            base = PKG.parent / name.replace(".", "/")
            assert base.with_suffix(".py").exists() or (base / "__init__.py").exists(), name
