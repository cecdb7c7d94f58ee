"""Check the import layering of the project (and print its package graph).

    python scripts/check_layers.py            # exit 1 and list every violation
    python scripts/check_layers.py --graph    # also print the package-to-package arrows

The layers, lowest first (see docs/architecture.md)::

    common  <-  toyworld  <-  {fusedit, repae}  <-  evaluation  <-  entry points (train.py, ...)

Rules, read from every ``import`` statement (module level *and* inside functions, since a lazy
import is still a dependency):

1. a package imports only packages of its own layer or below (``common`` imports no stage,
   ``toyworld`` neither stage, ``fusedit`` and ``repae`` never each other);
2. no ``_private`` name (or ``_private`` module) is imported from another top-level package;
3. no import cycle between modules.

Nothing is imported or run: the files are parsed with :mod:`ast`, so the check is fast and safe.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# What each top-level package may import (besides itself and third-party code).
ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "toyworld": frozenset({"common"}),
    "fusedit": frozenset({"common", "toyworld"}),
    "repae": frozenset({"common", "toyworld"}),
    "evaluation": frozenset({"common", "toyworld", "fusedit", "repae"}),
    "prompts": frozenset({"common"}),
}
PACKAGES = tuple(ALLOWED)
# Entry-point scripts at the top of the tree: they may import every package.
ENTRY_POINTS = ("train.py", "dataset_download.py")


@dataclass(frozen=True)
class Import:
    """One imported module (and the names taken from it) at one line of one file."""

    importer: str  # dotted module name of the importing file
    module: str  # dotted module name imported (resolved for relative imports)
    names: tuple[str, ...]
    path: str
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path) -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py")) if "__pycache__" not in p.parts]
    return files + [root / f for f in ENTRY_POINTS if (root / f).is_file()]


def imports_of(root: Path, path: Path) -> list[Import]:
    """Every import statement of one file, relative imports resolved against its package."""
    me = module_name(root, path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        rel = str(path.relative_to(root))
        if isinstance(node, ast.Import):
            found.extend(Import(me, a.name, (), rel, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append(Import(me, base, tuple(a.name for a in node.names), rel, node.lineno))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def layer_violations(imports: Iterable[Import]) -> list[str]:
    """Rules 1 and 2."""
    problems = []
    for imp in imports:
        src, dst = top(imp.importer), top(imp.module)
        if dst not in ALLOWED or src == dst:
            continue
        where = f"{imp.path}:{imp.line}"
        if src in ALLOWED and dst not in ALLOWED[src]:
            problems.append(f"{where}: {src} may not import {dst} ({imp.module})")
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in imp.module.split(".") if p.startswith("_") and not p.startswith("__")]
        if private:
            problems.append(f"{where}: private name(s) {', '.join(private)} imported across packages from {imp.module}")
    return problems


def module_graph(imports: Iterable[Import], modules: set[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import mod`` resolved to ``pkg.mod``)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        targets = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in modules]
        if imp.module in modules and len(targets) < len(imp.names or ("",)):
            targets.append(imp.module)
        graph[imp.importer].update(t for t in targets if t != imp.importer)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def check(root: Path) -> tuple[list[str], dict[tuple[str, str], int]]:
    """All violations under ``root``, and the package-to-package arrows with their import counts."""
    files = source_files(root)
    imports = [imp for f in files for imp in imports_of(root, f)]
    modules = {module_name(root, f) for f in files}
    problems = layer_violations(imports)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(module_graph(imports, modules))]
    arrows: dict[tuple[str, str], int] = {}
    for imp in imports:
        src = top(imp.importer) if top(imp.importer) in ALLOWED else imp.importer
        dst = top(imp.module)
        if dst in ALLOWED and src != dst:
            arrows[(src, dst)] = arrows.get((src, dst), 0) + 1
    return problems, arrows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout (default: this one)"
    )
    parser.add_argument("--graph", action="store_true", help="print the package-to-package arrows")
    args = parser.parse_args(argv)
    problems, arrows = check(Path(args.root))
    if args.graph:
        for (src, dst), n in sorted(arrows.items()):
            print(f"{src:>20} -> {dst:<12} {n} import(s)")
    for p in problems:
        print(p)
    print("layering: ok" if not problems else f"layering: {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
