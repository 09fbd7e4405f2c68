"""The layering that the folder tree promises: the math and the loop import neither Ray nor MLflow, the entry
points stay thin, and test-only fault injection is not part of the user-facing config."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "inflora_ray"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", ["core", "training", "data"])
def test_pure_layers_import_neither_ray_nor_mlflow(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("ray", "mlflow")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_importing_the_loop_loads_no_ray_or_mlflow():
    code = ("import sys, inflora_ray.training.learner, inflora_ray.core.methods; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_layers_below_do_not_import_the_ray_layer():
    for layer in ("core", "training", "data", "tracking"):
        for path in (PACKAGE / layer).rglob("*.py"):
            text = path.read_text()
            assert "distributed" not in {m.split(".")[0] for m in _imports(path)} and \
                "from ..distributed" not in text, f"{path.relative_to(PACKAGE)} imports the Ray layer"


def test_entry_points_are_thin_and_modules_small():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes["run.py"] <= 200 and sizes["tune.py"] <= 200
    big = {name: n for name, n in sizes.items() if n > 400}
    assert not big, f"modules over 400 lines: {big}"


def test_fault_injection_is_not_a_config_key():
    from inflora_ray.config import Config

    assert not any(k.startswith("debug.") for k in Config().flat())


def test_fault_plan_parses_and_rejects():
    from inflora_ray.distributed.faults import FaultPlan

    plan = FaultPlan.parse("task=1,epoch=2,step=3,rank=1,mode=raise")
    assert (plan.task, plan.epoch, plan.step, plan.rank, plan.mode) == (1, 2, 3, 1, "raise")
    assert FaultPlan.parse("task=0") == FaultPlan(task=0)
    for bad in ("epoch=1", "task=1,colour=red", "task=1,mode=explode"):
        with pytest.raises(ValueError, match="INFLORA_RAY_FAULT"):
            FaultPlan.parse(bad)
