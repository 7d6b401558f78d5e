"""The package's import graph, read from the source (ast): no cycles, and each heavy dependency only
where the design puts it (../shared/DESIGN.md):

* Ray only in ``scheduler``, ``jobs``, ``data.raydata`` (the Ray Data pipelines members stream
  through; ``data.streamed`` imports it lazily, so workers never import it themselves) and the Ray
  Serve deployment (``api.ray_serve``, which only the CLI imports: the plain HTTP server never loads
  Ray); MLflow only in ``tracking``, ``registry`` and the pyfunc model;
* ``workers/`` never imports Ray, MLflow or the CLI; only ``scheduler`` imports ``workers``;
* nothing in the library imports the CLI; ``aggregation`` and ``metrics`` import only torch and the
  shared ``validation`` module.

Imports inside functions count: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ensemble_service", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def graph() -> Dict[str, Set[str]]:
    """module -> every module it imports (own modules as module names, others as top-level names)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    out: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        deps: Set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when it is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                own = next((m for m in sorted(modules, key=len, reverse=True) if t == m or t.startswith(m + ".")), None)
                deps.add(own if own is not None else t.split(".")[0])
        deps.discard(name)
        out[name] = deps
    return out


def owners(g: Dict[str, Set[str]], top: str) -> Set[str]:
    return {m for m, deps in g.items() if top in deps}


def test_no_import_cycles():
    g = graph()
    own = {m: {d for d in deps if d in g} for m, deps in g.items()}
    # a package's __init__ importing its own submodules is not a cycle between them
    for m in own:
        own[m] = {d for d in own[m] if not (m.startswith(d + ".") and d + "." in m + ".")}
    state: Dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in own[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(own):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_ray_and_mlflow_only_where_they_belong():
    g = graph()
    assert owners(g, "ray") <= {"ensemble_service.scheduler", "ensemble_service.jobs",
                                "ensemble_service.data.raydata", "ensemble_service.api.ray_serve"}, owners(g, "ray")
    # only the streamed data set's own methods reach the Ray Data module (workers call them)
    assert owners(g, "ensemble_service.data.raydata") <= {"ensemble_service.data.streamed"}
    assert owners(g, "ensemble_service.api.ray_serve") <= {"ensemble_service.cli"}, owners(g, "ensemble_service.api.ray_serve")
    assert owners(g, "mlflow") <= {"ensemble_service.tracking", "ensemble_service.registry",
                                   "ensemble_service.pyfunc_model"}, owners(g, "mlflow")


def test_workers_import_no_ray_mlflow_or_cli_and_only_the_scheduler_imports_them():
    g = graph()
    for m, deps in g.items():
        if m.startswith("workers"):
            assert not deps & {"ray", "mlflow", "ensemble_service.cli", "typer"}, (m, deps)
    importers = {m for m, deps in g.items() if any(d.startswith("workers") for d in deps) and not m.startswith("workers")}
    assert importers <= {"ensemble_service.scheduler"}, importers


def test_the_library_never_imports_the_cli():
    g = graph()
    assert owners(g, "ensemble_service.cli") == set(), owners(g, "ensemble_service.cli")


def test_aggregation_and_metrics_are_pure_torch():
    g = graph()
    assert g["ensemble_service.validation"] <= {"__future__", "typing", "torch", "math"}, g["ensemble_service.validation"]
    for m in ("ensemble_service.aggregation", "ensemble_service.metrics"):
        allowed = {"__future__", "typing", "dataclasses", "math", "torch", "ensemble_service.validation",
                   "ensemble_service.aggregation"}
        assert g[m] <= allowed, (m, g[m] - allowed)


def test_the_graph_sees_every_module():
    g = graph()
    assert "ensemble_service.scheduler" in owners(g, "ray") and "workers.state" in g
    assert "ensemble_service.api.app" in g and "ensemble_service.data.csvfile" in g
