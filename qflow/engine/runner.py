"""Run a plan: keys, cache hits, stage execution, gates, tracking.

``execute(cfg_dict, ...)`` is a function of a composed config so Hydra's
multirun (sweepers, launchers) can call it as a task function; ``run_recipe``
composes a recipe file first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifacts import Artifact
from ..errors import GateFailed, PlanError, QflowError, StageError
from ..recipe.compose import compose_recipe, to_plain
from ..recipe.safety import redact
from ..recipe.validate import validate_shape
from .cache import CacheStore, Entry, diff_ingredients, flatten, make_key
from .context import StageContext
from .plan import Plan, PlannedStage, build_plan

log = logging.getLogger(__name__)


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
    out_stream: Any = None  # where the summary goes (stderr with --json)


@dataclass
class StageResult:
    id: str
    uses: str
    status: str            # planned | ran | cached | failed | skipped
    key: str | None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    peak_rss_bytes: int | None = None
    peak_estimate_bytes: int | None = None   # the stage's own estimate (Stage.estimate_peak_bytes)
    memo_keys: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)     # stage-provided MLflow tags (ctx.info["tags"])


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


def environment(device: str) -> dict[str, str]:
    """Facts that change numbers (part of every key)."""
    try:
        tv = metadata.version("torch")
        torch_mm = ".".join(tv.split("+")[0].split(".")[:2])
    except metadata.PackageNotFoundError:
        torch_mm = "none"
    backend = os.environ.get("QFLOW_KERNEL_BACKEND", "auto")
    return {"torch": torch_mm, "device": device, "kernel_backend": backend}


def resolve_device(wanted: str) -> str:
    if wanted == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise PlanError("the recipe asks for device: cuda but no CUDA GPU is available", where="device",
                        fix="set device: cpu (or auto) or run on a machine with a GPU")
    return "cpu"


def compute_keys(plan: Plan, store: CacheStore, env: dict[str, str]) -> dict[str, tuple[str, dict[str, Any]]]:
    keys: dict[str, tuple[str, dict[str, Any]]] = {}
    for sid, st in plan.stages.items():
        ingredients = {
            "stage": st.uses,
            "version": st.cls.version,
            "qflow": __version__,
            "config": st.config.model_dump(mode="json"),
            "inputs": {slot: f"{keys[src][0]}:{out}" for slot, (src, out) in sorted(st.bindings.items())},
            "external": st.cls.fingerprint_sources(st.config, store.root) if hasattr(st.cls, "fingerprint_sources") else {},
            "env": env,
        }
        # the key hashes the real values; the manifest keeps them with environment values redacted
        keys[sid] = (make_key(ingredients), redact(ingredients))
    return keys


def closest_entry(store: CacheStore, ingredients: dict[str, Any]) -> tuple[Entry | None, list[str]]:
    """The cached entry of the same stage whose ingredients differ least, and the differences."""
    best: tuple[int, Entry | None, list[str]] = (10**9, None, [])
    for entry in store.entries():
        old = entry.manifest.get("ingredients")
        if not old or old.get("stage") != ingredients["stage"]:
            continue
        lines = diff_ingredients(old, ingredients)
        if len(lines) < best[0]:
            best = (len(lines), entry, lines)
    return best[1], best[2]


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


def _cached_inputs(plan: Plan, st: PlannedStage, store: CacheStore, keys: dict[str, tuple[str, dict[str, Any]]],
                   *, planned: bool = False) -> dict[str, Any]:
    """Per input slot of ``st``, the upstream artifact when it is already cached; with ``planned``,
    ``{"planned": <upstream stage config>}`` for the slots that are not (for estimates)."""
    out: dict[str, Any] = {}
    for slot, (src, name) in st.bindings.items():
        entry = store.get(keys[src][0])
        if entry is not None and (entry.outputs / name / "artifact.json").is_file():
            out[slot] = Artifact.load(entry.outputs / name)
        elif planned:
            out[slot] = {"planned": plan.stages[src].config.model_dump(mode="json")}
    return out


def preflight(plan: Plan, store: CacheStore, keys: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Capability checks of every stage, before the first one starts.

    A stage's ``check(cfg, inputs)`` sees the upstream artifacts that are already
    cached (e.g. the model folder, for group-size checks); the runner calls it
    again with the real inputs right before the stage runs.
    """
    import importlib.util

    problems = []
    for sid, st in plan.stages.items():
        for pkg in st.cls.requires_packages:
            if importlib.util.find_spec(pkg) is None:
                problems.append(f"stages.{sid} ({st.uses}) needs the Python package '{pkg}' (pip install {pkg})")
        for msg in st.cls().check(st.config, _cached_inputs(plan, st, store, keys)):
            problems.append(f"stages.{sid} ({st.uses}): {msg}")
    if problems:
        raise PlanError("; ".join(problems), where=plan.source, fix="fix the listed problems before running")


def _model_config(plan: Plan, store: CacheStore, keys: dict[str, tuple[str, dict[str, Any]]],
                  outputs: dict[str, dict[str, Artifact]] | None = None) -> dict[str, Any] | None:
    """``config.json`` of the recipe's model once its ``model.load`` stage has run (else None)."""
    from ..models.adapters import model_config_from_inputs

    for sid, st in plan.stages.items():
        if st.uses != "model.load":
            continue
        if outputs and sid in outputs:
            return model_config_from_inputs({"model": next(iter(outputs[sid].values()))})
        entry = store.get(keys[sid][0])
        if entry is not None and (entry.outputs / "model" / "artifact.json").is_file():
            return model_config_from_inputs({"model": Artifact.load(entry.outputs / "model")})
    return None


def estimate_peaks(plan: Plan, store: CacheStore, keys: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, int | None]:
    """Each stage's peak-memory estimate (bytes, None when unknown) from what is cached and planned."""
    model_config = _model_config(plan, store, keys)
    out: dict[str, int | None] = {}
    for sid, st in plan.stages.items():
        meta = _cached_inputs(plan, st, store, keys, planned=True)
        try:
            out[sid] = st.cls().estimate_peak_bytes(st.config, meta, model_config)
        except Exception as exc:  # an estimate must never stop a run
            log.debug("peak estimate of %s failed: %s", sid, exc)
            out[sid] = None
    return out


def _warn_if_short_of_memory(sid: str, st: PlannedStage, inputs: dict[str, Artifact],
                             model_config: dict[str, Any] | None, opts: "RunOptions") -> int | None:
    from ..quant.memory import format_bytes

    try:
        estimate = st.cls().estimate_peak_bytes(st.config, inputs, model_config)
    except Exception:
        return None
    if estimate:
        import psutil

        available = psutil.virtual_memory().available
        if estimate > available:
            _say(opts, f"[{sid}] warning: estimated peak memory {format_bytes(estimate)} exceeds the "
                       f"{format_bytes(available)} available; the stage may be killed (lower batch_size / "
                       f"n_samples, or free memory)")
    return estimate


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
            result.status = "cached"
            result.metrics = dict(entry.manifest.get("metrics", {}))
            result.tags = dict((entry.manifest.get("info") or {}).get("tags") or {})
            _restore_artifacts(entry, st.id, run_dir)
            return result, _load_outputs(entry, st)
        tmp = store.new_tmp(key)
        scratch = store.scratch_path(key)
        scratch.mkdir(parents=True, exist_ok=True)
        memo_keys: list[str] = []

        def memo(name: str, ingr: dict[str, Any], compute):
            mkey, path = store.memo(name, ingr, compute)
            memo_keys.append(mkey)
            return path

        ctx = StageContext(stage_id=st.id, uses=st.uses, key=key, out_dir=tmp / "outputs", scratch=scratch,
                           run_dir=run_dir, runs_root=opts.runs_root, device=device, seed=seed,
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
            for slot, art in outputs.items():
                Artifact.save(art, tmp / "outputs" / slot)
            result.peak_rss_bytes = ctx.info.get("peak_rss_bytes", rss.peak)
            result.metrics = {**ctx.metrics, "peak_rss_mb": result.peak_rss_bytes / 2**20}
            result.memo_keys = memo_keys
            result.tags = {str(k): str(v) for k, v in (ctx.info.get("tags") or {}).items()}
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
            _end_interrupted(tracker, opts, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise


def _execute(plan: Plan, opts: RunOptions, overrides: list[str] | None, started: list[Any]) -> RunResult:
    runs_root = Path(opts.runs_root)
    store = CacheStore(runs_root / "cache")
    device = resolve_device(plan.recipe.device)
    env = environment(device)
    keys = compute_keys(plan, store, env)
    for flag, sid in (("--only", opts.only), ("--from", opts.from_), *[("--force", f) for f in opts.force]):
        if sid is not None and sid not in plan.stages:
            raise PlanError(f"{flag} {sid}: no such stage", where=plan.source,
                            fix=f"choose one of: {', '.join(plan.stages)}")

    selected = set(plan.stages)
    forced = set(opts.force)
    if opts.only:
        selected = {opts.only}
    if opts.from_:
        forced |= plan.downstream(opts.from_)

    preflight(plan, store, keys)
    if opts.dry_run:
        estimates = estimate_peaks(plan, store, keys)
        stages = {}
        for sid, st in plan.stages.items():
            key = keys[sid][0]
            cached = store.get(key) is not None and sid not in forced
            status = "cached" if cached else ("will run" if sid in selected or not cached else "skipped")
            stages[sid] = StageResult(sid, st.uses, status, key, peak_estimate_bytes=estimates[sid])
        return RunResult(Path(""), None, stages, {}, "ok", name=plan.recipe.name)

    store.clean_tmp()  # only folders whose owner is gone (never on --dry-run)
    run_dir = _new_run_dir(runs_root, opts.run_name or plan.recipe.name)
    _write_yaml(run_dir / "recipe.resolved.yaml", plan.resolved)
    tracker = _make_tracker(opts, plan, run_dir)
    started.append(tracker)
    run_id = _safe(tracker.start, opts, run_name=run_dir.name,
                   tags={"qflow.recipe": plan.source, "qflow.version": __version__},
                   parent_run_id=opts.parent_run_id)
    _safe(tracker.log_params, opts, {k: v for k, v in flatten(plan.resolved).items()})

    results: dict[str, StageResult] = {}
    outputs: dict[str, dict[str, Artifact]] = {}
    metrics: dict[str, float] = {}
    gates: list[dict[str, Any]] = []
    failed = False
    for sid, st in plan.stages.items():
        key, ingredients = keys[sid]
        if failed:
            results[sid] = StageResult(sid, st.uses, "skipped", key, error="an upstream stage failed")
            continue
        missing_up = [src for src, _ in st.bindings.values() if src not in outputs]
        if missing_up:
            results[sid] = StageResult(sid, st.uses, "skipped", key, error=f"inputs from {missing_up} unavailable")
            continue
        if sid not in selected:
            entry = None
            if store.inspect(key) is not None:  # don't wait on the lock of a key that another run computes
                with store.lock(key):
                    entry = _verified_hit(store, st, key)
            if entry is None:
                if any(sid in plan.upstream(s) for s in selected):
                    failed = True
                    results[sid] = StageResult(sid, st.uses, "failed", key,
                                               error=f"--only {opts.only}: upstream stage '{sid}' is not cached "
                                                     f"(or its entry was damaged); run the recipe without --only first")
                else:
                    results[sid] = StageResult(sid, st.uses, "skipped", key)
                continue
            results[sid] = StageResult(sid, st.uses, "cached", key, metrics=dict(entry.manifest.get("metrics", {})),
                                       tags=dict((entry.manifest.get("info") or {}).get("tags") or {}))
            outputs[sid] = _load_outputs(entry, st)
            _restore_artifacts(entry, sid, run_dir)
            _collect(sid, results[sid], st, metrics, gates)
            continue
        inputs = {slot: outputs[src][out] for slot, (src, out) in st.bindings.items()}
        _say(opts, f"[{sid}] {st.uses}  key {key[:12]}")
        estimate = _warn_if_short_of_memory(sid, st, inputs, _model_config(plan, store, keys, outputs), opts)
        try:
            res, outs = _run_stage(st, key, ingredients, inputs, store, run_dir, opts, device,
                                   plan.recipe.seed, force=sid in forced)
        except QflowError as exc:
            res, outs = StageResult(sid, st.uses, "failed", key, error=str(exc)), None
            _say(opts, f"[{sid}] failed: {exc}")
        except Exception as exc:  # qflow's own bug: keep the traceback
            traceback.print_exc(file=sys.stderr)
            res, outs = StageResult(sid, st.uses, "failed", key, error=f"{type(exc).__name__}: {exc}"), None
        res.peak_estimate_bytes = estimate
        results[sid] = res
        if outs is None:
            failed = True
            continue
        outputs[sid] = outs
        _say(opts, f"[{sid}] {res.status} in {res.seconds:.1f}s")
        _collect(sid, res, st, metrics, gates)

    status = "failed" if failed or any(not g["passed"] for g in gates) else "ok"
    result = RunResult(run_dir, run_id, results, metrics, status, gates, name=plan.recipe.name)
    (run_dir / "summary.json").write_text(json.dumps(
        {**result.to_json(), "recipe": plan.source, "overrides": overrides or [], "name": plan.recipe.name,
         "keys": {sid: r.key for sid, r in results.items()},
         "memo_keys": sorted({k for r in results.values() for k in r.memo_keys}),
         "finished_at": time.time()}, indent=1, default=str))
    _finish_tracking(tracker, opts, result, run_dir)
    return result


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


def _make_tracker(opts: RunOptions, plan: Plan, run_dir: Path):
    from ..tracking import Tracker

    if not opts.track:
        return Tracker.null()
    return Tracker(opts.runs_root, plan.recipe.name, run_dir=run_dir)


def _safe(fn, opts: RunOptions, *args, **kwargs):
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


def _end_interrupted(tracker, opts: RunOptions, status: str) -> None:
    """An interrupted run ends as ``status`` in MLflow, or in its queue entry when MLflow is down."""
    if not tracker.enabled:
        return
    if tracker.unavailable:
        tracker.queue(status=status)
    else:
        _safe(tracker.end, opts, status)
        if tracker.unavailable:  # the end call itself failed
            tracker.queue(status=status)


def _finish_tracking(tracker, opts: RunOptions, result: RunResult, run_dir: Path) -> None:
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
    _safe(tracker.log_metrics, opts, result.metrics)
    _safe(tracker.set_tags, opts, tags)
    _safe(tracker.log_artifact, opts, run_dir / "recipe.resolved.yaml")
    _safe(tracker.log_artifact, opts, run_dir / "summary.json")
    _safe(tracker.log_artifacts, opts, run_dir / "artifacts", "artifacts")
    status = "FINISHED" if result.status == "ok" else "FAILED"
    _safe(tracker.end, opts, status)
    if tracker.unavailable:  # down at the start or failed on the way: `qflow sync` uploads the folder later
        tracker.queue(tags=tags, status=status)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_recipe(recipe_path: str, overrides: list[str], opts: RunOptions) -> RunResult:
    plan = load_plan(recipe_path, overrides, opts)
    return execute(plan, opts, overrides)
