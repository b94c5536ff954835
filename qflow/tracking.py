"""MLflow tracking: the only module that imports mlflow.

Default store: ``sqlite:///<runs>/mlflow.db`` with artifacts in
``<runs>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it (a team server).
One MLflow run per recipe run; a sweep is a parent run with nested runs.
Only the parent process writes (SQLite does not tolerate concurrent writers).

An unreachable store must not stall or lose a run: :func:`probe` checks a
server in a few seconds before the first call, MLflow's own HTTP retries are
capped, and a run whose tracking failed is queued in its run folder
(``mlflow-pending.json``); :func:`sync_pending` (``qflow sync``) uploads it
later from the run folder (resolved recipe, ``summary.json``, ``artifacts/``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .errors import QflowError

log = logging.getLogger("qflow.tracking")

MAX_PARAM_VALUE = 6000
PROBE_TIMEOUT_SECONDS = 3.0
PENDING_FILE = "mlflow-pending.json"   # in a run folder: this run still has to reach MLflow
SYNCED_FILE = "mlflow-run.json"        # in a run folder: `qflow sync` uploaded it (run id, store)
RUN_DIR_TAG = "qflow.run_dir"          # run folder name; `qflow sync` finds an uploaded run by it
_TERMINAL = ("FINISHED", "FAILED", "KILLED")

# MLflow retries an HTTP call 7 times with exponential backoff (about 4 minutes)
# and waits 120 s per request; a run must not stall that long on a dead server.
# Users can still choose their own values through the same variables.
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingUnavailable(QflowError):
    """The MLflow tracking store cannot be reached."""

# mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ, so the
# user's own setting must be read before qflow ever calls it.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(runs_root: Path) -> str:
    return _USER_TRACKING_URI or f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def artifact_root(runs_root: Path) -> str:
    return (runs_root / "mlartifacts").resolve().as_uri()


def probe(uri: str, timeout_seconds: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """Why the tracking server at ``uri`` cannot be reached, or None when it answers a TCP connect.

    Only http(s) stores are probed; a local store (sqlite, file) fails, if at
    all, on its first call. Example: ``probe("http://127.0.0.1:9")`` ->
    ``"MLflow store http://127.0.0.1:9 is unreachable (Connection refused)"``.
    """
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_seconds):
            return None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return f"MLflow store {uri} is unreachable ({why})"


def _mlflow(runs_root: Path):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for var, value in _HTTP_LIMITS.items():
        os.environ.setdefault(var, value)
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
    """Writes one MLflow run; ``Tracker.null()`` writes nothing (``--no-track``).

    With a ``run_dir``, :meth:`fail` queues the run there for ``qflow sync``::

        tracker = Tracker(runs_root, "tiny", run_dir=run_dir)
        try:
            tracker.start(run_dir.name)
        except Exception as exc:
            print(tracker.fail(exc))   # warning line; mlflow-pending.json written
    """

    def __init__(self, runs_root: Path, experiment: str, *, enabled: bool = True, run_dir: Path | None = None):
        self.runs_root = Path(runs_root)
        self.experiment = experiment
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_id: str | None = None
        self.unavailable: str | None = None   # why MLflow failed; later calls are skipped by the caller
        self._pending: dict[str, Any] = {}
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
        tags = dict(tags or {})
        if self.run_dir is not None:
            tags.setdefault(RUN_DIR_TAG, self.run_dir.name)
        self._pending = {"experiment": self.experiment, "run_name": run_name, "tags": dict(tags),
                         "parent_run_id": parent_run_id, "started_at": time.time(), "pid": os.getpid()}
        problem = probe(tracking_uri(self.runs_root))
        if problem:
            raise TrackingUnavailable(problem)
        _, client, exp_id = self._client_and_experiment()
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        self._client = client
        self.run_id = run.info.run_id
        return self.run_id

    def attach(self, run_id: str) -> str:
        """Continue an existing run (``qflow sync`` completing an upload) instead of creating one."""
        _, client, _ = self._client_and_experiment()
        self._client = client
        self.run_id = client.get_run(run_id).info.run_id
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

    def fail(self, exc: BaseException) -> str:
        """Record that MLflow failed, queue the run (with a ``run_dir``), and return one warning line."""
        if isinstance(exc, TrackingUnavailable):
            reason = exc.what
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            reason = f"MLflow tracking failed ({type(exc).__name__}: {first})"
        self.unavailable = reason
        if self.run_dir is None:
            return f"warning: {reason}; the run continues untracked"
        pending = self.queue(reason=reason)
        return (f"warning: {reason}; the run continues untracked and is queued in {pending}; "
                f"`qflow sync` uploads it once the store is reachable")

    def queue(self, *, tags: dict[str, Any] | None = None, **fields: Any) -> Path:
        """Write (or update) ``<run_dir>/mlflow-pending.json``: what ``qflow sync`` needs besides the run folder."""
        assert self.run_dir is not None, "queueing needs the run folder"
        record = {"experiment": self.experiment, "status": "RUNNING", "tags": {}, **self._pending,
                  "uri": tracking_uri(self.runs_root), "run_id": self.run_id, **fields}
        record["tags"] = {**record["tags"], **{k: str(v) for k, v in (tags or {}).items()}}
        self._pending = record
        path = self.run_dir / PENDING_FILE
        _write_json(path, record)
        return path


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


def _alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except OSError:
        return False


def pending_runs(runs_root: Path) -> list[Path]:
    """Run and sweep folders queued for ``qflow sync``, oldest first within each kind."""
    root = Path(runs_root)
    return [p.parent for kind in ("runs", "sweeps") for p in sorted((root / kind).glob(f"*/{PENDING_FILE}"))]


def sync_pending(runs_root: Path) -> list[dict[str, Any]]:
    """Upload every queued run folder to the tracking store; one dict per run folder.

    Idempotent: the MLflow run carries the tag ``qflow.run_dir`` and its id is
    kept in ``<run_dir>/mlflow-run.json``, so a second sync (or a sync that was
    interrupted after creating the run) reuses the run instead of creating
    another. Example: ``sync_pending(Path("runs"))`` ->
    ``[{"run_dir": ..., "run_id": "ab12...", "status": "uploaded", ...}]``.
    """
    runs_root = Path(runs_root)
    folders = pending_runs(runs_root)
    if not folders:
        return []
    uri = tracking_uri(runs_root)
    problem = probe(uri)
    if problem:
        raise TrackingUnavailable(f"{problem}; {len(folders)} queued run(s) stay queued", where="qflow sync",
                                  fix="start the tracking server (or point MLFLOW_TRACKING_URI at a reachable "
                                      "store) and run `qflow sync` again")
    out = []
    for run_dir in folders:
        record = json.loads((run_dir / PENDING_FILE).read_text())
        if record.get("status") not in _TERMINAL and _alive(record.get("pid")):
            out.append({"run_dir": str(run_dir), "status": "skipped", "reason": f"still running (pid {record['pid']})"})
            continue
        try:
            sync = _sync_sweep if record.get("kind") == "sweep" else _sync_one
            out.append(sync(runs_root, run_dir, record, uri))
        except Exception as exc:  # one bad folder must not stop the others; it stays queued
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            out.append({"run_dir": str(run_dir), "status": "failed", "reason": f"{type(exc).__name__}: {first}"})
    return out


def _existing_run(client, exp_id: str, run_dir: Path, record: dict[str, Any]) -> str | None:
    candidates = [record.get("run_id")]
    if (run_dir / SYNCED_FILE).is_file():
        candidates.append(json.loads((run_dir / SYNCED_FILE).read_text()).get("run_id"))
    for run_id in filter(None, candidates):
        try:
            return client.get_run(run_id).info.run_id
        except Exception:  # created in another store (the one that went down)
            continue
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir.name}'", max_results=1)
    return found[0].info.run_id if found else None


def _sync_one(runs_root: Path, run_dir: Path, record: dict[str, Any], uri: str) -> dict[str, Any]:
    import yaml

    from .engine.cache import flatten

    tracker = Tracker(runs_root, record["experiment"], run_dir=run_dir)
    _, client, exp_id = tracker._client_and_experiment()
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    tags = {**record.get("tags", {}), RUN_DIR_TAG: run_dir.name}
    run_id = _existing_run(client, exp_id, run_dir, record)
    reused = run_id is not None
    if run_id is None:
        create_tags = dict(tags)
        if record.get("parent_run_id"):
            create_tags["mlflow.parentRunId"] = record["parent_run_id"]
        started = record.get("started_at")
        run_id = client.create_run(exp_id, run_name=record.get("run_name") or run_dir.name, tags=create_tags,
                                   start_time=int(started * 1000) if started else None).info.run_id
    tracker.run_id, tracker._client = run_id, client
    resolved = run_dir / "recipe.resolved.yaml"
    params = flatten(yaml.safe_load(resolved.read_text()) or {}) if resolved.is_file() else {}
    tracker.log_params(params)
    metrics = (summary or {}).get("metrics", {})
    tracker.log_metrics(metrics)
    tracker.set_tags(tags)
    artifacts = []
    for path in (resolved, summary_path):
        if path.is_file():
            tracker.log_artifact(path)
            artifacts.append(path.name)
    if (run_dir / "artifacts").is_dir():
        tracker.log_artifacts(run_dir / "artifacts", "artifacts")
        artifacts.append("artifacts/")
    status = record.get("status")
    if status not in _TERMINAL:  # the process died before it could say (SIGKILL, power loss)
        status = ("FINISHED" if summary["status"] == "ok" else "FAILED") if summary else "KILLED"
    finished = (summary or {}).get("finished_at")
    client.set_terminated(run_id, status=status, end_time=int(finished * 1000) if finished else None)
    _write_json(run_dir / SYNCED_FILE, {"run_id": run_id, "experiment": record["experiment"], "uri": uri,
                                        "synced_at": time.time()})
    (run_dir / PENDING_FILE).unlink()  # qflow wrote it; the run has reached the store
    return {"run_dir": str(run_dir), "run_id": run_id, "experiment": record["experiment"], "status": "uploaded",
            "kind": "run", "mlflow_status": status, "reused_run": reused, "params": len(params), "metrics": len(metrics),
            "artifacts": artifacts}


def _sync_sweep(runs_root: Path, sweep_dir: Path, record: dict[str, Any], uri: str) -> dict[str, Any]:
    """Replay the sweep's MLflow logging from its folder, reusing the parent and points already uploaded."""
    from .engine.sweep import load_points, log_sweep

    _, client, exp_id = Tracker(runs_root, record["experiment"])._client_and_experiment()
    parent = _existing_run(client, exp_id, sweep_dir, record)
    points: dict[int, tuple[str, str]] = {}
    if parent:
        for run in client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000):
            job = run.data.tags.get("qflow.sweep.job")
            if job is not None:
                points[int(job)] = (run.info.run_id, run.info.status)
    found = load_points(sweep_dir)
    parent_id = log_sweep(runs_root, sweep_dir, Path(record["recipe"]), record.get("overrides", []),
                          record.get("sweep", {}), found, existing={"parent": parent, "points": points})
    if parent_id is None:  # log_sweep printed the failure and left the sweep queued
        return {"run_dir": str(sweep_dir), "status": "failed", "reason": "MLflow failed during the upload"}
    _write_json(sweep_dir / SYNCED_FILE, {"run_id": parent_id, "experiment": record["experiment"], "uri": uri,
                                          "synced_at": time.time()})
    (sweep_dir / PENDING_FILE).unlink()  # qflow wrote it; the sweep has reached the store
    return {"run_dir": str(sweep_dir), "run_id": parent_id, "experiment": record["experiment"], "status": "uploaded",
            "kind": "sweep", "mlflow_status": record.get("status"), "reused_run": parent is not None,
            "points": len(found), "points_reused": sum(1 for pt in found if pt["job"] in points)}


def serve_ui(runs_root: Path, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run ``mlflow ui`` on the qflow store (blocks until interrupted).

    The server runs in its own process group (it spawns uvicorn workers); on
    exit, SIGINT or SIGTERM the whole group is terminated, so nothing keeps
    the port. Returns the server's exit status, or 128 + signum when stopped.
    """
    import signal
    import subprocess
    import sys

    from .interrupts import Terminated, sigterm_raises

    uri = tracking_uri(runs_root)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", artifact_root(runs_root)]
    print(f"MLflow UI: http://{host}:{port}  (store: {uri})", flush=True)
    with sigterm_raises():
        server = subprocess.Popen(cmd, start_new_session=True)
        try:
            return server.wait()
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except Terminated as exc:
            return exc.exit_status
        finally:
            # a second Ctrl-C or SIGTERM must not cut the shutdown short and leave the server behind
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                _stop_group(server)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


def _stop_group(proc, grace_seconds: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL what is left after ``grace_seconds``."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            break
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so the group can empty
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.poll()
