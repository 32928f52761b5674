"""The package's shape (STYLE.md): imports only go down, no circles, no function-local or private imports.

Fast (no QEMU): these run first and fail when a change breaks the layered layout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

from orchestrator.settings import SOURCE_ROOT

PACKAGE = SOURCE_ROOT / "orchestrator"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SOURCE_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (``from ..x import y`` in ``a.b.c`` is ``a.x``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    drop = node.level - 1 if is_package else node.level
    base = base[: len(base) - drop]
    return ".".join(base + ([node.module] if node.module else []))


def test_import_linter_layers_contract_is_kept() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(exe), "--no-cache"], cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_no_import_circle_between_modules() -> None:
    graph = grimp.build_graph("orchestrator", cache_dir=None)
    mods = sorted(graph.modules)
    # a package's __init__ importing its own submodules is how a package exposes its API, not a circle
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if not m.startswith(d + ".")
                 and not d.startswith(m + ".")} for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in mods:
        if m not in index:
            visit(m)
    assert not circles, f"import circles: {circles}"


def test_no_function_local_imports_of_the_package() -> None:
    found = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    target = resolve(name, node, path.name == "__init__.py")
                    if target.startswith("orchestrator"):
                        found.append(f"{path.relative_to(SOURCE_ROOT)}:{node.lineno} imports {target}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("orchestrator") for a in node.names):
                    found.append(f"{path.relative_to(SOURCE_ROOT)}:{node.lineno}")
    assert not found, "function-local imports (move them to the top, or the code to a lower layer): " + "; ".join(found)


def test_no_private_name_is_used_across_files() -> None:
    """``from x import _name`` and ``module._name`` from another file: make it public or move it."""
    found = []
    all_modules = modules()
    for name, path in all_modules.items():
        tree = ast.parse(path.read_text())
        module_aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, node, path.name == "__init__.py")
                if not target.startswith("orchestrator"):
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path.relative_to(SOURCE_ROOT)}:{node.lineno} imports {target}.{a.name}")
                    if f"{target}.{a.name}" in all_modules:
                        module_aliases.add(a.asname or a.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(SOURCE_ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "; ".join(found)


def test_only_host_libvirt_imports_libvirt() -> None:
    users = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] in ("libvirt", "libvirt_qemu") for n in names):
                users.append(name)
    assert sorted(set(users)) == ["orchestrator.host.libvirt"], users
