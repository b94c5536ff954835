"""MLflow tracking: the only module that imports mlflow.

Default store: ``sqlite:///<runs>/mlflow.db`` with artifacts in
``<runs>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it (a team server).
One MLflow run per recipe run; a sweep is a parent run with nested runs.
Only the parent process writes (SQLite does not tolerate concurrent writers).

An unreachable store must not stall or lose a run: :func:`probe` checks a
server in a few seconds before the first call, MLflow's own HTTP retries are
capped, and a run whose tracking failed is queued in its run folder
(``mlflow-pending.json``, :meth:`Tracker.fail`); ``qflow sync``
(``qflow/engine/sync.py``) uploads it later from the run folder.
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
TERMINAL = ("FINISHED", "FAILED", "KILLED")

# MLflow retries an HTTP call 7 times with exponential backoff (about 4 minutes)
# and waits 120 s per request; a run must not stall that long on a dead server.
# Users can still choose their own values through the same variables.
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


# MLflow 3's UI opens an experiment in the view its kind names (tag ``mlflow.experimentKind``,
# the UI's ExperimentKind enum); with no kind it guesses the GenAI view (traces, sessions) for
# an experiment without training metrics, where a qflow run hides under "Evaluation runs".
# "custom_model_development" is the model-training view: runs table, charts, compare.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


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
        self.experiment_id: str | None = None

    @classmethod
    def null(cls) -> "Tracker":
        return cls(Path("."), "", enabled=False)

    def client_and_experiment(self):
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
        if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:   # a kind the user chose in the UI stays
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return mlflow, client, exp_id

    def start(self, run_name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = {**source_tags(tags.get("qflow.recipe") if tags else None), **(tags or {})}
        if self.run_dir is not None:
            tags.setdefault(RUN_DIR_TAG, self.run_dir.name)
        self._pending = {"experiment": self.experiment, "run_name": run_name, "tags": dict(tags),
                         "parent_run_id": parent_run_id, "started_at": time.time(), "pid": os.getpid()}
        problem = probe(tracking_uri(self.runs_root))
        if problem:
            raise TrackingUnavailable(problem)
        _, client, exp_id = self.client_and_experiment()
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        self._client = client
        self.run_id = run.info.run_id
        self.experiment_id = exp_id
        return self.run_id

    def attach(self, run_id: str) -> str:
        """Continue an existing run (``qflow sync`` completing an upload) instead of creating one."""
        _, client, exp_id = self.client_and_experiment()
        self._client = client
        self.run_id = client.get_run(run_id).info.run_id
        self.experiment_id = exp_id
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
        write_json(path, record)
        return path


def _git(folder: Path, *args: str) -> str | None:
    """One line of git's output in ``folder``, or None (no git, not a repository, slow)."""
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5,
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    out = done.stdout.strip()
    return out if done.returncode == 0 else None


def source_tags(recipe: str | None) -> dict[str, str]:
    """MLflow's standard source tags for a run of ``recipe``: who ran what, from which commit.

    ``mlflow.source.name`` is the recipe file, ``mlflow.source.type`` LOCAL, ``mlflow.user``
    the user, ``mlflow.source.git.commit``/``.branch``/``.repoURL`` the git repository the
    recipe file lives in (when it does; ``qflow.source.git.dirty`` says whether the recipe
    differs from that commit), and ``qflow.command`` the command line (the Python script's,
    for the API). Example: ``source_tags("recipes/llama-awq.yaml")["mlflow.source.git.commit"]``.
    """
    import getpass
    import shlex
    import sys

    try:
        user = getpass.getuser()
    except Exception:   # no login name in a container: getpass raises OSError or KeyError
        user = "unknown"
    tags = {"mlflow.source.type": "LOCAL", "mlflow.user": user, "qflow.command": shlex.join(sys.argv)[:5000]}
    if not recipe:
        return tags
    path = Path(recipe).resolve()
    tags["mlflow.source.name"] = str(path)
    commit = _git(path.parent, "rev-parse", "HEAD") if path.parent.is_dir() else None
    if commit:
        tags["mlflow.source.git.commit"] = commit
        branch = _git(path.parent, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = _git(path.parent, "config", "--get", "remote.origin.url")
        if remote:
            tags["mlflow.source.git.repoURL"] = remote
        status = _git(path.parent, "status", "--porcelain", "--", path.name)
        if status is not None:
            tags["qflow.source.git.dirty"] = "true" if status else "false"
    return tags


def _ui_root(base_url: str) -> str:
    """``http://host:port/`` for a server; empty for a link relative to the UI page itself."""
    return base_url.rstrip("/") + "/" if base_url else ""


def run_page(experiment_id: str, run_id: str, base_url: str = "") -> str:
    """The MLflow UI's page of one run, e.g. ``http://127.0.0.1:5000/#/experiments/1/runs/ab12...``."""
    return f"{_ui_root(base_url)}#/experiments/{experiment_id}/runs/{run_id}"


def compare_page(run_ids: list[str], experiment_ids: list[str], base_url: str = "") -> str:
    """The MLflow UI's compare page of runs (it opens on the parallel-coordinates plot)."""
    from urllib.parse import quote

    return (f"{_ui_root(base_url)}#/compare-runs?runs={quote(json.dumps(run_ids, separators=(',', ':')))}"
            f"&experiments={quote(json.dumps(experiment_ids, separators=(',', ':')))}")


def sweep_note(parent_id: str, experiment_id: str, points: list[dict[str, Any]], report_files: list[str]) -> str:
    """The description (``mlflow.note.content``, markdown) of a sweep's parent run: links to its points.

    Links are relative to the UI's address, so they work on any host and port: the compare
    page of the point runs (parallel coordinates of their params and metrics), and the Pareto
    plots and report logged under the parent's ``pareto/`` artifacts (``report_files``).
    """
    from urllib.parse import quote

    run_ids = [p["mlflow_run_id"] for p in points if p.get("mlflow_run_id")]
    lines = [f"Sweep of {len(points)} points ({sum(p.get('status') == 'ok' for p in points)} ok)."]
    if run_ids:
        lines.append(f"- [Parallel coordinates of the {len(run_ids)} point runs]"
                     f"({compare_page(run_ids, [experiment_id])})")
    for name in report_files:
        link = f"get-artifact?path={quote('pareto/' + name)}&run_uuid={parent_id}"
        if name.endswith(".png"):
            lines.append(f"- Pareto plot {name}: [open]({link})\n\n  ![{name}]({link})")
        elif name.endswith(".html"):
            lines.append(f"- [Pareto report]({link}) (also under Artifacts: pareto/{name})")
    return "\n".join(lines)


def find_run(runs_root: Path, run: str) -> tuple[str, str]:
    """``(experiment_id, run_id)`` of an MLflow run id, or of a run folder (its name or path, tag ``qflow.run_dir``)."""
    _mlflow(runs_root)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = Path(run).name
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if exp_ids:
        found = client.search_runs(exp_ids, filter_string=f"tags.`{RUN_DIR_TAG}` = '{name}'", max_results=1) \
            if "'" not in name else []
        if found:
            return found[0].info.experiment_id, found[0].info.run_id
    try:
        info = client.get_run(run).info
    except Exception:   # MLflow raises its own error types for an unknown or malformed id
        raise QflowError(f"no MLflow run '{run}' in {tracking_uri(runs_root)}", where="qflow ui --open",
                         fix="pass a run id (qflow run --json prints mlflow_run_id) or a run folder under "
                             f"{Path(runs_root) / 'runs'}, with the same --runs-dir") from None
    return info.experiment_id, info.run_id


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


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
