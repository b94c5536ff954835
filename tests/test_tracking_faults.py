"""MLflow outages and signals: a dead store costs seconds and queues the run, `qflow sync` uploads
it once; SIGTERM ends the MLflow run as KILLED; `qflow ui` takes its server down with it.

All stores are real: the unreachable one is a closed loopback port, the reachable one the
default SQLite store of the test's runs folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qflow.tracking import PENDING_FILE, SYNCED_FILE, list_artifacts, search_runs

from .conftest import REPO, run_cli, tiny_recipe, write_recipe


def _free_port() -> int:
    """A loopback port nobody listens on (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture()
def recipe(tmp_path, tiny_model_dir):
    return write_recipe(tmp_path / "recipes", tiny_recipe(tiny_model_dir))


@pytest.fixture()
def local_store(monkeypatch):
    """This process and the CLIs it starts use the runs folder's own SQLite store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_unreachable_store_costs_seconds_and_queues_the_run_for_sync(recipe, runs_dir, local_store):
    run_cli("run", str(recipe), "--no-track", runs_dir=runs_dir, check=True)  # fill the cache
    t0 = time.perf_counter()
    run_cli("run", str(recipe), "--no-track", runs_dir=runs_dir, check=True)
    untracked_seconds = time.perf_counter() - t0

    dead = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir, env={"MLFLOW_TRACKING_URI": dead}, timeout=120)
    dead_seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    assert dead_seconds - untracked_seconds < 10, (dead_seconds, untracked_seconds)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    assert dead in warnings[0] and "unreachable" in warnings[0] and "qflow sync" in warnings[0]
    out = json.loads(done.stdout)
    run_dir = Path(out["run_dir"])
    assert out["mlflow_run_id"] is None
    queued = json.loads((run_dir / PENDING_FILE).read_text())
    assert queued["status"] == "FINISHED" and queued["uri"] == dead and queued["experiment"] == "tiny"
    assert search_runs(runs_dir, experiment="tiny") == []  # the local store got nothing either

    t0 = time.perf_counter()
    still_down = run_cli("sync", runs_dir=runs_dir, env={"MLFLOW_TRACKING_URI": dead}, timeout=60)
    assert time.perf_counter() - t0 < 30
    assert still_down.returncode == 2 and "Traceback" not in still_down.stderr, still_down.stderr
    assert "unreachable" in still_down.stderr and "qflow sync" in still_down.stderr
    assert (run_dir / PENDING_FILE).is_file()

    synced = run_cli("sync", "--runs-dir", str(runs_dir), check=True)
    assert f"uploaded {run_dir.name}" in synced.stdout, synced.stdout
    runs = search_runs(runs_dir, experiment="tiny")
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "FINISHED" and run["name"] == run_dir.name
    assert run["params"]["stages.quantize.with.bits"] == "4"
    assert run["metrics"]["evaluate/ppl"] == pytest.approx(out["metrics"]["evaluate/ppl"])
    assert run["tags"]["qflow.status"] == "ok"
    assert run["tags"]["qflow.stage.quantize.key"] == out["stages"]["quantize"]["key"]
    assert run["tags"]["qflow.run_dir"] == run_dir.name
    artifacts = list_artifacts(runs_dir, run["run_id"])
    assert "summary.json" in artifacts and "recipe.resolved.yaml" in artifacts
    assert not (run_dir / PENDING_FILE).exists()
    assert json.loads((run_dir / SYNCED_FILE).read_text())["run_id"] == run["run_id"]

    again = run_cli("sync", runs_dir=runs_dir, check=True)
    assert "nothing to sync" in again.stdout
    assert [r["run_id"] for r in search_runs(runs_dir, experiment="tiny")] == [run["run_id"]]


@pytest.mark.slow  # a two-point sweep and two syncs: about 40 s
def test_sweep_with_unreachable_store_is_queued_and_synced_once(recipe, runs_dir, local_store):
    dead = f"http://127.0.0.1:{_free_port()}"
    done = run_cli("run", "-m", str(recipe), "params.bits=3,4", "--json", runs_dir=runs_dir,
                   env={"MLFLOW_TRACKING_URI": dead}, timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and dead in warnings[0] and "qflow sync" in warnings[0], done.stderr
    out = json.loads(done.stdout)
    sweep_dir = Path(out["sweep_dir"])
    assert out["mlflow_parent_run_id"] is None and len(out["points"]) == 2
    assert json.loads((sweep_dir / PENDING_FILE).read_text())["kind"] == "sweep"

    synced = run_cli("sync", runs_dir=runs_dir, check=True)
    assert f"uploaded sweep {sweep_dir.name}" in synced.stdout, synced.stdout
    parents = [r for r in search_runs(runs_dir, experiment="recipe") if r["tags"].get("qflow.sweep") == "parent"]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    children = search_runs(runs_dir, "recipe", parent_run_id=parents[0]["run_id"])
    assert sorted(c["params"]["params.bits"] for c in children) == ["3", "4"]
    assert all(c["status"] == "FINISHED" and "evaluate/ppl" in c["metrics"] for c in children)

    assert "nothing to sync" in run_cli("sync", runs_dir=runs_dir, check=True).stdout
    assert len(search_runs(runs_dir, experiment="recipe")) == 3


def _start_and_wait_for(args: list[str], runs_dir: Path, marker: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "qflow.cli", *args], cwd=REPO, text=True,
                            env=dict(os.environ, QFLOW_RUNS_DIR=str(runs_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = ""
    deadline = time.time() + timeout
    while marker not in seen:
        line = proc.stderr.readline()
        if not line or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"never saw {marker!r}: {seen}{proc.stderr.read()}")
        seen += line
    return proc, seen


def test_sigterm_ends_the_mlflow_run_as_killed(tmp_path, tiny_model_dir, runs_dir, local_store):
    slow = write_recipe(tmp_path / "recipes", tiny_recipe(tiny_model_dir, n_windows=400, seq_len=128))
    proc, seen = _start_and_wait_for(["run", str(slow)], runs_dir, "[calibrate]")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    runs = search_runs(runs_dir, experiment="tiny")
    assert [r["status"] for r in runs] == ["KILLED"], seen + err
    assert proc.returncode == 128 + signal.SIGTERM, seen + err
    assert "Traceback" not in err and "terminated by SIGTERM" in err
    tmp = runs_dir / "cache" / "tmp"
    assert not tmp.is_dir() or not list(tmp.iterdir())  # the interrupted stage left no half-written entry


def test_sigterm_to_qflow_ui_stops_its_server(runs_dir, local_store):
    import psutil

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qflow.cli", "ui", "--port", str(port)], cwd=REPO,
                            env=dict(os.environ, QFLOW_RUNS_DIR=str(runs_dir)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "mlflow ui did not start"
                time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
        assert not _listening(port)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, alive
        assert status == 128 + signal.SIGTERM
    finally:
        for c in children:  # on failure, leave no server behind
            if c.is_running():
                c.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
