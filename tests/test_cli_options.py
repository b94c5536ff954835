"""Global options work where users type them: before or after the command."""

from __future__ import annotations

import json

from qflow.cli import main

from .conftest import run_cli, tiny_recipe, write_recipe


def test_runs_dir_after_a_nested_command(tmp_path, capsys):
    before, after = tmp_path / "before", tmp_path / "after"
    (after / "sweeps" / "20260101-000000-000000-tiny" / "0").mkdir(parents=True)
    (after / "sweeps" / "20260101-000000-000000-tiny" / "0" / "status.json").write_text(
        json.dumps({"status": "done", "overrides": ["params.bits=3"]}))
    assert main(["--runs-dir", str(before), "sweep", "status", "--runs-dir", str(after), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["overrides"] for r in rows] == [["params.bits=3"]]   # the later --runs-dir wins
    assert main(["cache", "ls", "--json", "-v", "--runs-dir", str(before)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_run_with_runs_dir_after_the_recipe(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir))
    out = tmp_path / "out"
    done = run_cli("run", str(recipe), "--runs-dir", str(out), "--dry-run", "--json", "-v", "params.bits=3")
    assert done.returncode == 0, done.stderr
    assert "unrecognized arguments" not in done.stderr
    assert (out / "cache").is_dir()
    plan = json.loads(done.stdout)
    assert {"calibrate", "quantize", "evaluate"} <= set(plan["stages"])
