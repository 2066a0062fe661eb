"""The package's shape: no module imports another that (directly or not) imports it back, lazily or not."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "powerclip"


def imports_of_each_module() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # function-level imports too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("powerclip"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("powerclip"))
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = imports_of_each_module()
    assert {"powerclip.regions", "powerclip.sam", "powerclip.model", "powerclip.methods.clippy"} <= set(graph)

    def reachable(start):
        seen, stack = set(), [start]
        while stack:
            for dep in graph.get(stack.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    stack.append(dep)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if b in graph and a in reachable(b)})
    assert cycles == []
