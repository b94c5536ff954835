"""MLflow tracking: the only module that imports mlflow.

Default store: ``sqlite:///<runs>/mlflow.db`` with artifacts in
``<runs>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it (a team server).
One MLflow run per recipe run; a sweep is a parent run with nested runs.
Only the parent process writes (SQLite does not tolerate concurrent writers).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("qflow.tracking")

MAX_PARAM_VALUE = 6000

# mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ, so the
# user's own setting must be read before qflow ever calls it.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(runs_root: Path) -> str:
    return _USER_TRACKING_URI or f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def artifact_root(runs_root: Path) -> str:
    return (runs_root / "mlartifacts").resolve().as_uri()


def _mlflow(runs_root: Path):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri(runs_root)
    mlflow.set_tracking_uri(uri)
    if _USER_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # keep child processes on their own runs dir
    return mlflow


def prepare_store(runs_root: Path) -> None:
    """Create (and migrate) the default SQLite store under ``runs_root`` if it does not exist."""
    _mlflow(Path(runs_root))
    from mlflow.tracking import MlflowClient

    MlflowClient().search_experiments(max_results=1)


class Tracker:
    """Writes one MLflow run; ``Tracker.null()`` writes nothing (``--no-track``)."""

    def __init__(self, runs_root: Path, experiment: str, *, enabled: bool = True):
        self.runs_root = Path(runs_root)
        self.experiment = experiment
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None

    @classmethod
    def null(cls) -> "Tracker":
        return cls(Path("."), "", enabled=False)

    def _client_and_experiment(self):
        mlflow = _mlflow(self.runs_root)
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            uri = tracking_uri(self.runs_root)
            kwargs = {"artifact_location": artifact_root(self.runs_root)} if uri.startswith("sqlite:") else {}
            if kwargs:
                Path(self.runs_root, "mlartifacts").mkdir(parents=True, exist_ok=True)
            try:
                exp_id = client.create_experiment(self.experiment, **kwargs)
            except Exception:  # created concurrently by another process
                exp_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        return mlflow, client, exp_id

    def start(self, run_name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        _, client, exp_id = self._client_and_experiment()
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        self._client = client
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k[:250], _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if not self.run_id or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i:i + 500])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.run_id or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in sorted(tags.items())]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, tags=items[i:i + 100])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.run_id:
            return
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if not self.run_id or not Path(folder).is_dir():
            return
        self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if not self.run_id:
            return
        self._client.set_terminated(self.run_id, status=status)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= MAX_PARAM_VALUE else s[: MAX_PARAM_VALUE - 3] + "..."


def get_run(runs_root: Path, run_id: str) -> dict[str, Any]:
    """Params, metrics, tags and status of one run (tests, reports)."""
    _mlflow(runs_root)
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    return {"params": dict(run.data.params), "metrics": dict(run.data.metrics), "tags": dict(run.data.tags),
            "status": run.info.status, "experiment_id": run.info.experiment_id, "artifact_uri": run.info.artifact_uri}


def list_artifacts(runs_root: Path, run_id: str, path: str | None = None) -> list[str]:
    _mlflow(runs_root)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out: list[str] = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out += list_artifacts(runs_root, run_id, item.path)
        else:
            out.append(item.path)
    return out


def search_runs(runs_root: Path, experiment: str | None = None, run_ids: list[str] | None = None,
                parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """Runs of an experiment (or children of a parent) as plain dicts."""
    _mlflow(runs_root)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
        exp_ids = [e.experiment_id for e in exps if e is not None]
        if not exp_ids:
            return []
        flt = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
        runs = client.search_runs(exp_ids, filter_string=flt, max_results=5000)
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "params": dict(r.data.params), "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}
            for r in runs]


def serve_ui(runs_root: Path, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run ``mlflow ui`` on the qflow store (blocks until interrupted)."""
    import subprocess
    import sys

    uri = tracking_uri(runs_root)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", artifact_root(runs_root)]
    print(f"MLflow UI: http://{host}:{port}  (store: {uri})", flush=True)
    return subprocess.call(cmd)
