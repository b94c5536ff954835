"""The Python API (qflow/api.py): the CLI's results as typed objects, the same errors, a loadable model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import qflow
from qflow.errors import QflowError, RecipeError

from .conftest import REPO, parse_json_stdout, run_cli, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir):
    return write_recipe(tmp_path_factory.mktemp("recipes"), tiny_recipe(tiny_model_dir, extra="""
    gates: {ppl_ratio: {max: 100.0}}
"""))


def _fresh_runs(tmp_path_factory, mlflow_template, name: str):
    path = tmp_path_factory.mktemp(name)
    shutil.copy(mlflow_template, path / "mlflow.db")
    return path


@pytest.fixture(scope="module")
def api_run(recipe, tmp_path_factory, mlflow_template):
    runs = _fresh_runs(tmp_path_factory, mlflow_template, "api-runs")
    return runs, qflow.run(recipe, ["params.bits=3"], runs_dir=runs, quiet=True)


def _shape(obj):
    """The JSON structure without its values (keys, nesting, list lengths)."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape(v) for v in obj]
    return type(obj).__name__ if obj is not None else None


def _without_timing(summary: dict) -> dict:
    """A run's JSON without what differs between two runs of the same plan (folder, MLflow id, seconds)."""
    stages = {sid: {k: v for k, v in st.items() if k != "seconds"} for sid, st in summary["stages"].items()}
    return {**summary, "run_dir": None, "mlflow_run_id": None, "stages": stages}


def test_api_returns_the_cli_summary(recipe, api_run):
    runs, result = api_run
    assert isinstance(result, qflow.RunSummary) and result.ok
    assert all(isinstance(s, qflow.StageSummary) for s in result.stages.values())
    assert [g.to_json() for g in result.gates] == [{"stage": "evaluate", "metric": "ppl_ratio", "passed": True,
                                                     "value": result.metrics["evaluate/ppl_ratio"],
                                                     "bound": {"max": 100.0}}]
    assert result.run_dir.parent.parent == runs and (result.run_dir / "summary.json").is_file()
    assert {s.status for s in result.stages.values()} == {"ran"} and result.mlflow_run_id
    # the CLI on the same cache (its global option after the command), then the API again: same summary
    done = run_cli("run", str(recipe), "params.bits=3", "--json", "--runs-dir", str(runs))
    assert done.returncode == 0, done.stderr
    cli = parse_json_stdout(done)
    again = qflow.run(recipe, ["params.bits=3"], runs_dir=runs, quiet=True)
    assert {s.status for s in again.stages.values()} == {"cached"}
    assert _without_timing(again.to_json()) == _without_timing(cli)
    assert set(cli["stages"]["evaluate"]) == set(again.to_json()["stages"]["evaluate"]) >= {"seconds", "key"}
    assert again.metrics == result.metrics and cli["mlflow_run_id"] and again.mlflow_run_id
    assert qflow.RunSummary.from_json(cli).to_json() == cli      # the types hold all of the CLI's JSON


def test_explain(recipe, api_run):
    runs, first = api_run
    report = qflow.explain(recipe, ["params.bits=3", "params.group_size=16"], runs_dir=runs)
    assert report["calibrate"].status == "hit" and report["calibrate"].key == first.stages["calibrate"].key
    assert report["quantize"].status == "miss" and report["quantize"].closest == first.stages["quantize"].key
    assert "config.group_size: 32 -> 16" in report["quantize"].differs
    assert report["quantize"].to_json()["differs"] == report["quantize"].differs


def test_load_quantized_generates(api_run):
    import torch

    from qflow.quant.qlinear import QLinear
    from qflow.tracking import get_run

    runs, result = api_run
    model, tok = qflow.load_quantized(result)
    qlinears = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert len(qlinears) == 2 * 7        # every linear of the 2 blocks (q k v o gate up down)
    ids = tok("The history of", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5 and torch.equal(out[0, :ids.shape[1]], ids[0])

    # the same weights by run folder, by MLflow run id and dequantized: the same logits
    by_dir, _ = qflow.load_quantized(str(result.run_dir))
    by_id, _ = qflow.load_quantized(result.mlflow_run_id, runs_dir=runs)
    dequant, _ = qflow.load_quantized(result.run_dir, mode="dequant")
    assert not any(isinstance(m, QLinear) for m in dequant.modules())
    with torch.no_grad():
        ref = model(ids).logits
        for other in (by_dir, by_id, dequant):
            torch.testing.assert_close(other(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert get_run(runs, result.mlflow_run_id)["status"] == "FINISHED"
    with pytest.raises(QflowError, match="stage 'evaluate' of run .* has no quantized checkpoint"):
        qflow.load_quantized(result, stage="evaluate")


def test_errors_are_typed_and_match_the_cli(recipe, tmp_path):
    with pytest.raises(RecipeError) as exc:
        qflow.run(recipe, ["params.bitz=3"], runs_dir=tmp_path, quiet=True)
    done = run_cli("run", str(recipe), "params.bitz=3", "--runs-dir", str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip().endswith(f"error: {exc.value}")
    with pytest.raises(QflowError, match="neither a run folder"):
        qflow.load_quantized(str(tmp_path))
    with pytest.raises(QflowError, match="no MLflow store"):
        qflow.load_quantized("0123abcd", runs_dir=tmp_path)
    with pytest.raises(QflowError, match="overrides must be strings"):
        qflow.run(recipe, [3], runs_dir=tmp_path)


def test_import_qflow_stays_light():
    code = ("import sys, qflow; qflow.run; qflow.RunSummary; "
            "print(json.dumps(sorted(m for m in ('torch', 'mlflow', 'hydra', 'transformers') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, cwd=REPO,
                          check=True)
    assert json.loads(done.stdout) == []
