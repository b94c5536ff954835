"""Sweeps at scale: a killed parallel sweep resumes; bundled-model AWQ grid and Optuna search (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qflow.tracking import list_artifacts, search_runs

from .conftest import REPO, parse_json_stdout, run_cli, tiny_recipe, write_recipe


def test_killed_parallel_sweep_resumes_without_corruption(tmp_path, tiny_model_dir, runs_dir):
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    sweep = ["params.bits=2,3,4,8", "-j", "2", "--no-track"]
    env = dict(os.environ, QFLOW_RUNS_DIR=str(runs_dir))
    proc = subprocess.Popen([sys.executable, "-m", "qflow.cli", "run", "-m", str(recipe), *sweep],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if list((runs_dir / "sweeps").glob("*/*/point.json")):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its joblib workers
    proc.wait()
    first = next((runs_dir / "sweeps").glob("*"))
    finished = {json.loads(p.read_text())["overrides"][0] for p in first.glob("*/point.json")}
    assert finished, "no point finished before the kill"

    verify = run_cli("cache", "verify", runs_dir=runs_dir)
    assert verify.returncode == 0 and "0 corrupt" in verify.stdout, verify.stdout

    again = parse_json_stdout(run_cli("run", "-m", str(recipe), *sweep, "--json", runs_dir=runs_dir, check=True))
    assert len(again["points"]) == 4
    for p in again["points"]:
        statuses = {s["status"] for s in p["stages"].values()}
        if p["overrides"][0] in finished:
            assert statuses == {"cached"}, p  # finished points are pure cache hits
        assert p["status"] == "ok"
    # points killed mid-way reuse whatever stages they had committed
    assert sum(p["stages"]["quantize"]["status"] == "ran" for p in again["points"]) <= 4 - len(finished)
    assert "0 corrupt" in run_cli("cache", "verify", runs_dir=runs_dir, check=True).stdout


@pytest.mark.slow
def test_awq_grid_on_bundled_model(runs_dir):
    # the flagship's ppl_ratio <= 1.30 gate is a W4 bar: W3 points would fail it (and the sweep exits 1)
    done = run_cli("run", "-m", "recipes/llama-awq.yaml", "params.bits=3,4", "params.group_size=32,64",
                   "params.n_calib=4", "params.n_eval_windows=2", "params.n_search_tokens=512",
                   "~stages.evaluate.gates", "--json", runs_dir=runs_dir, timeout=5400)
    assert done.returncode == 0, done.stderr[-3000:]
    out = parse_json_stdout(done)
    assert len(out["points"]) == 4
    assert sum(p["stages"]["calibrate"]["status"] == "ran" for p in out["points"]) == 1
    children = search_runs(runs_dir, "llama-awq", parent_run_id=out["mlflow_parent_run_id"])
    assert len(children) == 4
    arts = list_artifacts(runs_dir, out["mlflow_parent_run_id"])
    assert any(a.startswith("pareto/") and a.endswith(".html") for a in arts), arts


@pytest.mark.slow
def test_optuna_search_on_bundled_model(tmp_path, runs_dir):
    recipe = write_recipe(tmp_path / "r", """
defaults: [lib/model/smollm2, lib/data/default, lib/eval/default, _self_]
name: search
params: {bits: 4, group_size: 64, n_eval_windows: 2}
stages:
  quantize: {uses: quantize.rtn, with: {bits: "${params.bits}", group_size: "${params.group_size}"}}
  evaluate: {uses: evaluate.lm, needs: [quantize], with: {data: "${data.eval}", n_windows: "${params.n_eval_windows}", topk: 32}}
sweep:
  sweeper: optuna
  n_trials: 6
  params:
    params.bits: choice(2,3,4)
    params.group_size: choice(32,64)
    stages.quantize.uses: choice(quantize.rtn,quantize.hqq)
  objective: evaluate/kl_mean
  direction: minimize
  constraints: ["evaluate/bpw_quantized<=3.7"]
""")
    done = run_cli("run", "-m", str(recipe), "--lib", str(REPO / "recipes"), "--json", runs_dir=runs_dir, timeout=5400)
    assert done.returncode == 0, done.stderr[-3000:]
    out = parse_json_stdout(done)
    assert len(out["points"]) == 6
    best = out["best"]
    chosen = next(p for p in out["points"] if p["job"] == best["job"])
    assert chosen["metrics"]["evaluate/bpw_quantized"] <= 3.7
    feasible = [p for p in out["points"] if p["metrics"].get("evaluate/bpw_quantized", 99) <= 3.7]
    assert best["value"] == min(p["metrics"]["evaluate/kl_mean"] for p in feasible)
