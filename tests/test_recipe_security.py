"""Recipes from any library are data (issue 16): each rule with a malicious recipe. The rules on library
roots (symlinks, '..') and git fetches (hooks, LFS) are in tests/test_recipe_libraries.py; Hydra callbacks,
launchers and environment reads in tests/test_recipe_safety.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflow.cli import main
from qflow.errors import QflowError, RecipeError
from qflow.recipe.compose import compose_recipe
from tests.conftest import tiny_recipe, write_recipe


def _evil_package(site: Path, marker: Path, piece: str) -> None:
    """An installed recipe library (entry point qflow.recipes) whose package code would write ``marker``."""
    pkg = site / "evilpkg"
    (pkg / "recipes" / "team").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (pkg / "recipes" / "team" / "evil.yaml").write_text(piece)
    info = site / "evilpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qflow.recipes]\nevil = evilpkg.recipes\n")


def test_target_in_an_installed_library_is_refused(tmp_path, monkeypatch, tiny_model_dir):
    marker, copied = tmp_path / "imported", tmp_path / "copied"
    _evil_package(tmp_path / "site", marker, f"# @package _global_\nparams:\n  payload:\n    _target_: shutil.copyfile\n"
                                             f"    src: {__file__}\n    dst: {copied}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    recipe = write_recipe(tmp_path / "r", "defaults: [evil/team/evil, _self_]\n" + tiny_recipe(tiny_model_dir))
    with pytest.raises(RecipeError, match="_target_"):
        compose_recipe(recipe, [], cache_dir=tmp_path / "cache")
    assert not marker.exists() and not copied.exists()


def test_stage_names_resolve_only_through_the_registry(tmp_path, monkeypatch, capsys, tiny_model_dir):
    marker = tmp_path / "imported"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "evilstage.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for uses in ("evilstage", "evilstage.Evil", "evilstage:Evil", "os.system"):
        text = tiny_recipe(tiny_model_dir).replace("uses: quantize.rtn", f"uses: '{uses}'")
        recipe = write_recipe(tmp_path / uses.replace(":", "_"), text)
        capsys.readouterr()
        assert main(["--runs-dir", str(tmp_path / "runs"), "run", str(recipe), "--dry-run", "--no-track"]) == 2
        err = capsys.readouterr().err
        assert f"unknown stage '{uses}'" in err and "Traceback" not in err
    assert not marker.exists(), "a recipe's stage name imported a module"


@pytest.mark.parametrize("where", ["recipe", "library", "override"])
def test_trust_remote_code_never_comes_from_a_recipe(tmp_path, tiny_model_dir, where):
    text = tiny_recipe(tiny_model_dir)
    overrides, libs = [], []
    if where == "recipe":
        text = text.replace(f'model: {{source: "{tiny_model_dir}"}}',
                            f'model: {{source: "{tiny_model_dir}", trust_remote_code: true}}')
    elif where == "library":
        (tmp_path / "lib" / "team").mkdir(parents=True)
        (tmp_path / "lib" / "team" / "remote.yaml").write_text("# @package _global_\nmodel: {trust_remote_code: true}\n")
        text, libs = "defaults: [_self_, team/remote]\n" + text, [str(tmp_path / "lib")]
    else:
        overrides = ["+model.trust_remote_code=true"]
    recipe = write_recipe(tmp_path / "r", text)
    with pytest.raises(RecipeError, match="--trust-remote-code on the command line"):
        compose_recipe(recipe, overrides, libraries=libs, cache_dir=tmp_path / "cache")


def _remote_code_model(folder: Path, tiny_model_dir: Path, marker: Path) -> Path:
    """The tiny model's config, declaring a configuration class in the folder's own Python file."""
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config |= {"model_type": "evilllama", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n")
    return folder


def test_checkpoint_code_runs_only_with_the_command_line_flag(tmp_path, monkeypatch, tiny_model_dir):
    from qflow.models.lint import model_config
    from qflow.recipe.safety import REMOTE_CODE_ENV

    marker = tmp_path / "ran"
    folder = _remote_code_model(tmp_path / "remote-model", tiny_model_dir, marker)
    monkeypatch.delenv(REMOTE_CODE_ENV, raising=False)
    with pytest.raises(QflowError, match="--trust-remote-code"):
        model_config(str(folder))
    assert not marker.exists()
    monkeypatch.setenv(REMOTE_CODE_ENV, "1")     # what `qflow run --trust-remote-code` sets
    assert type(model_config(str(folder))).__name__ == "EvilConfig" and marker.exists()
