"""The shipped recipes on the bundled model, shrunk to CI size, through the CLI (part of `make test`).

RTN and AWQ W4 g64 (recipes/llama-rtn.yaml, recipes/llama-awq.yaml) with SMOKE's overrides: 8
calibration and 8 evaluation windows of 128 tokens, AWQ's scale search on 256 tokens per block,
no speed pass, no export, no per-layer pass for RTN (nothing checks it). Both runs share one runs
folder, so the AWQ run finds the model, the calibration set and the float reference cached. Checks: the numbers fall in bands around measured
values, AWQ beats RTN, the per-layer report used AWQ's recorded fold factors, and every recipe gate
passed, the flagship's ``ppl_ratio <= 1.30`` included.

Measured (2026-12-07, this code, CPU, torch 2.13; the runs are deterministic): float ppl 41.167 on
these 8 x 128-token windows; RTN ppl 55.135 (ratio 1.339), kl_mean 0.345; AWQ ppl 45.727 (ratio
1.111), kl_mean 0.158; AWQ per-layer weight SQNR min 11.59 dB (layer 0 q_proj, in the float
model's coordinates), isolated output SQNR min 19.05 dB.
Band rule: each ppl_ratio within ±0.05 of its measured value, each kl_mean within ±25% of it,
the float ppl within ±1% (a change of method, kernel or data moves them by more); the per-layer
minima at least 1.5 dB below the measured ones.
Cost (2026-12-07, 2 shared cores, load 1-4): 198 s for both runs (RTN 79 s: model 10, calibrate 25,
quantize 5, evaluate 34; AWQ 119 s: quantize 60, evaluate 51), 209 s of CPU; 800 s under load 7.
Since the RTN run skips its per-layer pass and calibrate tokenizes only a prefix of the text: 135 s of
CPU (2026-12-07, 775 s wall at load 7-12; not timed quietly).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import REPO, parse_json_stdout, run_cli

SMOKE = ["data.calib.seq_len=128", "data.eval.seq_len=128", "params.n_calib=8", "params.n_eval_windows=8",
         "+stages.evaluate.with.speed=false"]
AWQ_ONLY = ["params.n_search_tokens=256", "~stages.export"]
RTN_ONLY = ["+stages.evaluate.with.layer_report=false"]   # only AWQ's per-layer report is checked (below)

PPL_FP = 41.167
MEASURED = {"rtn": {"ppl_ratio": 1.339, "kl_mean": 0.345}, "awq": {"ppl_ratio": 1.111, "kl_mean": 0.158}}


def in_band(metrics: dict, method: str) -> None:
    want = MEASURED[method]
    assert metrics["evaluate/ppl_fp"] == pytest.approx(PPL_FP, rel=0.01), metrics
    assert metrics["evaluate/ppl_ratio"] == pytest.approx(want["ppl_ratio"], abs=0.05), (method, metrics)
    assert metrics["evaluate/kl_mean"] == pytest.approx(want["kl_mean"], rel=0.25), (method, metrics)


@pytest.fixture(scope="module")
def flagship_runs(tmp_path_factory, mlflow_template):
    import shutil

    runs_dir = tmp_path_factory.mktemp("flagship") / "runs"
    runs_dir.mkdir()
    shutil.copy(mlflow_template, runs_dir / "mlflow.db")
    out = {}
    for method, extra in (("rtn", RTN_ONLY), ("awq", AWQ_ONLY)):
        done = run_cli("run", f"recipes/llama-{method}.yaml", *SMOKE, *extra, "--json", runs_dir=runs_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        out[method] = parse_json_stdout(done)
    return out


def test_shipped_recipes_give_sane_numbers_and_pass_their_gates(flagship_runs):
    rtn, awq = flagship_runs["rtn"], flagship_runs["awq"]
    in_band(rtn["metrics"], "rtn")
    in_band(awq["metrics"], "awq")
    assert awq["metrics"]["evaluate/ppl"] < rtn["metrics"]["evaluate/ppl"]
    assert awq["metrics"]["evaluate/kl_mean"] < rtn["metrics"]["evaluate/kl_mean"]
    assert {sid: s["status"] for sid, s in awq["stages"].items()} == {
        "model": "cached", "calibrate": "cached", "quantize": "ran", "evaluate": "ran"}
    # the flagship's gate (recipes/llama-awq.yaml: ppl_ratio <= 1.30) and RTN's were evaluated and passed
    for run, bound in ((awq, 1.30), (rtn, 1.5)):
        assert run["status"] == "ok"
        gates = {(g["stage"], g["metric"]): g for g in run["gates"]}
        gate = gates[("evaluate", "ppl_ratio")]
        assert gate["passed"] and gate["bound"] == {"max": bound}, gates


def test_flagship_per_layer_report_uses_recorded_fold_factors(flagship_runs):
    run_dir = Path(flagship_runs["awq"]["run_dir"])
    doc = json.loads((run_dir / "artifacts" / "evaluate" / "layers.json").read_text())
    rows = doc["layers"]
    metrics = json.loads((run_dir / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert metrics["protocol_summary"].endswith("8 x 128-token windows of zoo:lee-news (evaluation); "
                                                "calibration: 8 x 128-token windows of zoo:wiki-pages")
    assert len(rows) == 210 and all(r["fold"] == "recorded" for r in rows)
    assert min(r["weight_sqnr_db"] for r in rows) > 11.59 - 1.5
    assert min(r["isolated_sqnr_db"] for r in rows) > 19.05 - 1.5


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("llama-*.yaml")))
def test_every_shipped_recipe_takes_its_sizes_from_a_protocol_preset(recipe):
    from qflow.recipe.compose import compose_recipe, to_plain

    ci = to_plain(compose_recipe(REPO / "recipes" / recipe, []))
    full = to_plain(compose_recipe(REPO / "recipes" / recipe, ["lib/protocol=full"]))
    mine = to_plain(compose_recipe(REPO / "recipes" / recipe, ["lib/protocol=full", "params.n_calib=4"]))
    assert (ci["eval"]["protocol"], full["eval"]["protocol"]) == ("ci", "full")
    assert ci["stages"]["evaluate"]["with"]["n_windows"] == 32
    assert full["stages"]["evaluate"]["with"]["n_windows"] is None         # all 147 windows
    if "calibrate" in ci["stages"]:
        assert ci["stages"]["calibrate"]["with"]["n_samples"] == 32
        assert full["stages"]["calibrate"]["with"]["n_samples"] == 1267    # every 512-token window of wiki-pages
        assert mine["stages"]["calibrate"]["with"]["n_samples"] == 4        # the command line still wins
    if "n_search_tokens" in ci["stages"]["quantize"]["with"]:
        assert ci["stages"]["quantize"]["with"]["n_search_tokens"] == 4096
        assert full["stages"]["quantize"]["with"]["n_search_tokens"] is None
    assert "lib/protocol=full" in (REPO / "recipes" / recipe).read_text()  # the header says how to quote
