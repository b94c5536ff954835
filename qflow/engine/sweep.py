"""Sweeps through Hydra's multirun: its override grammar, sweepers and launchers.

``qflow run -m RECIPE params.bits=3,4 params.group_size=32,64`` runs Hydra's
multirun with the recipe as the primary config and :func:`_task` as the task
function. Each point executes the plan with tracking off and writes
``<sweep_dir>/<job>/point.json``; the parent process then writes MLflow (a
parent run and one nested run per point), since only one process may write
to a SQLite store. Points share the content-addressed cache, so upstream
stages with equal keys run once (the others wait on the key's lock, then hit).

Launchers: the default runs points one after another; ``-j N`` uses the joblib
launcher (N worker processes, capped by the memory estimate); any
``hydra/launcher=...`` override (``ray``, ``submitit_slurm``) is passed through.
Sweepers: ``hydra/sweeper=optuna`` with the recipe's ``sweep.objective``.
The caller may pass ``report(points, folder)``, which writes a report of the
finished points into ``folder`` (the CLI passes the Pareto report of
``qflow.evaluation``); it is logged with the parent run.

A recipe may declare its sweep::

    sweep:
      params: {params.bits: "3,4", params.group_size: "32,64"}   # Hydra sweep syntax
      objective: evaluate/kl_mean          # what optuna minimizes (or maximizes)
      direction: minimize
      constraints: ["evaluate/bpw_quantized<=4.6"]
      sweeper: optuna                      # optional: hydra-optuna-sweeper (TPE) instead of the grid
      n_trials: 6
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..errors import RecipeError
from ..specs import parse_constraint

SweepReport = Callable[[list[dict[str, Any]], Path], "Path | None"]   # (points, folder) -> the report folder


def constraint_ok(metrics: dict[str, float], constraint: str) -> bool:
    name, op, bound = parse_constraint(constraint, where="sweep.constraints")
    if name not in metrics:
        return False
    v = metrics[name]
    return {"<=": v <= bound, ">=": v >= bound, "<": v < bound, ">": v > bound, "==": v == bound}[op]


class SweepTask:
    """The Hydra task function: one point = one plan execution (picklable for launchers)."""

    def __init__(self, recipe: str, opts_dict: dict[str, Any], sweep_dir: str, sweep_cfg: dict[str, Any]):
        self.recipe = recipe
        self.opts_dict = opts_dict
        self.sweep_dir = sweep_dir
        self.sweep_cfg = sweep_cfg

    def __call__(self, cfg) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from ..recipe.safety import install_env_guard
        from .runner import RunOptions, execute, plan_from_config

        install_env_guard(self.opts_dict.get("allow_env") or [])   # also in launcher worker processes
        hc = HydraConfig.get()
        job = str(hc.job.num)
        # launcher/sweeper choices are not part of a point's identity
        overrides = [o for o in hc.overrides.task if not o.lstrip("+~").startswith(("hydra", "lib/launcher"))]
        point_dir = Path(self.sweep_dir) / job
        point_dir.mkdir(parents=True, exist_ok=True)
        (point_dir / "status.json").write_text(json.dumps({"status": "running", "overrides": overrides,
                                                           "pid": os.getpid(), "started": time.time()}))
        opts = RunOptions(**{**self.opts_dict, "runs_root": Path(self.opts_dict["runs_root"]),
                             "track": False, "quiet": True, "run_name": f"{Path(self.sweep_dir).name}-{job}"})
        try:
            plan = plan_from_config(OmegaConf.to_container(cfg, resolve=True), self.recipe)
            result = execute(plan, opts, overrides)
            point = {**result.to_json(), "overrides": overrides, "job": int(job), "name": result.name}
        except Exception as exc:  # a bad point is reported, the sweep goes on
            point = {"run_dir": "", "mlflow_run_id": None, "status": "failed", "stages": {}, "metrics": {},
                     "gates": [], "overrides": overrides, "job": int(job), "error": str(exc)}
        (point_dir / "point.json").write_text(json.dumps(point, default=str))
        (point_dir / "status.json").write_text(json.dumps({"status": "done" if point["status"] == "ok" else "failed",
                                                           "overrides": overrides, "finished": time.time()}))
        return self._objective(point)

    def _objective(self, point: dict[str, Any]) -> float | None:
        objective = self.sweep_cfg.get("objective")
        if not objective:
            return None
        maximize = self.sweep_cfg.get("direction", "minimize") == "maximize"
        worst = float("-inf") if maximize else float("inf")
        metrics = point.get("metrics", {})
        if point.get("status") != "ok" or objective not in metrics:
            return worst
        if not all(constraint_ok(metrics, c) for c in self.sweep_cfg.get("constraints", [])):
            return worst
        return float(metrics[objective])


def _declared_sweep(recipe: Path) -> dict[str, Any]:
    """The recipe's ``sweep:`` block, validated (a clean error names the bad field)."""
    from pydantic import ValidationError

    from ..recipe.compose import _yaml_preflight
    from ..recipe.schema import SweepSpec
    from ..recipe.validate import describe_errors

    sweep = _yaml_preflight(recipe).get("sweep") or {}
    try:
        spec = SweepSpec.model_validate(sweep)
    except ValidationError as exc:
        what, _ = describe_errors(exc, ("sweep",), lambda loc: list(SweepSpec.model_fields) if len(loc) == 1 else [])
        raise RecipeError(f"the sweep block is malformed: {what}",
                          where=f"{recipe}: sweep",
                          fix="write sweep: {params: {params.bits: '3,4'}, objective: evaluate/kl_mean, "
                              "direction: minimize, constraints: ['evaluate/bpw_quantized<=4'], sweeper: optuna, "
                              "n_trials: 6}") from None
    return spec.model_dump(exclude_none=True, exclude_unset=True)


def _memory_cap(jobs: int, plan_estimate_bytes: int | None) -> int:
    if jobs <= 1 or not plan_estimate_bytes:
        return jobs
    import psutil

    avail = psutil.virtual_memory().available
    return max(1, min(jobs, int(avail * 0.8 // plan_estimate_bytes)))


def estimate_point_bytes(recipe: str, overrides: list[str], opts) -> int | None:
    """Peak-memory estimate of one point: the largest stage estimate of the first point's plan."""
    from .runner import load_plan

    first = [o.split(",")[0] if "=" in o and "," in o and "(" not in o else o for o in overrides]
    try:
        plan = load_plan(recipe, first, opts)
    except Exception:
        return None
    from .cache import CacheStore
    from .keys import compute_keys, environment, resolve_device
    from .preflight import estimate_peaks

    store = CacheStore(Path(opts.runs_root) / "cache")
    keys = compute_keys(plan, store, environment(resolve_device(plan.recipe.device)))
    known = [e for e in estimate_peaks(plan, store, keys).values() if e]
    return max(known) if known else 2 * 2**30  # unknown until the model stage has run once


def run_sweep(recipe: str, overrides: list[str], opts, *, as_json: bool = False, jobs: int = 1,
              objective: str | None = None, constraints: list[str] | None = None,
              report: SweepReport | None = None) -> int:
    """:func:`sweep`, printed (one JSON object with ``as_json``); the exit status (0: every point ok)."""
    out = sweep(recipe, overrides, opts, jobs=jobs, objective=objective, constraints=constraints, report=report)
    if as_json:
        print(json.dumps(out, default=str))
    else:
        _print_points(out["points"], out.get("best"), Path(out["sweep_dir"]), out["mlflow_parent_run_id"])
    return 0 if out["points"] and all(p["status"] == "ok" for p in out["points"]) else 1


def sweep(recipe: str, overrides: list[str], opts, *, jobs: int = 1, objective: str | None = None,
          constraints: list[str] | None = None, report: SweepReport | None = None) -> dict[str, Any]:
    """Run a sweep; its result (``sweep_dir``, ``mlflow_parent_run_id``, ``points``, ``best``), also in
    ``<sweep_dir>/result.json``."""
    import hydra

    from ..recipe.compose import _yaml_preflight, audit_multirun, recipe_file, search_path, searchpath_override
    from ..recipe.safety import check_untrusted, install_env_guard

    install_env_guard(opts.allow_env or [])
    path = recipe_file(recipe)
    check_untrusted(_yaml_preflight(path), str(path), primary=True)
    sweep_cfg = _declared_sweep(path)
    overrides = list(overrides)
    declared = sweep_cfg.get("params") or {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    overrides += [f"{k}={v}" for k, v in declared.items() if k not in given]
    sweeper = sweep_cfg.get("sweeper")
    if sweeper and not any(o.startswith("hydra/sweeper=") for o in overrides):
        overrides.append(f"hydra/sweeper={sweeper}")
    if sweep_cfg.get("n_trials") and not any(o.startswith("hydra.sweeper.n_trials=") for o in overrides):
        overrides.append(f"hydra.sweeper.n_trials={int(sweep_cfg['n_trials'])}")
    sweep_cfg = {k: v for k, v in sweep_cfg.items() if k not in ("params", "sweeper", "n_trials")}
    if objective:
        name, _, direction = objective.partition(":")
        sweep_cfg["objective"] = name
        sweep_cfg["direction"] = {"max": "maximize", "min": "minimize", "": sweep_cfg.get("direction", "minimize"),
                                  "maximize": "maximize", "minimize": "minimize"}.get(direction, direction)
    if constraints:
        sweep_cfg["constraints"] = list(sweep_cfg.get("constraints", [])) + list(constraints)
    for c in sweep_cfg.get("constraints", []):
        parse_constraint(c, where="sweep.constraints")
    if sweep_cfg.get("direction", "minimize") not in ("minimize", "maximize"):
        raise RecipeError(f"unknown sweep direction {sweep_cfg['direction']!r}", where=f"{recipe}: sweep.direction",
                          fix="use minimize or maximize (or --objective METRIC:min|max)")
    if any(o.startswith("hydra/sweeper=optuna") for o in overrides) and not sweep_cfg.get("objective"):
        raise RecipeError("an Optuna sweep needs an objective", where=f"{recipe}: sweep.objective",
                          fix="pass --objective evaluate/kl_mean (or declare sweep.objective in the recipe)")

    runs_root = Path(opts.runs_root).resolve()
    name = path.stem
    sweep_dir = runs_root / "sweeps" / f"{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}-{name}"
    sweep_dir.mkdir(parents=True)
    has_launcher = any(o.startswith("hydra/launcher=") for o in overrides)
    effective_jobs = _memory_cap(jobs, estimate_point_bytes(recipe, overrides, opts) if jobs > 1 else None)
    argv = ["qflow", "--multirun", *overrides,
            f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}",
            "hydra.job.chdir=False", "hydra/job_logging=none", "hydra/hydra_logging=none",
            "hydra.output_subdir=null"]
    sp = search_path(list(opts.libraries or []), runs_root / "cache", _yaml_preflight(path))
    argv.append(searchpath_override(sp))
    if effective_jobs > 1 and not has_launcher:
        argv += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={effective_jobs}"]
    if any(o.startswith("hydra/sweeper=optuna") for o in overrides) and sweep_cfg.get("objective"):
        argv.append(f"hydra.sweeper.direction={sweep_cfg.get('direction', 'minimize')}")
    audit_multirun(path, argv[2:])   # nothing in the recipe or its libraries may run code (recipe/safety.py)
    opts_dict = dict(vars(opts))
    opts_dict["runs_root"] = str(runs_root)
    opts_dict["parent_run_id"] = None
    task = SweepTask(str(path), opts_dict, str(sweep_dir), sweep_cfg)
    (sweep_dir / "sweep.json").write_text(json.dumps({"recipe": str(path), "overrides": overrides,
                                                      "jobs": effective_jobs, "sweep": sweep_cfg,
                                                      "started": time.time()}, indent=1))
    _say(opts, f"sweep {sweep_dir.name}: {' '.join(overrides)}  (jobs {effective_jobs})")
    old_argv = sys.argv
    sys.argv = argv
    try:
        hydra.main(config_path=str(path.parent.resolve()), config_name=path.stem, version_base=None)(task)()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RecipeError(f"the sweep could not start (Hydra exited with {exc.code}); see the message above",
                              where=recipe, fix="check the sweep overrides (key=a,b  key=range(1,4)  key=choice(a,b))") from None
    finally:
        sys.argv = old_argv
    return _finish(sweep_dir, path, overrides, sweep_cfg, opts, report)


def load_points(sweep_dir: Path) -> list[dict[str, Any]]:
    points = []
    for p in sorted(sweep_dir.glob("*/point.json"), key=lambda p: int(p.parent.name)):
        points.append(json.loads(p.read_text()))
    return points


def _finish(sweep_dir: Path, recipe: Path, overrides: list[str], sweep_cfg: dict[str, Any], opts,
            report: SweepReport | None) -> dict[str, Any]:
    points = load_points(sweep_dir)
    _write_table(points, sweep_dir / "summary.csv")
    parent_id = log_sweep(Path(opts.runs_root), sweep_dir, recipe, overrides, sweep_cfg, points,
                          report=report) if opts.track else None
    out = {"sweep_dir": str(sweep_dir), "mlflow_parent_run_id": parent_id, "points": points}
    best = best_point(points, sweep_cfg)
    if best is not None:
        out["best"] = {"job": best["job"], "overrides": best["overrides"], "objective": sweep_cfg.get("objective"),
                       "value": best["metrics"].get(sweep_cfg.get("objective"))}
    (sweep_dir / "result.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def best_point(points: list[dict[str, Any]], sweep_cfg: dict[str, Any]) -> dict[str, Any] | None:
    objective = sweep_cfg.get("objective")
    if not objective:
        return None
    ok = [p for p in points if p["status"] == "ok" and objective in p["metrics"]
          and all(constraint_ok(p["metrics"], c) for c in sweep_cfg.get("constraints", []))]
    if not ok:
        return None
    sign = -1 if sweep_cfg.get("direction", "minimize") == "maximize" else 1
    return min(ok, key=lambda p: sign * p["metrics"][objective])


def log_sweep(runs_root: Path, sweep_dir: Path, recipe: Path, overrides: list[str], sweep_cfg: dict[str, Any],
              points: list[dict[str, Any]], existing: dict[str, Any] | None = None,
              report: SweepReport | None = None) -> str | None:
    """Write a finished sweep to MLflow: a parent run, one nested run per point and ``report``'s folder
    (written into ``<sweep_dir>/pareto``, logged as ``pareto/``); the parent's id.

    The first MLflow failure prints one warning, skips the remaining calls and
    queues the sweep in ``<sweep_dir>/mlflow-pending.json``; ``qflow sync`` calls
    this again with ``existing`` (``{"parent": run id, "points": {job: (run id,
    status)}}``) so that nothing already uploaded is created twice. An interrupt
    ends the parent run as KILLED. Returns None when the sweep went untracked.
    """
    from ..tracking import Tracker

    existing = existing or {}
    tracker = Tracker(runs_root, recipe.stem, run_dir=sweep_dir)
    status = "FINISHED" if points and all(p["status"] == "ok" for p in points) else "FAILED"
    try:
        if existing.get("parent"):
            parent_id = _safe(tracker.attach, existing["parent"])
        else:
            parent_id = _safe(tracker.start, f"sweep-{sweep_dir.name}",
                              {"qflow.sweep": "parent", "qflow.recipe": str(recipe), "qflow.sweep_dir": str(sweep_dir)})
        _safe(tracker.log_params, {"sweep.overrides": " ".join(overrides), **{f"sweep.{k}": v for k, v in sweep_cfg.items()}})
        for pt in points:
            _log_point(tracker, recipe, pt, parent_id, existing.get("points", {}).get(pt["job"]))
        _safe(tracker.log_artifact, sweep_dir / "summary.csv")
        _safe(tracker.log_artifact, sweep_dir / "sweep.json")
        best = best_point(points, sweep_cfg)
        if best is not None:
            _safe(tracker.set_tags, {"qflow.sweep.best_job": best["job"], "qflow.sweep.best_overrides": " ".join(best["overrides"])})
        folder = None
        if report is not None and tracker.run_id and not tracker.unavailable:
            folder = report(points, sweep_dir / "pareto")
            if folder:
                _safe(tracker.log_artifacts, folder, "pareto")
        if parent_id and not tracker.unavailable:   # the parent links to its points and their plots
            from ..tracking import sweep_note

            shown = sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".png", ".html")) if folder else []
            _safe(tracker.set_tags, {"mlflow.note.content": sweep_note(parent_id, tracker.experiment_id, points, shown)})
        _safe(tracker.end, status)
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        _safe(tracker.end, status)
        _queue_if_down(tracker, recipe, overrides, sweep_cfg, status)
        raise
    if _queue_if_down(tracker, recipe, overrides, sweep_cfg, status):
        return None
    return parent_id


def _queue_if_down(tracker, recipe: Path, overrides: list[str], sweep_cfg: dict[str, Any], status: str) -> bool:
    """When MLflow failed, record what `qflow sync` needs to replay :func:`log_sweep` (the points are on disk)."""
    if not tracker.unavailable:
        return False
    tracker.queue(kind="sweep", status=status, recipe=str(recipe), overrides=list(overrides), sweep=sweep_cfg)
    return True


def _log_point(parent, recipe: Path, pt: dict[str, Any], parent_id: str | None,
               existing: tuple[str, str] | None = None) -> None:
    """One nested run per point; a point already uploaded with a final status (``existing``) is left alone."""
    from ..tracking import Tracker

    if parent_id is None or parent.unavailable:
        return
    if existing and existing[1] in ("FINISHED", "FAILED", "KILLED"):
        pt["mlflow_run_id"] = existing[0]
        return
    tracker = Tracker(parent.runs_root, recipe.stem)
    if existing:
        run_id = _safe(tracker.attach, existing[0], guard=parent)
    else:
        run_id = _safe(tracker.start, f"point-{pt['job']}", {"qflow.sweep": "point", "qflow.recipe": str(recipe),
                                                             "qflow.sweep.job": str(pt["job"]),
                                                             "qflow.overrides": " ".join(pt["overrides"])},
                       parent_id, guard=parent)
    if not run_id:
        return
    pt["mlflow_run_id"] = run_id
    resolved = Path(pt["run_dir"]) / "recipe.resolved.yaml" if pt.get("run_dir") else None
    if resolved and resolved.is_file():
        import yaml

        from .cache import flatten

        _safe(tracker.log_params, flatten(yaml.safe_load(resolved.read_text())), guard=parent)
        _safe(tracker.log_artifact, resolved, guard=parent)
    _safe(tracker.log_metrics, pt.get("metrics", {}), guard=parent)
    tags = {"qflow.status": pt["status"]}
    for sid, st in pt.get("stages", {}).items():
        tags[f"qflow.stage.{sid}.key"] = st.get("key") or ""
        tags[f"qflow.stage.{sid}.status"] = st.get("status")
    _safe(tracker.set_tags, tags, guard=parent)
    if pt.get("run_dir"):
        _safe(tracker.log_artifacts, Path(pt["run_dir"]) / "artifacts", "artifacts", guard=parent)
    _safe(tracker.end, "FINISHED" if pt["status"] == "ok" else "FAILED", guard=parent)


def _write_table(points: list[dict[str, Any]], path: Path) -> None:
    import csv

    metric_names = sorted({m for p in points for m in p.get("metrics", {})})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "status", "overrides", *metric_names])
        for p in points:
            w.writerow([p["job"], p["status"], " ".join(p["overrides"]), *[p["metrics"].get(m, "") for m in metric_names]])


def _print_points(points, best, sweep_dir, parent_id) -> None:
    for p in points:
        stages = " ".join(f"{sid}:{s['status']}" for sid, s in p.get("stages", {}).items())
        m = p.get("metrics", {})
        headline = " ".join(f"{k.split('/')[-1]}={m[k]:.4g}" for k in sorted(m)
                            if k.endswith(("/ppl", "/kl_mean", "/bpw_quantized")))
        print(f"[{p['job']}] {p['status']:<6} {' '.join(p['overrides']):<40} {headline}  ({stages})")
        if p.get("error"):
            print(f"    error: {p['error']}")
    if best:
        print(f"best: job {best['job']} {' '.join(best['overrides'])} {best['objective']}={best['value']}")
    print(f"sweep folder: {sweep_dir}")
    if parent_id:
        print(f"mlflow parent run: {parent_id}")


def _safe(fn, *args, guard=None, **kwargs):
    """Call a tracker method unless MLflow already failed for this sweep (``guard``: the parent's
    tracker, by default the method's own); the first failure prints one warning and marks it."""
    guard = guard if guard is not None else getattr(fn, "__self__", None)
    if guard.unavailable:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        print(guard.fail(exc), file=sys.stderr, flush=True)
        return None


def _say(opts, text: str) -> None:
    if not opts.quiet:
        print(text, file=sys.stderr, flush=True)


def sweep_status(runs_root: Path, sweep: str | None = None) -> list[dict[str, Any]]:
    """Points of a sweep (the latest when ``sweep`` is None): done, running, failed."""
    root = Path(runs_root) / "sweeps"
    if sweep:
        sweep_dir = Path(sweep) if Path(sweep).is_dir() else root / sweep
    else:
        dirs = sorted(root.glob("*"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        if not dirs:
            return []
        sweep_dir = dirs[-1]
    rows = []
    for status_file in sorted(sweep_dir.glob("*/status.json"), key=lambda p: int(p.parent.name)):
        st = json.loads(status_file.read_text())
        state = st["status"]
        if state == "running" and "pid" in st and not _alive(st["pid"]):
            state = "died"
        rows.append({"sweep": sweep_dir.name, "job": int(status_file.parent.name), "status": state,
                     "overrides": st.get("overrides", [])})
    return rows


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
