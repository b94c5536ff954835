"""MLflow as users expect it (real SQLite store): the model-training view, source tags, run URLs,
and a sweep's parent run linking to its points and plots."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from urllib.parse import parse_qs, unquote

import qflow
from qflow.tracking import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, Tracker, _mlflow, get_run, list_artifacts,
                            search_runs)

from .conftest import run_cli, tiny_recipe, write_recipe


def _experiment_tags(runs_dir, name: str) -> dict[str, str]:
    _mlflow(runs_dir)
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_experiment_by_name(name).tags)


def _git(folder, *args) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_experiment_opens_the_training_view_and_runs_carry_their_source(runs_dir, tmp_path):
    library = tmp_path / "team-recipes"
    recipe = write_recipe(library, "name: r\n", "r.yaml")
    _git(library, "init", "-q")
    _git(library, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "--allow-empty",
         "-m", "empty")
    _git(library, "add", "r.yaml")
    _git(library, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "recipe")
    tracker = Tracker(runs_dir, "kind-test")
    run_id = tracker.start("r1", {"qflow.recipe": str(recipe)})
    tracker.end()
    assert _experiment_tags(runs_dir, "kind-test")[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"
    tags = get_run(runs_dir, run_id)["tags"]
    assert tags["mlflow.source.name"] == str(recipe.resolve()) and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == _git(library, "rev-parse", "HEAD")
    assert tags["qflow.source.git.dirty"] == "false" and tags["mlflow.user"]
    assert tags["qflow.command"] == shlex.join(sys.argv)

    recipe.write_text("name: r2\n")   # the recipe now differs from its commit
    second = Tracker(runs_dir, "kind-test")
    assert get_run(runs_dir, second.start("r2", {"qflow.recipe": str(recipe)}))["tags"]["qflow.source.git.dirty"] == "true"


def test_a_kind_the_user_chose_is_kept(runs_dir):
    _mlflow(runs_dir)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = client.create_experiment("chosen")
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "genai_development")
    Tracker(runs_dir, "chosen").start("r")
    assert _experiment_tags(runs_dir, "chosen")[EXPERIMENT_KIND_TAG] == "genai_development"


def test_ui_open_prints_the_run_url(runs_dir, tmp_path):
    run_dir = runs_dir / "runs" / "20260101-000000-000000-tiny"
    run_dir.mkdir(parents=True)
    tracker = Tracker(runs_dir, "url-test", run_dir=run_dir)
    run_id = tracker.start("r1")
    exp_id = tracker.experiment_id
    expected = f"http://127.0.0.1:5123/#/experiments/{exp_id}/runs/{run_id}"
    for ref in (run_id, str(run_dir)):
        done = run_cli("ui", "--open", ref, "--port", "5123", "--url-only", runs_dir=runs_dir)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"run {run_id}: {expected}"
    bad = run_cli("ui", "--open", "feedface", "--url-only", "--runs-dir", str(runs_dir))
    assert bad.returncode == 2 and "no MLflow run 'feedface'" in bad.stderr and "Traceback" not in bad.stderr


def test_sweep_parent_links_to_its_points_and_plots(tmp_path, tiny_model_dir, runs_dir):
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    swept = qflow.sweep(recipe, ["params.bits=3,4"], runs_dir=runs_dir, quiet=True)
    assert isinstance(swept, qflow.SweepSummary) and swept.ok and len(swept.points) == 2
    assert json.loads((swept.sweep_dir / "result.json").read_text()) == json.loads(json.dumps(swept.to_json()))
    parent = get_run(runs_dir, swept.mlflow_parent_run_id)
    note = parent["tags"]["mlflow.note.content"]
    children = {r["run_id"] for r in search_runs(runs_dir, parent_run_id=swept.mlflow_parent_run_id)}
    assert children == {p.run.mlflow_run_id for p in swept.points} and len(children) == 2
    link = note.split("](#/compare-runs?", 1)[1].split(")", 1)[0]
    query = parse_qs(link)
    assert set(json.loads(unquote(query["runs"][0]))) == children
    assert json.loads(unquote(query["experiments"][0])) == [parent["experiment_id"]]
    logged = set(list_artifacts(runs_dir, swept.mlflow_parent_run_id))
    plots = [line for line in note.splitlines() if "get-artifact?path=pareto" in line]
    assert plots and "pareto/bpw_kl.png" in logged
    for line in plots:
        path = unquote(line.split("get-artifact?path=", 1)[1].split("&", 1)[0])
        assert path in logged and f"run_uuid={swept.mlflow_parent_run_id}" in line
    assert _experiment_tags(runs_dir, "recipe")[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert parent["tags"]["mlflow.source.name"] == str(recipe.resolve())
    assert "mlflow.source.git.commit" not in parent["tags"]   # the recipe is in no git repository
