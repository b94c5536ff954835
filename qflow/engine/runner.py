"""Run a plan: cache hits, stage execution, gates, the run's summary and tracking.

``execute(plan, opts)`` runs a plan built from a composed config
(``plan_from_config``), so Hydra's multirun (sweepers, launchers) can call it
from a task function; ``run_recipe`` composes a recipe file first. Keys are
computed in ``keys.py``, capability checks and memory estimates in
``preflight.py``; ``record.py`` writes the run to MLflow.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifacts import Artifact
from ..errors import PlanError, QflowError, StageError, disk_full
from ..recipe.compose import compose_recipe, to_plain
from ..recipe.libraries import fetched_folders
from ..recipe.safety import redact
from ..recipe.validate import validate_shape
from ..registry import UndeclaredMetricWarning, undeclared_metrics
from .cache import CacheStore, Entry, flatten
from .context import StageContext
from .keys import Keys, compute_keys, environment, resolve_device
from .plan import Plan, PlannedStage, build_plan
from .preflight import Outputs, estimate_peak, estimate_peaks, memory_warning, preflight, upstream_of
from .record import end_interrupted, finish_tracking, make_tracker, safe


@dataclass
class RunOptions:
    runs_root: Path = Path("runs")
    dry_run: bool = False
    only: str | None = None
    from_: str | None = None
    force: list[str] = field(default_factory=list)
    track: bool = True
    quiet: bool = False
    libraries: list[str] = field(default_factory=list)
    allow_env: list[str] = field(default_factory=list)   # names ${oc.env:NAME} may read (--allow-env)
    parent_run_id: str | None = None
    run_name: str | None = None


@dataclass
class StageResult:
    id: str
    uses: str
    status: str            # ran | cached | failed | skipped; "will run" in a dry run
    key: str | None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    peak_rss_bytes: int | None = None
    peak_estimate_bytes: int | None = None   # the stage's own estimate (Stage.estimate_peak_bytes)
    memo_keys: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)     # stage-provided MLflow tags (ctx.info["tags"])
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)   # ctx.log_metric_at points


@dataclass
class RunResult:
    run_dir: Path
    mlflow_run_id: str | None
    stages: dict[str, StageResult]
    metrics: dict[str, float]
    status: str                          # ok | failed
    gates: list[dict[str, Any]] = field(default_factory=list)
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "mlflow_run_id": self.mlflow_run_id,
            "status": self.status,
            "stages": {sid: {"uses": r.uses, "status": r.status, "key": r.key, "seconds": round(r.seconds, 3),
                             **({"error": r.error} if r.error else {}),
                             **({"peak_rss_bytes": r.peak_rss_bytes} if r.peak_rss_bytes else {}),
                             **({"peak_estimate_bytes": r.peak_estimate_bytes} if r.peak_estimate_bytes else {}),
                             **({"tags": dict(r.tags)} if r.tags else {})}
                       for sid, r in self.stages.items()},
            "metrics": self.metrics,
            "gates": self.gates,
        }


# ---- planning -----------------------------------------------------------------

def plan_from_config(cfg_dict: dict[str, Any], source: str) -> Plan:
    """The plan of a composed config; ``plan.resolved`` (what is written and tracked) has environment
    values redacted, the stage configs keep the real ones."""
    recipe = validate_shape(cfg_dict, source)
    plan = build_plan(recipe, cfg_dict, source)
    plan.resolved = redact(plan.resolved)
    return plan


def load_plan(recipe_path: str, overrides: list[str], opts: RunOptions) -> Plan:
    cfg = compose_recipe(recipe_path, overrides, libraries=opts.libraries, cache_dir=opts.runs_root / "cache",
                         allow_env=opts.allow_env)
    return plan_from_config(to_plain(cfg), str(recipe_path))


# ---- execution ----------------------------------------------------------------

class _PeakRSS:
    """Samples this process's RSS in a thread while a stage runs."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except Exception:
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _restore_artifacts(entry: Entry, sid: str, run_dir: Path) -> None:
    """A cached stage's reports reappear in this run's folder (and so in MLflow)."""
    kept = entry.path / "artifacts"
    if kept.is_dir():
        shutil.copytree(kept, run_dir / "artifacts" / sid, dirs_exist_ok=True)


def _load_outputs(entry: Entry, st: PlannedStage) -> dict[str, Artifact]:
    outs = {}
    for slot in st.cls.outputs:
        slot_dir = entry.outputs / slot
        if not (slot_dir / "artifact.json").is_file():
            raise StageError(f"cache entry {entry.key[:12]} of stage '{st.id}' lacks output '{slot}'",
                             where=str(entry.path), fix=f"run `qflow cache verify --fix` or re-run with --force {st.id}")
        outs[slot] = Artifact.load(slot_dir)
    return outs


def _verified_hit(store: CacheStore, st: PlannedStage, key: str) -> Entry | None:
    """The stage's cached entry after checking every file; a damaged one is quarantined (a miss)."""
    entry, damage = store.get_verified(key, expect=[f"outputs/{slot}/artifact.json" for slot in st.cls.outputs])
    if damage:
        print(f"warning: [{st.id}] cache entry {key[:12]} is damaged ({damage}); recomputing",
              file=sys.stderr, flush=True)
    return entry


def _run_stage(st: PlannedStage, key: str, ingredients: dict[str, Any], inputs: dict[str, Artifact],
               store: CacheStore, run_dir: Path, opts: RunOptions, device: str, seed: int,
               force: bool) -> tuple[StageResult, dict[str, Artifact]]:
    result = StageResult(st.id, st.uses, "ran", key)
    t0 = time.perf_counter()
    with store.lock(key):
        entry = None if force else _verified_hit(store, st, key)
        if entry is not None:
            _restore_artifacts(entry, st.id, run_dir)
            outs = _load_outputs(entry, st)
            for note in st.cls().on_hit(st.config, outs, key=key, stage_id=st.id):
                _say(opts, f"[{st.id}] {note}")
            return _cached_result(st, key, entry), outs
        tmp = store.new_tmp(key)
        scratch = store.scratch_path(key)
        scratch.mkdir(parents=True, exist_ok=True)
        memo_keys: list[str] = []

        def memo(name: str, ingr: dict[str, Any], compute):
            mkey, path = store.memo(name, ingr, compute)
            memo_keys.append(mkey)
            return path

        ctx = StageContext(stage_id=st.id, uses=st.uses, key=key, out_dir=tmp / "outputs", scratch=scratch,
                           run_dir=run_dir, memo_dir=store.root, device=device, seed=seed,
                           quiet=opts.quiet, memo_fn=memo)
        try:
            stage = st.cls()
            problems = stage.check(st.config, inputs)
            if problems:
                raise StageError("; ".join(problems), where=f"stages.{st.id} ({st.uses})",
                                 fix="adjust the stage's settings (see the problems listed)")
            with _PeakRSS() as rss:
                outputs = stage.run(ctx, st.config, **inputs)
            _check_outputs(st, outputs, tmp / "outputs")
            _check_metric_names(st, ctx.metrics)
            for slot, art in outputs.items():
                Artifact.save(art, tmp / "outputs" / slot)
            result.peak_rss_bytes = ctx.info.get("peak_rss_bytes", rss.peak)
            result.metrics = {**ctx.metrics, "peak_rss_mb": result.peak_rss_bytes / 2**20}
            result.memo_keys = memo_keys
            result.tags = {str(k): str(v) for k, v in (ctx.info.get("tags") or {}).items()}
            result.curves = {k: list(v) for k, v in ctx.curves.items()}
            manifest = {"ingredients": ingredients, "stage_id": st.id, "metrics": result.metrics,
                        "seconds": time.perf_counter() - t0, "peak_rss_bytes": result.peak_rss_bytes,
                        "memo_keys": memo_keys, "info": _jsonable(ctx.info)}
            if force:
                store.remove(key)  # through trash/: a kill here leaves no half-entry at the key's path
            entry = store.commit(key, tmp, manifest)
            shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never a half-written entry; scratch stays for resume
            raise
        finally:
            result.seconds = time.perf_counter() - t0
    # reload from the committed entry so paths point into the cache
    return result, _load_outputs(entry, st)


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))


def _check_metric_names(st: PlannedStage, metrics: dict[str, float]) -> None:
    """Warn when a stage logs a metric its ``Stage.metrics`` does not declare: `qflow lint` checks gates
    against the declaration, so an undeclared name would be refused there although a run logs it."""
    extra = undeclared_metrics(st.cls, metrics)
    if extra:
        warnings.warn(UndeclaredMetricWarning(
            f"stage {st.uses} ({st.id}) logged {', '.join(extra)}, which its Stage.metrics "
            f"({', '.join(st.cls.metrics) or 'nothing'}) does not declare; add the names to the stage's metrics"),
            stacklevel=2)


def _check_outputs(st: PlannedStage, outputs: Any, out_dir: Path) -> None:
    if not isinstance(outputs, dict):
        raise TypeError(f"stage {st.uses} returned {type(outputs).__name__}, expected a dict of artifacts")
    missing = set(st.cls.outputs) - set(outputs)
    if missing:
        raise TypeError(f"stage {st.uses} did not return outputs {sorted(missing)}")
    for slot, art in outputs.items():
        want = st.cls.outputs.get(slot)
        if want is None or not isinstance(art, want):
            raise TypeError(f"stage {st.uses} output {slot!r} is {type(art).__name__}, expected "
                            f"{want.__name__ if want else 'no such output'}")
        if not art.external and out_dir not in art.path.resolve().parents and art.path.resolve() != (out_dir / slot).resolve():
            raise TypeError(f"stage {st.uses} output {slot!r} points outside its output folder: {art.path}")
        if not art.external and art.path.resolve() != (out_dir / slot).resolve():
            raise TypeError(f"stage {st.uses} output {slot!r} must live in ctx.output({slot!r})")


def _new_run_dir(root: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = root / "runs" / f"{stamp}-{safe}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def _say(opts: RunOptions, text: str) -> None:
    if not opts.quiet:
        print(text, file=sys.stderr, flush=True)


def execute(plan: Plan, opts: RunOptions, overrides: list[str] | None = None) -> RunResult:
    """Run ``plan``; never raises for a stage failure (reported in the result).

    An interrupt (Ctrl-C, or SIGTERM under ``qflow run``: ``interrupts.Terminated``)
    or a bug of qflow's own ends the MLflow run as KILLED or FAILED, then propagates.
    """
    started: list[Any] = []  # the tracker, once _execute has started it
    try:
        return _execute(plan, opts, overrides, started)
    except BaseException as exc:
        for tracker in started:
            end_interrupted(tracker, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise


def _execute(plan: Plan, opts: RunOptions, overrides: list[str] | None, started: list[Any]) -> RunResult:
    runs_root = Path(opts.runs_root)
    store = CacheStore(runs_root / "cache")
    device = resolve_device(plan.recipe.device)
    keys = compute_keys(plan, store, environment(device))
    selected, forced = _selection(plan, opts)
    preflight(plan, store, keys, device)
    if opts.dry_run:
        return _dry_run(plan, store, keys, selected, forced, opts)

    store.clean_tmp()  # only folders whose owner is gone (never on --dry-run)
    run_dir = _new_run_dir(runs_root, opts.run_name or plan.recipe.name)
    _write_yaml(run_dir / "recipe.resolved.yaml", plan.resolved)
    tracker = make_tracker(opts.track, opts.runs_root, plan.recipe.name, run_dir)
    started.append(tracker)
    run_id = safe(tracker.start, run_name=run_dir.name,
                  tags={"qflow.recipe": plan.source, "qflow.version": __version__},
                  parent_run_id=opts.parent_run_id)
    safe(tracker.log_params, {k: v for k, v in flatten(plan.resolved).items()})

    results: dict[str, StageResult] = {}
    outputs: Outputs = {}
    metrics: dict[str, float] = {}
    gates: list[dict[str, Any]] = []
    failed = False
    for sid, st in plan.stages.items():
        key, ingredients = keys[sid]
        missing_up = [src for src, _ in st.bindings.values() if src not in outputs]
        if failed:
            res, outs = StageResult(sid, st.uses, "skipped", key, error="an upstream stage failed"), None
        elif missing_up:
            res, outs = StageResult(sid, st.uses, "skipped", key, error=f"inputs from {missing_up} unavailable"), None
        elif sid not in selected:
            res, outs = _reuse(plan, st, key, store, run_dir, selected, opts)
        else:
            res, outs = _run_selected(plan, st, key, ingredients, outputs, store, run_dir, opts, device,
                                      force=sid in forced)
        results[sid] = res
        failed = failed or res.status == "failed"
        if outs is not None:
            outputs[sid] = outs
            _collect(sid, res, st, metrics, gates)

    status = "failed" if failed or any(not g["passed"] for g in gates) else "ok"
    result = RunResult(run_dir, run_id, results, metrics, status, gates, name=plan.recipe.name)
    (run_dir / "summary.json").write_text(json.dumps(
        {**result.to_json(), "recipe": plan.source, "overrides": overrides or [], "name": plan.recipe.name,
         "keys": {sid: r.key for sid, r in results.items()},
         "memo_keys": sorted({k for r in results.values() for k in r.memo_keys}),
         "libraries": fetched_folders(opts.libraries),   # fetched git libraries: `qflow cache gc` keeps them
         "finished_at": time.time()}, indent=1, default=str))
    finish_tracking(tracker, result, run_dir)
    return result


def _selection(plan: Plan, opts: RunOptions) -> tuple[set[str], set[str]]:
    """(the stages this run may compute, the stages it recomputes even when cached) from --only/--from/--force."""
    for flag, sid in (("--only", opts.only), ("--from", opts.from_), *[("--force", f) for f in opts.force]):
        if sid is not None and sid not in plan.stages:
            raise PlanError(f"{flag} {sid}: no such stage", where=plan.source,
                            fix=f"choose one of: {', '.join(plan.stages)}")
    selected = {opts.only} if opts.only else set(plan.stages)
    forced = set(opts.force)
    if opts.from_:
        forced |= plan.downstream(opts.from_)
    return selected, forced


def _dry_run(plan: Plan, store: CacheStore, keys: Keys, selected: set[str], forced: set[str],
             opts: RunOptions) -> RunResult:
    """What a run would do, stage by stage: "cached", "will run" or "skipped" (outside --only), with estimates."""
    estimates = estimate_peaks(plan, store, keys)
    stages = {}
    for sid, st in plan.stages.items():
        key = keys[sid][0]
        in_cache = store.get(key) is not None
        error = None
        if sid in selected:
            status = "cached" if in_cache and sid not in forced else "will run"
        elif in_cache:
            status = "cached"   # a stage outside --only is read from the cache, --force or not
        else:
            status = "skipped"
            if any(sid in plan.upstream(s) for s in selected):
                error = _not_cached_upstream(opts, sid)
        stages[sid] = StageResult(sid, st.uses, status, key, error=error, peak_estimate_bytes=estimates[sid])
    return RunResult(Path(""), None, stages, {}, "ok", name=plan.recipe.name)


def _not_cached_upstream(opts: RunOptions, sid: str) -> str:
    return (f"--only {opts.only}: upstream stage '{sid}' is not cached (or its entry was damaged); "
            f"run the recipe without --only first")


def _reuse(plan: Plan, st: PlannedStage, key: str, store: CacheStore, run_dir: Path, selected: set[str],
           opts: RunOptions) -> tuple[StageResult, dict[str, Artifact] | None]:
    """A stage outside --only: its cached outputs; without them, "failed" when a selected stage needs
    it, else "skipped"."""
    entry = None
    if store.inspect(key) is not None:  # don't wait on the lock of a key that another run computes
        with store.lock(key):
            entry = _verified_hit(store, st, key)
    if entry is None:
        if any(st.id in plan.upstream(s) for s in selected):
            return StageResult(st.id, st.uses, "failed", key, error=_not_cached_upstream(opts, st.id)), None
        return StageResult(st.id, st.uses, "skipped", key), None
    _restore_artifacts(entry, st.id, run_dir)
    return _cached_result(st, key, entry), _load_outputs(entry, st)


def _cached_result(st: PlannedStage, key: str, entry: Entry) -> StageResult:
    return StageResult(st.id, st.uses, "cached", key, metrics=dict(entry.manifest.get("metrics", {})),
                       tags=dict((entry.manifest.get("info") or {}).get("tags") or {}))


def _run_selected(plan: Plan, st: PlannedStage, key: str, ingredients: dict[str, Any], outputs: Outputs,
                  store: CacheStore, run_dir: Path, opts: RunOptions, device: str,
                  force: bool) -> tuple[StageResult, dict[str, Artifact] | None]:
    """A selected stage: a verified cache hit, or a run; a failure is reported in the result."""
    sid = st.id
    inputs = {slot: outputs[src][out] for slot, (src, out) in st.bindings.items()}
    _say(opts, f"[{sid}] {st.uses}  key {key[:12]}")
    estimate = estimate_peak(st, inputs, upstream_of(plan, sid, outputs))
    warning = memory_warning(sid, estimate)
    if warning:
        _say(opts, warning)
    try:
        res, outs = _run_stage(st, key, ingredients, inputs, store, run_dir, opts, device,
                               plan.recipe.seed, force=force)
    except QflowError as exc:
        res, outs = StageResult(sid, st.uses, "failed", key, error=str(exc)), None
        _say(opts, f"[{sid}] failed: {exc}")
    except Exception as exc:  # qflow's own bug: keep the traceback (a full disk is the user's to fix)
        full = disk_full(exc, where=f"stages.{sid} ({st.uses})")
        if full is not None:
            _say(opts, f"[{sid}] failed: {full}")
        else:
            traceback.print_exc(file=sys.stderr)
        res, outs = StageResult(sid, st.uses, "failed", key, error=str(full or f"{type(exc).__name__}: {exc}")), None
    res.peak_estimate_bytes = estimate
    if outs is not None:
        _say(opts, f"[{sid}] {res.status} in {res.seconds:.1f}s")
    return res, outs


def _collect(sid: str, res: StageResult, st: PlannedStage, metrics: dict[str, float], gates: list) -> None:
    for name, value in res.metrics.items():
        metrics[f"{sid}/{name}"] = value
    for metric, gate in st.gates.items():
        value = res.metrics.get(metric)
        if value is None:
            gates.append({"stage": sid, "metric": metric, "passed": False, "value": None,
                          "reason": f"metric not produced (has: {', '.join(sorted(res.metrics)) or 'none'})"})
            continue
        problem = gate.check(value)
        gates.append({"stage": sid, "metric": metric, "passed": problem is None, "value": value,
                      "bound": gate.model_dump(exclude_none=True), **({"reason": problem} if problem else {})})


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_recipe(recipe_path: str, overrides: list[str], opts: RunOptions) -> RunResult:
    plan = load_plan(recipe_path, overrides, opts)
    return execute(plan, opts, overrides)
