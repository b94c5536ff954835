"""Sweeps through Hydra multirun on the tiny model: shared cache, nested MLflow runs, JSON contract."""

from __future__ import annotations

import json

import pytest

from qflow.tracking import search_runs

from .conftest import parse_json_stdout, run_cli, tiny_recipe, write_recipe


def test_sweep_shares_upstream_and_nests_runs(tmp_path, tiny_model_dir, runs_dir):
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    done = run_cli("run", "-m", str(recipe), "params.bits=3,4", "params.group_size=16,32", "--json", runs_dir=runs_dir)
    assert done.returncode == 0, done.stderr
    out = parse_json_stdout(done)
    assert set(out) >= {"sweep_dir", "mlflow_parent_run_id", "points"}
    points = out["points"]
    assert len(points) == 4
    assert sorted(tuple(p["overrides"]) for p in points) == sorted(
        (f"params.bits={b}", f"params.group_size={g}") for b in (3, 4) for g in (16, 32))
    for p in points:
        assert p["status"] == "ok" and set(p["stages"]) == {"model", "calibrate", "quantize", "evaluate"}
    # calibrate computed exactly once across the sweep, quantize once per point
    assert sum(p["stages"]["calibrate"]["status"] == "ran" for p in points) == 1
    assert len({p["stages"]["calibrate"]["key"] for p in points}) == 1
    assert sum(p["stages"]["quantize"]["status"] == "ran" for p in points) == 4

    children = search_runs(runs_dir, "recipe", parent_run_id=out["mlflow_parent_run_id"])
    assert len(children) == 4
    assert {c["params"]["params.bits"] for c in children} == {"3", "4"}
    assert all("evaluate/ppl" in c["metrics"] for c in children)

    # re-running the same sweep: every point is a cache hit
    again = parse_json_stdout(run_cli("run", "-m", str(recipe), "params.bits=3,4", "params.group_size=16,32",
                                      "--json", "--no-track", runs_dir=runs_dir, check=True))
    assert all(s["status"] == "cached" for p in again["points"] for s in p["stages"].values())

    status = json.loads(run_cli("sweep", "status", "--json", runs_dir=runs_dir, check=True).stdout)
    assert len(status) == 4 and {r["status"] for r in status} == {"done"}


@pytest.mark.slow
def test_declared_sweep_and_objective(tmp_path, tiny_model_dir, runs_dir):
    extra = """sweep:
  params: {params.bits: "3,4"}
  objective: evaluate/ppl_ratio
  direction: minimize
  constraints: ["quantize/bpw_quantized<=4.0"]
"""
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir, extra=extra))
    out = parse_json_stdout(run_cli("run", "-m", str(recipe), "--json", "--no-track", runs_dir=runs_dir, check=True))
    assert len(out["points"]) == 2
    # 4-bit g32 with fp16 scale + 4-bit zero = 4.625 bpw violates the constraint: only 3-bit qualifies
    assert out["best"]["overrides"] == ["params.bits=3"]
