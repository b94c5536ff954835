"""``qflow sync``: upload the runs and sweeps queued while the MLflow store was unreachable.

A queued folder holds ``mlflow-pending.json`` (written by ``Tracker.fail`` /
``Tracker.queue`` in ``qflow/tracking.py``); everything else comes from the
folder itself: params from ``recipe.resolved.yaml``, metrics from
``summary.json``, artifacts from ``artifacts/``; a sweep is replayed from its
points (``engine/sweep.py: log_sweep``)::

    for row in sync_pending(Path("runs")):
        print(row["run_dir"], row["status"], row.get("run_id"))
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..tracking import (PENDING_FILE, RUN_DIR_TAG, SYNCED_FILE, TERMINAL, Tracker, TrackingUnavailable, probe,
                       tracking_uri, write_json)

if TYPE_CHECKING:
    from .sweep import SweepReport


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


def sync_pending(runs_root: Path, report: "SweepReport | None" = None) -> list[dict[str, Any]]:
    """Upload every queued run and sweep folder to the tracking store; one dict per folder.

    ``report`` writes a sweep's report (as in ``run_sweep``) before it is uploaded.

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
        if record.get("status") not in TERMINAL and _alive(record.get("pid")):
            out.append({"run_dir": str(run_dir), "status": "skipped", "reason": f"still running (pid {record['pid']})"})
            continue
        try:
            if record.get("kind") == "sweep":
                out.append(_sync_sweep(runs_root, run_dir, record, uri, report))
            else:
                out.append(_sync_one(runs_root, run_dir, record, uri))
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

    from .cache import flatten

    tracker = Tracker(runs_root, record["experiment"], run_dir=run_dir)
    _, client, exp_id = tracker.client_and_experiment()
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
    if status not in TERMINAL:  # the process died before it could say (SIGKILL, power loss)
        status = ("FINISHED" if summary["status"] == "ok" else "FAILED") if summary else "KILLED"
    finished = (summary or {}).get("finished_at")
    client.set_terminated(run_id, status=status, end_time=int(finished * 1000) if finished else None)
    write_json(run_dir / SYNCED_FILE, {"run_id": run_id, "experiment": record["experiment"], "uri": uri,
                                        "synced_at": time.time()})
    (run_dir / PENDING_FILE).unlink()  # qflow wrote it; the run has reached the store
    return {"run_dir": str(run_dir), "run_id": run_id, "experiment": record["experiment"], "status": "uploaded",
            "kind": "run", "mlflow_status": status, "reused_run": reused, "params": len(params), "metrics": len(metrics),
            "artifacts": artifacts}


def _sync_sweep(runs_root: Path, sweep_dir: Path, record: dict[str, Any], uri: str,
                report: "SweepReport | None") -> dict[str, Any]:
    """Replay the sweep's MLflow logging from its folder, reusing the parent and points already uploaded."""
    from .sweep import load_points, log_sweep

    _, client, exp_id = Tracker(runs_root, record["experiment"]).client_and_experiment()
    parent = _existing_run(client, exp_id, sweep_dir, record)
    points: dict[int, tuple[str, str]] = {}
    if parent:
        for run in client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000):
            job = run.data.tags.get("qflow.sweep.job")
            if job is not None:
                points[int(job)] = (run.info.run_id, run.info.status)
    found = load_points(sweep_dir)
    parent_id = log_sweep(runs_root, sweep_dir, Path(record["recipe"]), record.get("overrides", []),
                          record.get("sweep", {}), found, existing={"parent": parent, "points": points},
                          report=report)
    if parent_id is None:  # log_sweep printed the failure and left the sweep queued
        return {"run_dir": str(sweep_dir), "status": "failed", "reason": "MLflow failed during the upload"}
    write_json(sweep_dir / SYNCED_FILE, {"run_id": parent_id, "experiment": record["experiment"], "uri": uri,
                                          "synced_at": time.time()})
    (sweep_dir / PENDING_FILE).unlink()  # qflow wrote it; the sweep has reached the store
    return {"run_dir": str(sweep_dir), "run_id": parent_id, "experiment": record["experiment"], "status": "uploaded",
            "kind": "sweep", "mlflow_status": record.get("status"), "reused_run": parent is not None,
            "points": len(found), "points_reused": sum(1 for pt in found if pt["job"] in points)}
