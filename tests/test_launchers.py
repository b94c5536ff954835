"""Hydra launchers: SLURM (submitit) config composition; a real local Ray cluster sweep."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qflow.tracking import search_runs

from .conftest import REPO, parse_json_stdout, run_cli, tiny_recipe, write_recipe


def _compose_hydra(overrides: list[str], cache: Path):
    from hydra import compose, initialize_config_dir

    from qflow.recipe.compose import search_path, searchpath_override

    # qflow's own library (lib/launcher/...) is on the search path qflow gives Hydra
    overrides = overrides + [searchpath_override(search_path([], cache, {}))]
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
        return compose(config_name="llama-awq", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes(tmp_path):
    cfg = _compose_hydra(["+lib/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu"
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.stages.quantize.uses == "quantize.awq"  # the recipe itself is untouched


def test_ray_launcher_config_composes(tmp_path):
    cfg = _compose_hydra(["+lib/launcher=ray"], tmp_path)
    assert cfg.hydra.launcher._target_.endswith("RayLauncher")


def _points_by_overrides(out):
    return {tuple(sorted(p["overrides"])): p for p in out["points"]}


@pytest.mark.slow
def test_ray_sweep_equals_local_sweep(tmp_path, tiny_model_dir, mlflow_template):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray is not None, "the ray CLI is missing although ray is pinned: pip install -r requirements.txt"
    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    sweep = ["params.bits=3,4", "params.group_size=16,32"]
    runs_local, runs_ray = tmp_path / "local", tmp_path / "ray"
    for d in (runs_local, runs_ray):
        d.mkdir()
        shutil.copy(mlflow_template, d / "mlflow.db")
    local = parse_json_stdout(run_cli("run", "-m", str(recipe), *sweep, "--json", runs_dir=runs_local, check=True))

    port = 6399
    # keep every Ray connection on loopback (otherwise Ray swaps 127.0.0.1 for the host's address)
    loopback = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env = dict(os.environ, **loopback)
    start = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                            "--include-dashboard=false", "--disable-usage-stats"], capture_output=True, text=True,
                           env=env, timeout=180)
    assert start.returncode == 0, start.stderr
    try:
        done = run_cli("run", "-m", str(recipe), *sweep, "+lib/launcher=ray", "--lib", str(REPO / "recipes"), "--json",
                       runs_dir=runs_ray, env=loopback)
        assert done.returncode == 0, done.stderr[-3000:]
        remote = parse_json_stdout(done)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)

    a, b = _points_by_overrides(local), _points_by_overrides(remote)
    assert set(a) == set(b) and len(a) == 4
    for k in a:
        assert {s: v["key"] for s, v in a[k]["stages"].items()} == {s: v["key"] for s, v in b[k]["stages"].items()}
        for name, value in a[k]["metrics"].items():
            if not any(t in name for t in ("peak_rss", "tps", "seconds", "_ms", "latency", "speedup")):
                assert b[k]["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    keys_local = {e.name for e in (runs_local / "cache").glob("??/*")}
    keys_ray = {e.name for e in (runs_ray / "cache").glob("??/*")}
    assert keys_local == keys_ray
    for runs, out in ((runs_local, local), (runs_ray, remote)):
        assert len(search_runs(runs, "recipe", parent_run_id=out["mlflow_parent_run_id"])) == 4
