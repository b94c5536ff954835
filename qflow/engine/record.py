"""Record a run in MLflow through ``qflow.tracking``, never losing the run when MLflow fails.

    tracker = make_tracker(True, Path("runs"), "llama-awq", run_dir)
    run_id = safe(tracker.start, run_name=run_dir.name, tags={}, parent_run_id=None)
    ...
    finish_tracking(tracker, result, run_dir)     # or end_interrupted(tracker, "KILLED")
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..tracking import Tracker

if TYPE_CHECKING:
    from .runner import RunResult


def make_tracker(track: bool, runs_root: Path, experiment: str, run_dir: Path) -> Tracker:
    """The run's tracker; a null one (every call a no-op) with ``track`` off (--no-track, sweep points)."""
    if not track:
        return Tracker.null()
    return Tracker(runs_root, experiment, run_dir=run_dir)


def safe(fn, *args, **kwargs):
    """Tracking must never lose a run: the first MLflow failure prints one warning and queues the
    run for `qflow sync` (``Tracker.fail``); later calls are skipped instead of each waiting on a
    store that is down."""
    tracker = getattr(fn, "__self__", None)
    if getattr(tracker, "unavailable", None):
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        print(tracker.fail(exc), file=sys.stderr, flush=True)
        return None


def end_interrupted(tracker: Tracker, status: str) -> None:
    """An interrupted run ends as ``status`` in MLflow, or in its queue entry when MLflow is down."""
    if not tracker.enabled:
        return
    if tracker.unavailable:
        tracker.queue(status=status)
    else:
        safe(tracker.end, status)
        if tracker.unavailable:  # the end call itself failed
            tracker.queue(status=status)


def finish_tracking(tracker: Tracker, result: RunResult, run_dir: Path) -> None:
    """Metrics, tags (stage keys and statuses, gates), the resolved recipe, summary and reports, then
    the run's end status; when MLflow is down, the run is queued for `qflow sync` instead."""
    if not tracker.enabled:
        return
    tags = {"qflow.status": result.status}
    for sid, r in result.stages.items():
        tags[f"qflow.stage.{sid}.key"] = r.key or ""
        tags[f"qflow.stage.{sid}.status"] = r.status
        tags.update(r.tags)
    for g in result.gates:
        tags[f"qflow.gate.{g['stage']}.{g['metric']}"] = "passed" if g["passed"] else f"failed: {g.get('reason')}"
    if any(not g["passed"] for g in result.gates):
        tags["qflow.gates"] = "failed"
    safe(tracker.log_metrics, result.metrics)
    for sid, r in result.stages.items():   # curves: one metric per name, a value per step
        for name, points in getattr(r, "curves", {}).items():
            for step, value in points:
                safe(tracker.log_metrics, {f"{sid}/{name}": value}, step)
    safe(tracker.set_tags, tags)
    safe(tracker.log_artifact, run_dir / "recipe.resolved.yaml")
    safe(tracker.log_artifact, run_dir / "summary.json")
    safe(tracker.log_artifacts, run_dir / "artifacts", "artifacts")
    status = "FINISHED" if result.status == "ok" else "FAILED"
    safe(tracker.end, status)
    if tracker.unavailable:  # down at the start or failed on the way: `qflow sync` uploads the folder later
        tracker.queue(tags=tags, status=status)
