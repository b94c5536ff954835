"""`qflow ui` serves the real MLflow UI on loopback over qflow's store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from .conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store(runs_dir):
    from qflow.tracking import Tracker

    tracker = Tracker(runs_dir, "ui-test")
    run_id = tracker.start("r1")
    tracker.log_metrics({"evaluate/ppl": 12.5})
    tracker.end()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qflow.cli", "ui", "--port", str(port)], cwd=REPO,
                            env=dict(os.environ, QFLOW_RUNS_DIR=str(runs_dir)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(f"mlflow ui did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as r:
            run = json.loads(r.read())["run"]
        assert run["data"]["metrics"][0]["key"] == "evaluate/ppl"
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read(2000).lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
