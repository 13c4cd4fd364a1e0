"""The package's layers import one way: runtime <- passes <- the sas_compile API.

Every import of every module is read with ``ast`` (imports inside functions too): nothing
imports a higher layer, the module graph has no cycle, and no module imports another
module's private (``_name``) names.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sas_compile.runtime": ROOT / "runtime", "sas_compile.passes": ROOT / "passes",
            "sas_compile": ROOT / "sas_compile"}
RANK = {"runtime": 0, "passes": 1, "api": 2}


def module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        try:
            rel = path.relative_to(folder)
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join([package, *parts])
    raise AssertionError(path)


def modules() -> Dict[str, Path]:
    out = {}
    for folder in PACKAGES.values():
        for path in folder.rglob("*.py"):
            out[module_name(path)] = path
    return out


def layer(module: str) -> str:
    if module.startswith("sas_compile.runtime"):
        return "runtime"
    if module.startswith("sas_compile.passes"):
        return "passes"
    return "api"


def imports(name: str, path: Path, known: Set[str]) -> List[Tuple[str, List[str]]]:
    """(imported module, imported names) for every import statement, function bodies included."""
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            for n in names:  # `from package import module` imports the module
                if f"{target}.{n}" in known:
                    out.append((f"{target}.{n}", []))
            out.append((target, [n for n in names if f"{target}.{n}" not in known]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return [(t, n) for t, n in out if t.startswith("sas_compile")]


def graph():
    known = modules()
    edges: Dict[str, Set[str]] = {m: set() for m in known}
    private: List[str] = []
    for name, path in known.items():
        for target, names in imports(name, path, set(known)):
            if target != name and target in known:
                edges[name].add(target)
            bad = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if bad and target != name:
                private.append(f"{name} imports {', '.join(bad)} from {target}")
    return known, edges, private


def test_no_module_imports_a_higher_layer():
    _, edges, _ = graph()
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if RANK[layer(b)] > RANK[layer(a)])
    assert not upward, "imports against the layering (runtime <- passes <- sas_compile):\n" + "\n".join(upward)


def test_no_import_cycles():
    known, edges, _ = graph()
    # package __init__ files re-export lazily by name; a submodule importing its package is not a cycle
    edges = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in edges.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(known):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_cross_modules():
    _, _, private = graph()
    assert not private, "\n".join(private)


def test_the_check_sees_a_back_edge(tmp_path):
    """The walker itself: an upward import inside a function is found."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from sas_compile.api import sparsify\n    from . import _hidden\n")
    found = imports("sas_compile.runtime.probe", module, {"sas_compile.runtime._hidden"})
    assert ("sas_compile.api", ["sparsify"]) in found
    assert ("sas_compile.runtime._hidden", []) in found
