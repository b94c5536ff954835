"""Recipes are data (issue 11): nothing a recipe or a library says runs code, reads secrets into tracked
files, or gives a traceback. Each test names the defect it guards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_recipe, write_recipe


def _clean_error(done, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().startswith("error:"), done.stderr
    for w in words:
        assert w in done.stderr, (w, done.stderr)


def _payload(marker: Path) -> str:
    # shutil.copyfile(src, dst) would create the marker if Hydra instantiated it
    return f"""
hydra:
  callbacks:
    evil:
      _target_: shutil.copyfile
      src: {__file__}
      dst: {marker}
"""


def test_callback_recipe_under_multirun_runs_nothing(tmp_path, tiny_model_dir, runs_dir):
    marker = tmp_path / "pwned"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir) + _payload(marker))
    done = run_cli("run", "-m", str(recipe), "params.bits=3,4", runs_dir=runs_dir, timeout=300)
    _clean_error(done, "hydra", "callbacks")
    assert not marker.exists()
    assert not list((runs_dir / "cache").glob("??/*")) if (runs_dir / "cache").exists() else True


def test_callback_in_a_library_file_runs_nothing(tmp_path, tiny_model_dir, runs_dir):
    marker = tmp_path / "pwned"
    lib = tmp_path / "lib"
    write_recipe(lib / "team", "# @package _global_\n" + _payload(marker), name="evil.yaml")
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    done = run_cli("run", "-m", str(recipe), "--lib", str(lib), "+team=evil", "params.bits=3,4",
                   runs_dir=runs_dir, timeout=300)
    _clean_error(done, "evil.yaml", "Hydra")
    assert not marker.exists()


def test_library_cannot_shadow_a_hydra_launcher(tmp_path, tiny_model_dir, runs_dir):
    marker = tmp_path / "pwned"
    lib = tmp_path / "lib"
    write_recipe(lib / "hydra" / "launcher", f"_target_: shutil.copyfile\nsrc: {__file__}\ndst: {marker}\n",
                 name="joblib.yaml")
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    done = run_cli("run", "-m", str(recipe), "--lib", str(lib), "hydra/launcher=joblib", "params.bits=3,4",
                   runs_dir=runs_dir, timeout=300)
    _clean_error(done, "hydra/launcher/joblib", "launchers")
    assert not marker.exists()


def test_target_in_recipe_or_package_header_refused(tmp_path, tiny_model_dir, runs_dir):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir) + "thing: {_target_: os.getcwd}\n")
    _clean_error(run_cli("run", str(recipe), "--dry-run", runs_dir=runs_dir), "_target_", "thing._target_")
    lib = tmp_path / "lib"
    write_recipe(lib / "team", "# @package hydra.launcher\nn_jobs: 2\n", name="x.yaml")
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    _clean_error(run_cli("run", str(recipe), "--lib", str(lib), "+team=x", "--dry-run", runs_dir=runs_dir),
                 "@package hydra.launcher")


def test_recipe_declared_package_searchpath_is_not_imported(tmp_path, tiny_model_dir, runs_dir):
    pkg = tmp_path / "site" / "evilpkg"
    pkg.mkdir(parents=True)
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir) + "hydra: {searchpath: ['pkg://evilpkg']}\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = run_cli("run", str(recipe), "--dry-run", runs_dir=runs_dir, env=env)
    _clean_error(done, "pkg://evilpkg", "--lib pkg://evilpkg")
    assert not marker.exists()
    # the same package named on the command line is the user's choice
    (pkg / "__init__.py").write_text("")
    plain = write_recipe(tmp_path / "r2", tiny_recipe(tiny_model_dir))
    ok = run_cli("run", str(plain), "--dry-run", "--lib", "pkg://evilpkg", runs_dir=runs_dir, env=env)
    assert ok.returncode == 0, ok.stderr


def test_env_interpolation_needs_allow_env_and_is_redacted(tmp_path, tiny_model_dir, runs_dir):
    secret = "s3cr3t-token-8d1f0a77"
    text = tiny_recipe(tiny_model_dir).replace("params: {", "params: {note: '${oc.env:QFLOW_TEST_SECRET}', ")
    assert "oc.env" in text
    recipe = write_recipe(tmp_path, text)
    env = {"QFLOW_TEST_SECRET": secret}
    refused = run_cli("run", str(recipe), runs_dir=runs_dir, env=env)
    _clean_error(refused, "QFLOW_TEST_SECRET", "--allow-env QFLOW_TEST_SECRET")
    assert secret not in refused.stderr + refused.stdout
    done = run_cli("run", str(recipe), "--allow-env", "QFLOW_TEST_SECRET", runs_dir=runs_dir, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    leaks = [p for p in runs_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    resolved = next(runs_dir.glob("runs/*/recipe.resolved.yaml")).read_text()
    assert "<env:QFLOW_TEST_SECRET>" in resolved
    # the MLflow param is redacted too (checked through MLflow's own API, not only the db bytes)
    from qflow.tracking import search_runs

    runs = search_runs(runs_dir, "tiny")
    assert runs and runs[0]["params"]["params.note"] == "<env:QFLOW_TEST_SECRET>"


@pytest.mark.parametrize("content, words", [
    (b"name: x\nname: y\nstages: {}\n", ["duplicate key 'name'", "line 2"]),
    (b"name: caf\xe9\nstages: {}\n", ["not UTF-8", "line 1"]),
])
def test_bad_bytes_and_duplicate_keys_in_recipe(tmp_path, runs_dir, content, words):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    _clean_error(run_cli("run", str(path), "--dry-run", runs_dir=runs_dir), *words)


def test_bad_library_file_gives_clean_error(tmp_path, tiny_model_dir, runs_dir):
    lib = tmp_path / "lib"
    write_recipe(lib / "team", "a: 1\na: 2\n", name="dup.yaml")
    (lib / "team" / "latin.yaml").write_bytes(b"a: caf\xe9\n")
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    _clean_error(run_cli("run", str(recipe), "--lib", str(lib), "+team=dup", "--dry-run", runs_dir=runs_dir),
                 "duplicate key")
    _clean_error(run_cli("run", str(recipe), "--lib", str(lib), "+team=latin", "--dry-run", runs_dir=runs_dir),
                 "UTF-8")


@pytest.mark.parametrize("sweep, words", [
    ("sweep: [params.bits]\n", ["sweep", "valid dictionary"]),
    ("sweep: {n_trials: many, sweeper: optuna}\n", ["sweep.n_trials"]),
    ("sweep: {params: [1, 2]}\n", ["sweep.params"]),
    ("sweep: {direction: up}\n", ["sweep.direction"]),
])
def test_malformed_sweep_block(tmp_path, tiny_model_dir, runs_dir, sweep, words):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir) + sweep)
    _clean_error(run_cli("run", "-m", str(recipe), runs_dir=runs_dir), *words)
    _clean_error(run_cli("run", str(recipe), "--dry-run", runs_dir=runs_dir), "sweep")


def test_invalid_regex_fails_at_validation(tmp_path, tiny_model_dir, runs_dir):
    text = tiny_recipe(tiny_model_dir).replace('with: {bits: "${params.bits}"', 'with: {targets: "(unclosed", bits: "${params.bits}"')
    recipe = write_recipe(tmp_path, text)
    done = run_cli("run", str(recipe), runs_dir=runs_dir)
    _clean_error(done, "stages.quantize.with.targets", "regular expression")
    assert not (runs_dir / "cache").exists() or not list((runs_dir / "cache").glob("??/*"))


@pytest.mark.parametrize("content, words", [(b"", ["is empty"]), (b"  \n\n", ["is empty"]),
                                            (b"good text\n\xff\xfe more\n", ["not UTF-8", "line 2"])])
def test_bad_text_file_refused_before_the_model_loads(tmp_path, tiny_model_dir, runs_dir, content, words):
    text_file = tmp_path / "corpus.txt"
    text_file.write_bytes(content)
    text = tiny_recipe(tiny_model_dir).replace('calib: {source: "zoo:wiki-pages"', f'calib: {{source: "{text_file}"')
    recipe = write_recipe(tmp_path, text)
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir)
    _clean_error(done, str(text_file), *words)
    assert not (runs_dir / "runs").exists()   # preflight: no stage ran, not even the model's


def test_resume_state_is_loaded_as_data_only(tmp_path):
    """A planted pickle in a stage's scratch is refused (weights_only) and the stage starts over."""
    import logging

    import torch

    from qflow.quant.algos.resume import load_resume_state

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "state.pt"
    torch.save({"signature": "x", "payload": Evil()}, path)
    assert load_resume_state(path, logging.getLogger("t")) is None
    assert not marker.exists()
    torch.save({"signature": "x", "next_block": 1, "writer": {"layers": {}, "floats": {}}, "inputs": torch.zeros(2)}, path)
    assert load_resume_state(path, logging.getLogger("t"))["next_block"] == 1


def test_safety_uses_hydras_loader_as_pinned():
    """audit_defaults relies on Hydra's config loader internals; fail loudly if they move."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    assert hasattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo")
    assert hasattr(ConfigLoaderImpl, "compute_defaults_list")
