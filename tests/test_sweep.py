"""Sweeps through Hydra multirun on the tiny model: shared cache, nested MLflow runs, JSON contract."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflow.engine import sweep
from qflow.errors import RecipeError
from qflow.evaluation import report
from qflow.specs import parse_constraint
from qflow.tracking import list_artifacts, search_runs

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
    # the CLI hands the sweep its Pareto report (the engine itself imports no evaluation code)
    assert any(a.startswith("pareto/") for a in list_artifacts(runs_dir, out["mlflow_parent_run_id"]))

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


@pytest.mark.parametrize("text, expected", [
    ("evaluate/bpw_quantized<=4.5", ("evaluate/bpw_quantized", "<=", 4.5)),
    (" kl_mean < inf ", ("kl_mean", "<", math.inf)),
    ("ppl>=-inf", ("ppl", ">=", -math.inf)),
    ("quantize/bpw_quantized==1e-3", ("quantize/bpw_quantized", "==", 0.001)),
    ("top1_agree>-.5", ("top1_agree", ">", -0.5)),
])
def test_constraints_parse(text, expected):
    assert parse_constraint(text) == expected


@given(st.floats(allow_nan=False), st.sampled_from(["<=", ">=", "<", ">", "=="]))
def test_every_float_bound_round_trips(bound, op):
    assert parse_constraint(f"evaluate/kl_mean{op}{bound!r}") == ("evaluate/kl_mean", op, bound)


@pytest.mark.parametrize("text", ["ppl", "ppl<=", "ppl<=fin", "ppl<=nan", "ppl<=1.2.3", "ppl=>3", "<=3"])
def test_a_bad_constraint_is_one_clean_error(text):
    with pytest.raises(RecipeError) as err:
        parse_constraint(text, where="sweep.constraints")
    assert str(err.value).startswith("sweep.constraints: cannot parse constraint") and "Fix: write METRIC<=VALUE" in str(err.value)


def test_sweep_and_report_share_one_parser_that_accepts_infinity():
    assert sweep.parse_constraint is report.parse_constraint is parse_constraint
    assert sweep.constraint_ok({"m": 5.0}, "m<inf") and not sweep.constraint_ok({"m": 5.0}, "m<=-inf")
