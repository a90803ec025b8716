"""The shape of the house, counted from the source: import circles, upward imports, function-level
imports and the largest files of src/llamaforge (the before/after counts of issue 14's closing note).

    python bench/house_counts.py                       # this checkout
    python bench/house_counts.py --src OTHER/src/llamaforge   # another tree (e.g. an older commit)

Read with `ast`, nothing is imported. An internal import is one `import llamaforge...` /
`from llamaforge... import ...` (or a relative one) resolved to the module it names (a package's
__init__ when the name is not a submodule); one statement naming several modules counts once per
module. A circle is a strongly connected group of two or more modules in that graph (imports inside
functions included: they run too, only later). An import is upward when it goes from a module to
one in a higher layer of .importlinter's layers contract (its `ignore_imports` are counted apart:
they are the allowed ones); modules of no layer are left out of that count.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder `src`."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = [src.name, *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name refers to: itself, or its nearest enclosing module/package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path], root: str) -> list[tuple[str, bool]]:
    """(imported internal module, inside a function) for each internal module an import names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            targets = {resolve(n, modules) for n in names if n == root or n.startswith(root + ".")}
            found.extend((t, in_function) for t in sorted(t for t in targets if t and t != module))
            visit(child, inner)

    visit(tree, False)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
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
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        out.append(sorted(group))
    return sorted(out)


def read_layers(config: Path, root: str) -> tuple[list[list[str]], set[tuple[str, str]]]:
    """The layers contract of an .importlinter file: layers top first (each a list of independent
    siblings, as dotted prefixes) and its ignored (importer, imported) pairs."""
    parser = configparser.ConfigParser()
    parser.read(config)
    section = parser["importlinter:contract:layers"]
    layers = [
        [f"{root}.{name.strip()}" for name in line.split("|")]
        for line in section["layers"].strip().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    ignored = set()
    for line in section.get("ignore_imports", "").strip().splitlines():
        if "->" in line:
            a, b = (x.strip() for x in line.split("->"))
            ignored.add((a, b))
    return layers, ignored


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    for i, layer in enumerate(layers):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(ROOT / "src" / "llamaforge"), help="the package folder")
    p.add_argument("--layers", default=str(ROOT / ".importlinter"), help="the import-linter config")
    p.add_argument("--top", type=int, default=10, help="how many of the largest files to list")
    a = p.parse_args()
    src = Path(a.src)
    if not (src / "__init__.py").is_file():
        sys.exit(f"--src: {src} is not a package folder (no __init__.py)")
    modules = module_names(src)
    root = src.name
    graph: dict[str, set[str]] = defaultdict(set)
    edges: list[tuple[str, str, bool]] = []
    for module, path in modules.items():
        for target, in_function in imports_of(module, path, modules, root):
            edges.append((module, target, in_function))
            graph[module].add(target)
    graph.update({m: graph.get(m, set()) for m in modules})

    found = circles(graph)
    inside = sum(1 for *_, f in edges if f)
    print(f"modules: {len(modules)}, lines: {sum(len(p.read_text().splitlines()) for p in modules.values())}")
    print(
        f"internal imports: {len(edges)}, of which inside functions: {inside} ({inside / max(len(edges), 1):.0%})"
    )
    print(f"import circles: {len(found)}")
    for group in found:
        print("  " + " <-> ".join(m.removeprefix(root + ".") for m in group))

    config = Path(a.layers)
    if config.is_file():
        layers, ignored = read_layers(config, root)
        upward, allowed, unlayered = [], [], set()
        for importer, imported, _ in edges:
            i, j = layer_of(importer, layers), layer_of(imported, layers)
            if i is None or j is None:
                unlayered.update(m for m, k in ((importer, i), (imported, j)) if k is None)
                continue
            if j < i:
                (allowed if (importer, imported) in ignored else upward).append((importer, imported))
        print(
            f"upward imports (against {config.name}'s layers): {len(upward)}, allowed by its ignore_imports: {len(allowed)}"
        )
        for importer, imported in upward:
            print(f"  {importer.removeprefix(root + '.')} -> {imported.removeprefix(root + '.')}")
        if unlayered:
            names = ", ".join(sorted(m.removeprefix(root + ".") for m in unlayered))
            print(f"modules in no layer (not counted): {len(unlayered)}: {names}")
    else:
        print(f"upward imports: not counted ({config} is missing)")

    sizes = sorted(((len(p.read_text().splitlines()), p) for p in modules.values()), reverse=True)
    print(f"largest files (lines), {sum(1 for n, _ in sizes if n > 500)} past 500:")
    for n, path in sizes[: a.top]:
        print(f"  {n:5d}  {path.relative_to(src.parent)}")


if __name__ == "__main__":
    main()
