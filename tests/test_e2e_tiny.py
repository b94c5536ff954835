"""End to end through the CLI on a tiny random Llama (real MLflow, real Hydra, real cache)."""

from __future__ import annotations

import json

import pytest

from qflow.tracking import get_run, list_artifacts

from .conftest import parse_json_stdout, run_cli, tiny_recipe, write_recipe


@pytest.fixture()
def recipe(tmp_path, tiny_model_dir):
    return write_recipe(tmp_path / "recipes", tiny_recipe(tiny_model_dir))


def test_run_json_contract_cache_and_mlflow(recipe, runs_dir):
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir)
    assert done.returncode == 0, done.stderr
    out = parse_json_stdout(done)  # stdout holds exactly one JSON object
    assert set(out) >= {"run_dir", "mlflow_run_id", "stages", "metrics"}
    assert list(out["stages"]) == ["model", "calibrate", "quantize", "evaluate"]
    for sid, st in out["stages"].items():
        assert st["status"] == "ran" and len(st["key"]) == 64 and st["seconds"] >= 0 and st["uses"]
    m = out["metrics"]
    for name in ("evaluate/ppl", "evaluate/ppl_fp", "evaluate/ppl_ratio", "evaluate/kl_mean", "evaluate/top1_agree"):
        assert name in m
    assert m["evaluate/ppl"] > 1 and m["evaluate/ppl_fp"] > 1 and m["evaluate/kl_mean"] > 0

    run = get_run(runs_dir, out["mlflow_run_id"])
    assert run["status"] == "FINISHED"
    assert run["metrics"]["evaluate/ppl"] == pytest.approx(m["evaluate/ppl"])
    assert run["params"]["stages.quantize.with.bits"] == "4"
    assert run["tags"]["qflow.stage.quantize.key"] == out["stages"]["quantize"]["key"]
    assert run["tags"]["qflow.stage.quantize.status"] == "ran"
    assert "recipe.resolved.yaml" in list_artifacts(runs_dir, out["mlflow_run_id"])

    again = parse_json_stdout(run_cli("run", str(recipe), "--json", runs_dir=runs_dir, check=True))
    assert {s["status"] for s in again["stages"].values()} == {"cached"}
    assert again["metrics"] == out["metrics"]
    assert get_run(runs_dir, again["mlflow_run_id"])["tags"]["qflow.stage.evaluate.status"] == "cached"

    # an evaluate-only change recomputes only evaluate
    third = parse_json_stdout(run_cli("run", str(recipe), "--json", "params.n_eval_windows=3",
                                      runs_dir=runs_dir, check=True))
    status = {sid: s["status"] for sid, s in third["stages"].items()}
    assert status == {"model": "cached", "calibrate": "cached", "quantize": "cached", "evaluate": "ran"}

    # explain names the changed ingredient
    ex = run_cli("explain", str(recipe), "params.group_size=16", runs_dir=runs_dir, check=True)
    assert "config.group_size: 32 -> 16" in ex.stdout
    assert "calibrate" in ex.stdout and "hit" in ex.stdout


def test_dry_run_lists_plan_and_cache_status(recipe, runs_dir):
    done = run_cli("run", str(recipe), "--dry-run", "--json", runs_dir=runs_dir, check=True)
    out = parse_json_stdout(done)
    assert [s["status"] for s in out["stages"].values()] == ["will run"] * 4
    # --only: the other stages are skipped (the uncached upstream ones say that the run would fail)
    only = parse_json_stdout(run_cli("run", str(recipe), "--dry-run", "--only", "quantize", "--json",
                                     runs_dir=runs_dir, check=True))["stages"]
    assert {sid: s["status"] for sid, s in only.items()} == {
        "model": "skipped", "calibrate": "skipped", "quantize": "will run", "evaluate": "skipped"}
    assert "not cached" in only["calibrate"]["error"] and "error" not in only["evaluate"]


def test_failed_gate_exits_nonzero_keeps_artifacts(tmp_path, tiny_model_dir, runs_dir):
    text = tiny_recipe(tiny_model_dir).replace("layer_report: false}", "layer_report: false}\n    gates: {ppl_ratio: {max: 1.0}, top1_agree: {min: 1.01}}")
    recipe = write_recipe(tmp_path / "r", text)
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir)
    assert done.returncode == 1
    out = parse_json_stdout(done)
    assert out["status"] == "failed"
    failed = {g["metric"] for g in out["gates"] if not g["passed"]}
    assert "top1_agree" in failed
    assert all(s["status"] == "ran" for s in out["stages"].values())  # artifacts committed
    run = get_run(runs_dir, out["mlflow_run_id"])
    assert run["status"] == "FAILED" and run["tags"]["qflow.gates"] == "failed"


def test_only_and_from_flags(recipe, runs_dir):
    r = run_cli("run", str(recipe), "--only", "evaluate", "--json", runs_dir=runs_dir)
    errors = [s.get("error", "") for s in parse_json_stdout(r)["stages"].values()]
    assert r.returncode == 1 and any("not cached" in e for e in errors)
    run_cli("run", str(recipe), "--json", runs_dir=runs_dir, check=True)
    out = parse_json_stdout(run_cli("run", str(recipe), "--from", "quantize", "--json", runs_dir=runs_dir, check=True))
    assert {k: v["status"] for k, v in out["stages"].items()} == {
        "model": "cached", "calibrate": "cached", "quantize": "ran", "evaluate": "ran"}


def test_cache_ls_gc_verify(recipe, runs_dir):
    run_cli("run", str(recipe), "--json", runs_dir=runs_dir, check=True)
    ls = json.loads(run_cli("cache", "ls", "--json", runs_dir=runs_dir, check=True).stdout)
    stages = {e["stage"] for e in ls}
    assert {"calibrate", "quantize.rtn", "evaluate.lm"} <= stages
    assert "verified" in run_cli("cache", "verify", runs_dir=runs_dir, check=True).stdout
    gc = run_cli("cache", "gc", "--keep", "1", runs_dir=runs_dir, check=True)
    assert "removed 0 entries" in gc.stdout
