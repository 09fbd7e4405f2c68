"""The layering the folder tree promises, checked on the import graph drawn from the code (absolute and relative
imports, at the top of a module or inside a function): no import circle, and no arrow from a lower layer to a
higher one. The math and the loop import neither Ray nor MLflow; test-only fault injection is not part of the
user-facing config."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "inflora_ray"

# The layers, lowest first: a module may import its own layer and the layers below, never one above. A module
# is in the layer of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("inflora_ray.storage", "inflora_ray.logs", "inflora_ray.config_errors", "inflora_ray.provenance",
     "inflora_ray.yaml_io", "inflora_ray.redact", "inflora_ray.tools.processes", "inflora_ray.tools.glyphs"),
    ("inflora_ray.config",),
    ("inflora_ray.data", "inflora_ray.rundir", "inflora_ray.presets"),
    ("inflora_ray.core",),
    ("inflora_ray.training", "inflora_ray.results"),
    ("inflora_ray.tracking",),
    ("inflora_ray.preflight", "inflora_ray.ray_train"),
    ("inflora_ray.ray_tune",),
    ("inflora_ray.cli", "inflora_ray.run", "inflora_ray.tune", "inflora_ray.report", "inflora_ray.rehearse",
     "inflora_ray.data.__main__", "inflora_ray.tools"),
]
ROOT = "inflora_ray"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative ones resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from x import y`` counts as importing ``x.y`` when ``y``
    is a module, else ``x``)."""
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                names = [f"{base}.{a.name}" for a in node.names]
                targets.update([n for n in names if n in paths] or [base])
        graph[module] = {t for t in targets if t in paths and t != module}
    return graph


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest listed prefix of ``module`` (the package itself, which holds
    only its version, is at the bottom)."""
    if module == ROOT:
        return 0
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py; add it where it belongs")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow from a module to a module of a higher layer."""
    return [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
            for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_the_config_imports_neither_core_nor_data():
    graph = import_graph()
    for module in ("inflora_ray.config", "inflora_ray.config_errors"):
        bad = {t for t in graph[module] if t.startswith(("inflora_ray.core", "inflora_ray.data"))}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_guards_fail_on_a_planted_upward_import_and_circle(tmp_path):
    """Copy the package, plant ``from ..ray_train.launch import run_experiment`` (relative, inside a function) in
    core/lora.py: the graph must show the upward arrow and the circle it closes (ray_train imports core)."""
    import shutil

    copy = tmp_path / ROOT
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pth"))
    lora = copy / "core" / "lora.py"
    lora.write_text(lora.read_text() + "\n\ndef _planted():\n    from ..ray_train.launch import run_experiment\n"
                    "    return run_experiment\n")
    graph = import_graph(copy)
    assert "inflora_ray.ray_train.launch" in graph["inflora_ray.core.lora"]
    assert any("inflora_ray.core.lora (layer 3) imports inflora_ray.ray_train.launch" in u
               for u in upward_imports(graph))
    assert any("inflora_ray.core.lora" in c for c in cycles(graph))
    # and an absolute import from the math into the config's dependencies is caught the same way
    config = copy / "config.py"
    config.write_text(config.read_text() + "\nimport inflora_ray.core.methods  # noqa\n")
    assert "inflora_ray.core.methods" in import_graph(copy)["inflora_ray.config"]


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


@pytest.mark.parametrize("layer", ["core", "training", "data"])
def test_pure_layers_import_neither_ray_nor_mlflow(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        bad = {m for m in names if m.split(".")[0] in ("ray", "mlflow")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_importing_the_loop_loads_no_ray_or_mlflow():
    code = ("import sys, inflora_ray.training.learner, inflora_ray.core.methods; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_method_registry_holds_exactly_the_names_the_config_accepts():
    from inflora_ray.config import BENCHMARK_NAMES, METHOD_NAMES
    from inflora_ray.core.methods import METHODS
    from inflora_ray.data.registry import BENCHMARKS

    assert sorted(METHODS) == sorted(METHOD_NAMES)
    assert list(BENCHMARKS) == list(BENCHMARK_NAMES)


def test_a_method_outside_the_config_names_is_refused():
    from inflora_ray.core.methods import Method, register_method

    class Unknown(Method):
        name = "not-a-method"

    with pytest.raises(ValueError, match="not in inflora_ray.config.METHOD_NAMES"):
        register_method(Unknown)

    class Twice(Method):
        name = "inflora"

    with pytest.raises(ValueError, match="registered twice"):
        register_method(Twice)


def test_entry_points_are_thin():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes["run.py"] <= 200 and sizes["tune.py"] <= 200


def test_fault_injection_is_not_a_config_key():
    from inflora_ray.config import Config

    assert not any(k.startswith("debug.") for k in Config().flat())


def test_fault_plan_parses_and_rejects():
    from inflora_ray.ray_train.faults import FaultPlan

    plan = FaultPlan.parse("task=1,epoch=2,step=3,rank=1,mode=raise")
    assert (plan.task, plan.epoch, plan.step, plan.rank, plan.mode) == (1, 2, 3, 1, "raise")
    assert FaultPlan.parse("task=0") == FaultPlan(task=0)
    for bad in ("epoch=1", "task=1,colour=red", "task=1,mode=explode"):
        with pytest.raises(ValueError, match="INFLORA_RAY_FAULT"):
            FaultPlan.parse(bad)
