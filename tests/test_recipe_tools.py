"""`qflow recipes ls|show` and `qflow lock` / `run --locked` (issue 16), called in-process through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qflow.cli import main
from tests.conftest import REPO, tiny_recipe, write_recipe


def qflow(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _team_lib(root: Path) -> Path:
    (root / "team").mkdir(parents=True)
    (root / "team" / "params.yaml").write_text("# @package _global_\n# The team's 3-bit settings.\n"
                                               "params:\n  bits: 3\n  group_size: 32\n")
    return root


def test_recipes_ls_lists_every_library_with_descriptions(tmp_path, capsys):
    lib = _team_lib(tmp_path / "teamlib")
    code, out, _ = qflow(capsys, "--runs-dir", str(tmp_path / "runs"), "recipes", "ls", "--lib", str(lib), "--json",
                         "--dir", str(REPO / "recipes"))
    assert code == 0
    rows = {r["qualified"]: r for r in json.loads(out)}
    assert rows["teamlib/team/params"]["description"] == "The team's 3-bit settings."
    assert rows["teamlib/team/params"]["library"] == "teamlib"
    assert rows["qflow/lib/eval/default"]["library"] == "qflow"
    assert rows["qflow/lib/eval/default"]["description"].startswith("Default evaluation protocol")
    assert rows["llama-awq"]["library"] == "local"          # --dir (default ./recipes)


def test_recipes_show_names_the_file_and_line_of_every_value(tmp_path, capsys):
    lib = _team_lib(tmp_path / "teamlib")
    recipe = write_recipe(tmp_path / "r", "defaults: [team/params, qflow/lib/eval/default, _self_]\n"
                                          "name: r\nstages:\n  q: {uses: quantize.rtn, with: {bits: \"${params.bits}\"}}\n")
    code, out, _ = qflow(capsys, "--runs-dir", str(tmp_path / "runs"), "recipes", "show", str(recipe),
                         "params.group_size=64", "--lib", str(lib), "--json")
    assert code == 0
    where = json.loads(out)["sources"]
    assert where["params.bits"] == f"{lib / 'team' / 'params.yaml'}:4"
    assert where["params.group_size"] == "command line: params.group_size=64"
    assert where["eval.batch_size"].endswith("qflow/lib/eval/default.yaml:4")
    assert where["stages.q.with.bits"] == f"{recipe}:4 (= ${{params.bits}})"
    code, text, _ = qflow(capsys, "recipes", "show", "qflow/lib/eval/default")
    assert code == 0 and "batch_size: 4" in text and "default.yaml:4" in text


def test_recipes_show_keys_containing_dots(tmp_path, capsys):
    """A per-layer pattern is one key: its values get their own lines, not a parent's nor those of a nested
    key that flattens to the same text."""
    lib = tmp_path / "teamlib"
    (lib / "team").mkdir(parents=True)
    (lib / "team" / "edges.yaml").write_text(
        "# @package _global_\nstages:\n  q:\n    with:\n      layers:\n"
        "        \"model.layers.0.mlp.down_proj\": {bits: 8}\n"
        "        \".*o_proj\":\n          bits: 6\n"
        "notes:\n  \"b.c\": 1\n")
    recipe = write_recipe(tmp_path / "r", "defaults: [team/edges, _self_]\nname: r\n"
                                          "stages:\n  q:\n    uses: quantize.rtn\n    with:\n      layers:\n"
                                          "        \"model.layers.0.mlp\": {group_size: 32}\n"
                                          "notes:\n  b:\n    c: 2\n")
    code, out, _ = qflow(capsys, "--runs-dir", str(tmp_path / "runs"), "recipes", "show", str(recipe),
                         "--lib", str(lib), "--json")
    assert code == 0
    where, edges = json.loads(out)["sources"], lib / "team" / "edges.yaml"
    layers = "stages.q.with.layers"
    assert where[f'{layers}["model.layers.0.mlp.down_proj"].bits'] == f"{edges}:6"
    assert where[f'{layers}[".*o_proj"].bits'] == f"{edges}:8"
    assert where[f'{layers}["model.layers.0.mlp"].group_size'] == f"{recipe}:8"
    assert where['notes["b.c"]'] == f"{edges}:10" and where["notes.b.c"] == f"{recipe}:11"
    code, text, _ = qflow(capsys, "--runs-dir", str(tmp_path / "runs"), "recipes", "show", str(recipe),
                          "--lib", str(lib))
    lines = [line.strip() for line in text.splitlines()]
    assert any(line.startswith("b.c: 1") and line.endswith(f"# {edges}:10") for line in lines)
    assert any(line.startswith("c: 2") and line.endswith(f"# {recipe}:11") for line in lines)


@pytest.fixture()
def locked_setup(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    text = tmp_path / "eval.txt"
    text.write_text("A short evaluation text. " * 200)
    lib = _team_lib(tmp_path / "teamlib")
    body = tiny_recipe(model).replace('"zoo:lee-news"', f'"{text}"').replace("params: {bits: 4, group_size: 32, ",
                                                                              "params: {")
    recipe = write_recipe(tmp_path / "r", "defaults: [team/params, _self_]\n" + body)
    return recipe, lib, model, text


def test_lock_then_run_locked_refuses_every_kind_of_drift(tmp_path, capsys, locked_setup):
    recipe, lib, model, text = locked_setup
    base = ["--runs-dir", str(tmp_path / "runs")]
    code, out, err = qflow(capsys, *base, "lock", str(recipe), "--lib", str(lib))
    assert code == 0, err
    lock = json.loads(recipe.with_suffix(".lock").read_text())
    assert lock["libraries"]["teamlib"]["fingerprint"].startswith("sha256:")
    assert set(lock["stages"]) == {"model", "calibrate", "quantize", "evaluate"}
    assert lock["stages"]["model"]["external"]["model"] and lock["stages"]["evaluate"]["external"]["data"]

    def locked_run(*extra: str) -> tuple[int, str]:
        code, _, err = qflow(capsys, *base, "run", str(recipe), "--locked", "--dry-run", "--lib", str(lib), *extra)
        return code, err

    assert locked_run() == (0, "")
    code, err = locked_run("params.group_size=64")
    assert code == 2 and "resolved.params.group_size: locked 32, now 64" in err and "Traceback" not in err

    original = (lib / "team" / "params.yaml").read_text()
    (lib / "team" / "params.yaml").write_text(original + "  extra: 1\n")
    code, err = locked_run()
    assert code == 2 and "libraries.teamlib.fingerprint" in err
    (lib / "team" / "params.yaml").write_text(original)

    text.write_text(text.read_text() + "One more sentence.")
    code, err = locked_run()
    assert code == 2 and "stages.evaluate.external.data" in err and "stages.model" not in err

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5 * 3}))
    code, err = locked_run("--lock-file", str(recipe.with_suffix(".lock")))
    assert code == 2 and "stages.model.external.model" in err


def test_locked_without_a_lock_file_is_a_clear_error(tmp_path, capsys, locked_setup):
    recipe, lib, _, _ = locked_setup
    code, _, err = qflow(capsys, "--runs-dir", str(tmp_path / "runs"), "run", str(recipe), "--locked", "--dry-run",
                         "--lib", str(lib))
    assert code == 2 and "no lock file" in err and "qflow lock" in err
