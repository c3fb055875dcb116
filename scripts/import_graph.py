#!/usr/bin/env python3
"""The package's import graph, read with ``ast`` (nothing is imported): module cycles,
private names imported across modules, and core modules that import host or device.

    python scripts/import_graph.py            # the three counts and every violation
    python scripts/import_graph.py --json     # the same as one JSON object

Modules are the files under ``toma_edge/`` (the core), ``host/`` (``toma_edge.host``) and
``device/`` (``toma_edge.device``). An import under ``if TYPE_CHECKING:`` does not run, so it
is listed apart (``type_checking_edges``) and left out of cycles and layer edges; a private
name imported under it still counts. The layer rule (docs/architecture.md): host -> core <-
device, and the CLI (``toma_edge.cli``) on top of all three; the core imports neither host nor
device, host and device never import each other. Exit status 1 when any count is not 0.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = {"toma_edge": ROOT / "toma_edge", "toma_edge.host": ROOT / "host",
         "toma_edge.device": ROOT / "device"}
SKIP_PARTS = {"__pycache__", "native", "build", "dashboard_static", "mosquitto", "migrations"}


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)  # runtime imports
    type_checking_edges: set[tuple[str, str]] = field(default_factory=set)
    private_imports: list[str] = field(default_factory=list)


def module_files(trees: dict[str, Path] | None = None) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the three trees (package -> folder)."""
    out: dict[str, Path] = {}
    for pkg, root in (trees or TREES).items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIP_PARTS & set(rel.parts[:-1]) or (pkg == "toma_edge" and rel.parts[0] in
                                                   ("host", "device", "firmware_configs")):
                continue
            parts = [pkg, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def layer(module: str) -> str:
    """``cli``, ``core``, ``host`` or ``device``. The CLI is the application on top: it may
    import every layer (inside its commands), and nothing imports it."""
    if module in ("toma_edge.cli", "toma_edge.cli_fleet") or module.startswith("toma_edge.cli."):
        return "cli"
    for name in ("host", "device"):
        if module == f"toma_edge.{name}" or module.startswith(f"toma_edge.{name}."):
            return name
    return "core"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it sits under ``if TYPE_CHECKING:``."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def walk(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, guarded))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for n in child.body:
                    walk_one(n, True)
                for n in child.orelse:
                    walk_one(n, guarded)
            else:
                walk(child, guarded)

    def walk_one(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, guarded))
        else:
            walk(node, guarded)

    walk(tree, False)
    return found


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(trees: dict[str, Path] | None = None) -> Graph:
    """The graph of the package's modules (or of ``trees``: package name -> folder)."""
    g = Graph(modules=module_files(trees))
    known = set(g.modules)

    def target(name: str) -> str | None:
        """The known module ``name`` is, or the nearest known package above it."""
        while name:
            if name in known:
                return name
            name = name.rpartition(".")[0]
        return None

    for mod, path in g.modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, guarded in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _resolve(mod, is_pkg, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in known:  # `from . import x`: the submodule x
                        targets.append(sub)
                        continue
                    targets.append(base)
                    if (a.name.startswith("_") and not a.name.startswith("__")
                            and target(base) is not None and target(base) != mod):
                        g.private_imports.append(
                            f"{mod} imports {a.name} from {target(base)}"
                            f" ({_shown(path)}:{node.lineno})")
            for t in targets:
                dst = target(t)
                if dst is None or dst == mod:
                    continue
                if guarded:
                    g.type_checking_edges.add((mod, dst))
                else:
                    g.edges.setdefault(mod, set()).add(dst)
    return g


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted.

    A package's ``__init__`` importing its own submodules (and they importing the package
    for a sibling) is how packages work; edges from a module to a package that contains it
    are left out."""
    def keep(a: str, b: str) -> bool:
        return not a.startswith(b + ".")

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if not keep(v, w):
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return sorted(out)


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Core -> host/device/cli and device -> host/cli edges. The host may import the
    device runtime (a build loads and measures its program with it; listed apart by
    :func:`host_device_edges`)."""
    allowed = {"cli": {"cli", "core", "host", "device"}, "core": {"core"},
               "host": {"host", "core", "device"}, "device": {"device", "core"}}
    bad = []
    for src in sorted(edges):
        for dst in sorted(edges[src]):
            a, b = layer(src), layer(dst)
            if b not in allowed[a]:
                bad.append(f"{src} -> {dst}")
    return bad


def host_device_edges(edges: dict[str, set[str]]) -> list[str]:
    """Host -> device edges (allowed: the host verifies programs on the device runtime)."""
    return [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a])
            if layer(a) == "host" and layer(b) == "device"]


def report(trees: dict[str, Path] | None = None) -> dict[str, object]:
    """Counts and lists, as ``--json`` prints them."""
    g = build_graph(trees)
    cyc = cycles(g.edges)
    lay = layer_violations(g.edges)
    return {
        "modules": len(g.modules),
        "edges": sum(len(v) for v in g.edges.values()),
        "cycles": cyc,
        "private_imports": sorted(g.private_imports),
        "layer_violations": lay,
        "host_device_edges": host_device_edges(g.edges),
        "type_checking_edges": sorted(f"{a} -> {b}" for a, b in g.type_checking_edges),
        "counts": {"cycles": len(cyc), "private_imports": len(g.private_imports),
                   "layer_violations": len(lay)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    r = report()
    counts: dict[str, int] = r["counts"]  # type: ignore[assignment]
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['modules']} modules, {r['edges']} runtime import edges")
        for cyc in r["cycles"]:  # type: ignore[attr-defined]
            print("cycle: " + " <-> ".join(cyc))
        for line in r["private_imports"]:  # type: ignore[attr-defined]
            print("private: " + line)
        for line in r["layer_violations"]:  # type: ignore[attr-defined]
            print("layer: " + line)
        for line in r["host_device_edges"]:  # type: ignore[attr-defined]
            print("host uses the device runtime: " + line)
        for line in r["type_checking_edges"]:  # type: ignore[attr-defined]
            print("type-checking only: " + line)
        print(f"cycles {counts['cycles']}, private imports {counts['private_imports']}, "
              f"layer edges (core->host/device, device->host) {counts['layer_violations']}")
    return 1 if any(counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
