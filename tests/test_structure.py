"""The package's layering: no import circles between modules (lazy imports inside functions included), and
evaluation and prediction never import the training engine."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "superdiffusion"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("superdiffusion"):
                candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names if a.name.startswith("superdiffusion")]
            else:
                continue
            for c in candidates:
                if c in modules and c != name and not name.startswith(c + "."):
                    graph[name].add(c)
                    break
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_circles():
    graph = import_graph()
    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a]
                     if a < b and a in reachable(graph, b) and not b.endswith("__init__"))
    package_inits = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    circles = [c for c in circles if not set(c.split(" <-> ")) & package_inits]
    assert not circles, circles


def test_evaluation_and_prediction_never_import_the_training_engine():
    graph = import_graph()
    for module in ("superdiffusion.evaluation.inference", "superdiffusion.evaluation.predict",
                   "superdiffusion.evaluation.export", "superdiffusion.checkpoint", "superdiffusion.device"):
        engine = {m for m in reachable(graph, module) if m.startswith("superdiffusion.engine")}
        assert not engine, (module, engine)
