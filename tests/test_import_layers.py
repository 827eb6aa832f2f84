"""lmm's import graph keeps its layers (DESIGN.md §3): read from the source, lazy imports included.

- `lmm.data` imports nothing from families, training, evaluation, generation, the API or the CLI;
- `lmm.components` nothing from families, the API or the CLI;
- `lmm.families` nothing from the API, the CLI or evaluation;
- no import cycle anywhere in `lmm`.
"""

from __future__ import annotations

import ast
from pathlib import Path

LMM = Path(__file__).resolve().parents[1] / "lmm"
FORBIDDEN = {
    "data": {"families", "training", "evaluation", "generation", "api", "cli", "convert", "chat"},
    "components": {"families", "api", "cli", "convert", "chat"},
    "families": {"api", "cli", "evaluation", "convert", "chat"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(LMM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every lmm module and the lmm modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for path in LMM.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("lmm"):  # `from pkg import module` imports the module
                    deps |= {f"{target}.{a.name}" for a in node.names} | {target}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("lmm")}
        graph[name] = deps
    names = set(graph)

    def resolve(target: str) -> str:
        while target and target not in names:
            target = target.rpartition(".")[0]
        return target

    return {m: {resolve(d) for d in ds if resolve(d) not in ("", m)} for m, ds in graph.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_downwards():
    graph = import_graph()
    assert "lmm.data.processor" in graph and "lmm.families.model" in graph  # the scan sees lmm
    bad = sorted(
        (m, d)
        for m, deps in graph.items()
        for d in deps
        if _layer(d) in FORBIDDEN.get(_layer(m), ())
    )
    assert not bad, "imports against the layers (DESIGN.md §3): " + ", ".join(
        f"{m} -> {d}" for m, d in bad
    )


def test_no_import_cycle():
    graph = import_graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for dep in sorted(graph[node]):
            if seen.get(dep) == 1:
                return [*path[path.index(dep) :], dep] if dep in path else [node, dep]
            if dep not in seen:
                cycle = visit(dep, [*path, dep])
                if cycle:
                    return cycle
        seen[node] = 2
        return None

    for module in sorted(graph):
        if module not in seen:
            cycle = visit(module, [module])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
