"""Import layout check for the repo's top-level modules.

Reads every top-level *.py file of the repo (not tests/, bench/, tools/) and prints the import graph
between those modules (`module -> dep1, dep2`, leaves first), any import cycle, any import of a repo
module inside a function or class body (file:line, a defect), and each file's longest function or
method with the file's line count. Graph edges are the module-level imports, including those under a
module-level if/try (`if __name__ == "__main__":` too). Exits 1 on a cycle or a function-local import
of a repo module, else 0.

Run: python tools/imports.py [--root PATH]
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _trees(root):
    """{module name: (path, parsed ast)} for the top-level *.py files of root."""
    return {p.stem: (p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(Path(root).glob("*.py"))}


def _imported(node):
    """Top-level names an Import / ImportFrom node imports (relative imports give none)."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def _walk(node, local=False):
    """Yield (import node, inside a function or class body) for every import under node."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        scope = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        yield from _walk(child, local or scope)


def import_graph(root=ROOT):
    """({module: sorted module-level deps among repo modules}, [(file name, line, module) of local imports])."""
    trees = _trees(root)
    graph, local_imports = {}, []
    for name, (path, tree) in trees.items():
        deps = set()
        for node, local in _walk(tree):
            for dep in _imported(node):
                if dep not in trees or dep == name:
                    continue
                if local:
                    local_imports.append((path.name, node.lineno, dep))
                else:
                    deps.add(dep)
        graph[name] = sorted(deps)
    return graph, local_imports


def find_cycle(graph):
    """One import cycle as a path [a, b, ..., a], or None."""
    state, stack = {}, []  # state: 1 while on the DFS stack, 2 when done

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def topo_order(graph):
    """Modules with each one after its dependencies (leaves first); a cycle is broken where met."""
    order, seen = [], set()

    def visit(m):
        if m in seen:
            return
        seen.add(m)
        for d in graph.get(m, ()):
            visit(d)
        order.append(m)

    for m in sorted(graph):
        visit(m)
    return order


def longest_functions(root=ROOT):
    """{file name: (qualified name or None, length in lines, file's line count)}."""
    result = {}
    for path, tree in _trees(root).values():
        best = (None, 0)

        def visit(node, prefix):
            nonlocal best
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = prefix + child.name
                    if not isinstance(child, ast.ClassDef):
                        length = child.end_lineno - child.lineno + 1
                        if length > best[1]:
                            best = (qual, length)
                    visit(child, qual + ".")
                else:
                    visit(child, prefix)

        visit(tree, "")
        result[path.name] = (*best, len(path.read_text().splitlines()))
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    root = Path(argv[argv.index("--root") + 1]) if "--root" in argv else ROOT
    graph, local_imports = import_graph(root)
    print("import graph (leaves first):")
    for m in topo_order(graph):
        print(f"  {m} -> {', '.join(graph[m])}" if graph[m] else f"  {m}")
    cycle = find_cycle(graph)
    print("cycle: " + (" -> ".join(cycle) if cycle else "none"))
    print("function-local imports of repo modules:" + ("" if local_imports else " none"))
    for file, line, dep in local_imports:
        print(f"  {file}:{line}: import {dep}")
    print("longest function per file:")
    for file, (qual, length, lines) in longest_functions(root).items():
        print(f"  {file} ({lines} lines): {qual or '-'} ({length} lines)")
    return 1 if cycle or local_imports else 0


if __name__ == "__main__":
    sys.exit(main())
