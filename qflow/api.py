"""qflow's Python API: what the command line does, as functions returning typed results.

    import qflow

    result = qflow.run("recipes/llama-awq.yaml", overrides=["params.bits=3"], runs_dir="runs")
    result.status, result.metrics["evaluate/ppl_ratio"], result.stages["quantize"].key
    result.to_json()            # exactly what `qflow run --json` prints
    sweep = qflow.sweep("recipes/llama-rtn.yaml", ["params.bits=3,4"])     # `qflow run -m`
    qflow.explain("recipes/llama-rtn.yaml", ["params.group_size=32"])      # `qflow explain`
    model, tokenizer = qflow.load_quantized(result)     # a torch module ready for generation

The CLI (``qflow/cli.py``) is a thin layer over these functions: it parses
arguments, calls them and prints. A user's mistake raises the same typed
exception the CLI prints (``qflow.errors``: ``RecipeError``, ``PlanError``,
``SourceError``...; all are ``QflowError``); a stage that fails does not
raise, it is reported in the result (``status == "failed"``), as the CLI's
exit status 1 reports it. Heavy libraries (torch, mlflow, hydra) are imported
by the calls that need them, not by ``import qflow``. docs/API.md documents
each function and type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from .errors import QflowError, SourceError

__all__ = ["run", "sweep", "explain", "lock", "load_quantized", "RunSummary", "StageSummary", "GateResult",
           "SweepSummary", "SweepPoint", "BestPoint", "StageExplanation", "QuantizedModel", "default_runs_dir"]


def default_runs_dir() -> Path:
    """Where runs and the cache go unless told: ``$QFLOW_RUNS_DIR``, else ``./runs`` (as the CLI)."""
    return Path(os.environ.get("QFLOW_RUNS_DIR") or "runs")


def offline_defaults() -> None:
    """qflow never reaches a model hub unless the user opts in (by setting these variables to 0)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


# ---- results ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSummary:
    """One stage of a run: ``status`` is ran | cached | failed | skipped (``will run`` in a dry run)."""

    uses: str
    status: str
    key: str | None
    seconds: float = 0.0
    error: str | None = None
    peak_rss_bytes: int | None = None        # measured peak resident memory of the stage
    peak_estimate_bytes: int | None = None   # the stage's own estimate (dry runs)
    tags: dict[str, str] = field(default_factory=dict)   # what the stage recorded (qflow.metric.*, qflow.note.*)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"uses": self.uses, "status": self.status, "key": self.key, "seconds": self.seconds}
        for name in ("error", "peak_rss_bytes", "peak_estimate_bytes"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        if self.tags:
            data["tags"] = dict(self.tags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageSummary":
        return cls(uses=data["uses"], status=data["status"], key=data.get("key"), seconds=data.get("seconds", 0.0),
                   error=data.get("error"), peak_rss_bytes=data.get("peak_rss_bytes"),
                   peak_estimate_bytes=data.get("peak_estimate_bytes"), tags=dict(data.get("tags") or {}))


@dataclass(frozen=True)
class GateResult:
    """A recipe gate checked on a stage's metric; ``value`` is None when the stage did not produce it."""

    stage: str
    metric: str
    passed: bool
    value: float | None
    bound: dict[str, float] | None = None    # the gate as written: {"max": 1.3} / {"min": ...}
    reason: str | None = None                # why it failed

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"stage": self.stage, "metric": self.metric, "passed": self.passed, "value": self.value}
        if self.bound is not None:
            data["bound"] = dict(self.bound)
        if self.reason is not None:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GateResult":
        return cls(stage=data["stage"], metric=data["metric"], passed=bool(data["passed"]), value=data.get("value"),
                   bound=data.get("bound"), reason=data.get("reason"))


@dataclass(frozen=True)
class RunSummary:
    """What a run did: the structure ``qflow run --json`` prints (:meth:`to_json` gives it back).

    ``metrics`` are named ``STAGE/METRIC`` (``evaluate/ppl_ratio``); what each metric means
    is in docs/PROTOCOL.md and in the stage's ``qflow.metric.*`` tags. ``run_dir`` is the run
    folder (empty for a dry run), ``mlflow_run_id`` None when the run went untracked.
    """

    run_dir: Path
    mlflow_run_id: str | None
    status: str                                  # ok | failed (a stage failed or a gate did not pass)
    stages: dict[str, StageSummary]
    metrics: dict[str, float]
    gates: list[GateResult] = field(default_factory=list)
    name: str = ""                               # the recipe's name (the MLflow experiment)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "mlflow_run_id": self.mlflow_run_id, "status": self.status,
                "stages": {sid: s.to_json() for sid, s in self.stages.items()},
                "metrics": dict(self.metrics), "gates": [g.to_json() for g in self.gates]}

    @classmethod
    def from_json(cls, data: dict[str, Any], name: str = "") -> "RunSummary":
        return cls(run_dir=Path(data.get("run_dir") or ""), mlflow_run_id=data.get("mlflow_run_id"),
                   status=data["status"], stages={sid: StageSummary.from_json(s) for sid, s in data["stages"].items()},
                   metrics=dict(data.get("metrics") or {}), gates=[GateResult.from_json(g) for g in data.get("gates") or []],
                   name=data.get("name", name))


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its overrides, Hydra job number and run summary (``error``: why it could not run)."""

    job: int
    overrides: list[str]
    run: RunSummary
    error: str | None = None

    @property
    def status(self) -> str:
        return self.run.status

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.metrics

    def to_json(self) -> dict[str, Any]:
        data = {**self.run.to_json(), "overrides": list(self.overrides), "job": self.job}
        if self.run.name or self.error is None:
            data["name"] = self.run.name
        if self.error is not None:
            data["error"] = self.error
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SweepPoint":
        return cls(job=int(data["job"]), overrides=list(data.get("overrides") or []),
                   run=RunSummary.from_json(data), error=data.get("error"))


@dataclass(frozen=True)
class BestPoint:
    """The best point under the sweep's objective and constraints."""

    job: int
    overrides: list[str]
    objective: str
    value: float | None

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "overrides": list(self.overrides), "objective": self.objective, "value": self.value}


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep did: the structure ``qflow run -m --json`` prints (:meth:`to_json`)."""

    sweep_dir: Path
    mlflow_parent_run_id: str | None
    points: list[SweepPoint]
    best: BestPoint | None = None

    @property
    def ok(self) -> bool:
        """Every point ran and passed its gates (the CLI exits 0)."""
        return bool(self.points) and all(p.status == "ok" for p in self.points)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"sweep_dir": str(self.sweep_dir), "mlflow_parent_run_id": self.mlflow_parent_run_id,
                                "points": [p.to_json() for p in self.points]}
        if self.best is not None:
            data["best"] = self.best.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SweepSummary":
        best = data.get("best")
        return cls(sweep_dir=Path(data["sweep_dir"]), mlflow_parent_run_id=data.get("mlflow_parent_run_id"),
                   points=[SweepPoint.from_json(p) for p in data.get("points") or []],
                   best=BestPoint(**best) if best else None)


@dataclass(frozen=True)
class StageExplanation:
    """Whether a stage's key is cached and, if not, what differs from the closest cached entry.

    ``status`` is hit | miss; ``closest`` the nearest cached key of the same stage (None when
    there is none), ``differs`` one line per ingredient that changed (``params: bits 4 -> 3``).
    """

    stage: str
    key: str
    status: str
    closest: str | None = None
    differs: list[str] = field(default_factory=list)
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"key": self.key, "status": self.status}
        if self.reason is not None:
            data["reason"] = self.reason
        if self.closest is not None:
            data["closest"] = self.closest
            data["differs"] = list(self.differs)
        return data


class QuantizedModel(NamedTuple):
    """``(model, tokenizer)``: a torch module in eval mode with the checkpoint applied, and its tokenizer."""

    model: Any
    tokenizer: Any


# ---- calls ---------------------------------------------------------------------------------

def _options(runs_dir, **fields):
    from .engine.runner import RunOptions

    return RunOptions(runs_root=Path(runs_dir) if runs_dir is not None else default_runs_dir(), **fields)


def _strings(values: Iterable[str] | str | None, what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):   # run("r.yaml", "params.bits=3") would otherwise split into characters
        return [values]
    values = list(values)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise QflowError(f"{what} must be strings, got {bad[0]!r}", where=f"qflow API argument '{what}'",
                         fix=f"pass a list of strings, e.g. {what}=['params.bits=3']")
    return values


def run(recipe: str | os.PathLike, overrides: Iterable[str] | None = None, *, runs_dir: str | os.PathLike | None = None,
        dry_run: bool = False, only: str | None = None, from_: str | None = None, force: Iterable[str] | None = None,
        track: bool = True, quiet: bool = False, libraries: Iterable[str] | None = None,
        allow_env: Iterable[str] | None = None, locked: bool = False,
        lock_file: str | os.PathLike | None = None, trust_remote_code: bool = False) -> RunSummary:
    """Run a recipe, as ``qflow run RECIPE [OVERRIDES]``; the run's summary.

    Example::

        result = qflow.run("recipes/llama-rtn.yaml", ["params.bits=3"], runs_dir="runs", quiet=True)
        if not result.ok:
            print([g for g in result.gates if not g.passed])

    ``only``, ``from_``, ``force`` are ``--only``, ``--from``, ``--force``; ``track=False`` is
    ``--no-track``; ``libraries`` are ``--lib`` values; ``allow_env`` names the environment
    variables the recipe may read (``--allow-env``); ``quiet`` silences progress lines on stderr;
    ``locked`` / ``lock_file`` are ``--locked`` / ``--lock-file`` (refuse when anything resolves
    differently from ``RECIPE.lock``); ``trust_remote_code=True`` is ``--trust-remote-code`` (a
    checkpoint's own Python code may run, for this call only; a recipe can never ask for it).
    Raises a ``QflowError`` subclass for a bad recipe or source; a failing stage or gate is
    reported in the result instead.
    """
    from .engine.runner import execute, load_plan
    from .recipe.safety import remote_code

    offline_defaults()
    overrides = _strings(overrides, "overrides")
    opts = _options(runs_dir, dry_run=dry_run, only=only, from_=from_, force=_strings(force, "force"), track=track,
                    quiet=quiet, libraries=_strings(libraries, "libraries"), allow_env=_strings(allow_env, "allow_env"))
    with remote_code(trust_remote_code):
        plan = load_plan(str(recipe), overrides, opts)
        if locked or lock_file:
            from .engine.lock import check_locked

            check_locked(plan, str(recipe), overrides, libraries=opts.libraries, cache_root=opts.runs_root / "cache",
                         path=lock_file)
        result = execute(plan, opts, overrides)
    return RunSummary.from_json(result.to_json(), name=result.name)


def sweep(recipe: str | os.PathLike, overrides: Iterable[str] | None = None, *, runs_dir: str | os.PathLike | None = None,
          jobs: int = 1, objective: str | None = None, constraints: Iterable[str] | None = None, track: bool = True,
          quiet: bool = False, libraries: Iterable[str] | None = None,
          allow_env: Iterable[str] | None = None, trust_remote_code: bool = False) -> SweepSummary:
    """Run a sweep (Hydra multirun), as ``qflow run -m RECIPE [OVERRIDES]``; every point's summary.

    Example::

        s = qflow.sweep("recipes/llama-rtn.yaml", ["params.bits=3,4"], objective="evaluate/kl_mean:min",
                        constraints=["evaluate/bpw_quantized<=4.5"])
        s.best.overrides, [p.metrics["evaluate/kl_mean"] for p in s.points]

    The sweep's parent MLflow run gets the Pareto report of its points (``pareto/``).
    ``trust_remote_code=True`` is ``--trust-remote-code`` (for this sweep's points only).
    """
    from .engine.sweep import sweep as run_points
    from .recipe.safety import remote_code

    offline_defaults()
    opts = _options(runs_dir, track=track, quiet=quiet, libraries=_strings(libraries, "libraries"),
                    allow_env=_strings(allow_env, "allow_env"))
    with remote_code(trust_remote_code):   # the environment carries it to the sweep's job processes
        out = run_points(str(recipe), _strings(overrides, "overrides"), opts, jobs=jobs, objective=objective,
                         constraints=_strings(constraints, "constraints"), report=pareto_report)
    return SweepSummary.from_json(out)


def pareto_report(points: list[dict[str, Any]], folder: Path) -> Path | None:
    """The Pareto report of a sweep's points (the engine takes it as a callback: it knows no evaluation)."""
    from .evaluation.report import pareto_report_for_points

    return pareto_report_for_points(points, folder)


def explain(recipe: str | os.PathLike, overrides: Iterable[str] | None = None, *,
            runs_dir: str | os.PathLike | None = None, libraries: Iterable[str] | None = None,
            allow_env: Iterable[str] | None = None, trust_remote_code: bool = False) -> dict[str, StageExplanation]:
    """Per stage: is its key in the cache, and if not, which ingredient changed (``qflow explain``).

    ``trust_remote_code=True`` is ``--trust-remote-code``. Example::

        for sid, e in qflow.explain("recipes/llama-rtn.yaml", ["params.group_size=32"]).items():
            print(sid, e.status, e.differs)
    """
    from .engine.cache import CacheStore
    from .engine.keys import closest_entry, compute_keys, environment, resolve_device
    from .engine.runner import load_plan
    from .recipe.safety import remote_code

    offline_defaults()
    opts = _options(runs_dir, libraries=_strings(libraries, "libraries"), allow_env=_strings(allow_env, "allow_env"))
    with remote_code(trust_remote_code):
        plan = load_plan(str(recipe), _strings(overrides, "overrides"), opts)
        store = CacheStore(opts.runs_root / "cache")
        keys = compute_keys(plan, store, environment(resolve_device(plan.recipe.device)))
    report: dict[str, StageExplanation] = {}
    for sid, (key, ingredients) in keys.items():
        if store.get(key) is not None:
            report[sid] = StageExplanation(sid, key, "hit")
            continue
        entry, lines = closest_entry(store, ingredients)
        if entry is None:
            report[sid] = StageExplanation(sid, key, "miss", reason=f"no cached entry of stage {ingredients['stage']}")
        else:
            report[sid] = StageExplanation(sid, key, "miss", closest=entry.key, differs=list(lines))
    return report


def lock(recipe: str | os.PathLike, overrides: Iterable[str] | None = None, *,
         runs_dir: str | os.PathLike | None = None, libraries: Iterable[str] | None = None,
         allow_env: Iterable[str] | None = None, output: str | os.PathLike | None = None,
         trust_remote_code: bool = False) -> tuple[Path, dict[str, Any]]:
    """Write ``RECIPE.lock`` (``qflow lock``): ``(path, record)``, the record being the lock's JSON.

    ``output`` is ``-o`` (default: the recipe's path with ``.lock``); ``trust_remote_code=True`` is
    ``--trust-remote-code``. ``run(..., locked=True)`` then refuses any drift. Example::

        path, record = qflow.lock("recipes/llama-rtn.yaml", ["params.bits=3"])
    """
    from .engine.lock import lock_path, lock_record, write_lock
    from .engine.runner import load_plan
    from .recipe.safety import remote_code

    offline_defaults()
    overrides = _strings(overrides, "overrides")
    opts = _options(runs_dir, libraries=_strings(libraries, "libraries"), allow_env=_strings(allow_env, "allow_env"))
    with remote_code(trust_remote_code):
        plan = load_plan(str(recipe), overrides, opts)
        record = lock_record(plan, str(recipe), overrides, libraries=opts.libraries,
                             cache_root=opts.runs_root / "cache")
    return write_lock(record, Path(output) if output else lock_path(recipe)), record


def load_quantized(run_or_path: "RunSummary | str | os.PathLike", *, stage: str | None = None,
                   runs_dir: str | os.PathLike | None = None, dtype: str = "float32",
                   mode: str = "qlinear", trust_remote_code: bool = False) -> QuantizedModel:
    """The quantized model of a run, built from its IR checkpoint over the float base: ``(model, tokenizer)``.

    ``run_or_path`` is a :class:`RunSummary`, a run folder (``runs/runs/<stamp>-<name>``), an
    MLflow run id (looked up in ``runs_dir``'s store), or a checkpoint folder (one with
    ``ir.json``). A run with several quantizing stages needs ``stage``. ``mode="qlinear"``
    keeps packed weights (``QLinear`` modules running qflow's kernels, activation quantization
    included); ``mode="dequant"`` writes dequantized weights into the float model;
    ``trust_remote_code=True`` lets the base model's own Python code run. Example::

        model, tok = qflow.load_quantized(result)
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        print(tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0]))
    """
    if mode not in ("qlinear", "dequant"):
        raise QflowError(f"unknown mode {mode!r}", where="qflow.load_quantized", fix="use mode='qlinear' or 'dequant'")
    offline_defaults()
    ir_dir = _checkpoint_dir(run_or_path, stage, runs_dir)
    from .models.loading import _torch_dtype
    from .models.quantized import load_quantized_model
    from .quant.ir import Checkpoint

    ckpt = Checkpoint(ir_dir)
    if not (Path(ckpt.base_model) / "config.json").is_file():
        raise SourceError(f"the float base model of checkpoint {ir_dir} is gone ({ckpt.base_model})",
                          where="qflow.load_quantized",
                          fix="re-run the recipe (its model stage restores the base model into the cache)")
    from .recipe.safety import remote_code

    with remote_code(trust_remote_code):
        model, tokenizer = load_quantized_model(ckpt, dtype=_torch_dtype(dtype), mode=mode)
    return QuantizedModel(model.eval(), tokenizer)


_IR_FILE = "ir.json"   # qflow.quant.ir.IR_FILE, without importing torch to resolve a path


def _checkpoint_dir(run_or_path, stage: str | None, runs_dir) -> Path:
    """The IR folder behind a run summary, a run folder, an MLflow run id or a checkpoint folder."""
    if isinstance(run_or_path, RunSummary):
        if not str(run_or_path.run_dir) or not run_or_path.run_dir.is_dir():
            raise QflowError("this run summary has no run folder (a dry run, or a failed sweep point)",
                             where="qflow.load_quantized", fix="pass the result of a run that executed")
        return _checkpoint_of_run(run_or_path.run_dir, stage)
    path = Path(run_or_path)
    if (path / _IR_FILE).is_file():
        return path
    if (path / "summary.json").is_file():
        return _checkpoint_of_run(path, stage)
    if path.exists():
        raise QflowError(f"{path} is neither a run folder (summary.json) nor a quantized checkpoint (ir.json)",
                         where="qflow.load_quantized", fix="pass a folder under <runs>/runs/, a checkpoint or a run id")
    root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    run_dir = _run_dir_of_mlflow_run(str(run_or_path), root)
    return _checkpoint_of_run(run_dir, stage)


def _run_dir_of_mlflow_run(run_id: str, runs_root: Path) -> Path:
    from .tracking import RUN_DIR_TAG, get_run

    if not (runs_root / "mlflow.db").is_file() and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise QflowError(f"'{run_id}' is not a folder, and there is no MLflow store in {runs_root} to look it up",
                         where="qflow.load_quantized", fix="pass a run folder, a checkpoint folder, or runs_dir=")
    try:
        tags = get_run(runs_root, run_id)["tags"]
    except Exception as exc:   # mlflow's own "not found" error types vary by store
        raise QflowError(f"no run folder or MLflow run '{run_id}' ({type(exc).__name__})", where="qflow.load_quantized",
                         fix=f"pass a run folder under {runs_root / 'runs'} or an MLflow run id of that store") from None
    run_dir = runs_root / "runs" / tags.get(RUN_DIR_TAG, "")
    if RUN_DIR_TAG not in tags or not (run_dir / "summary.json").is_file():
        raise QflowError(f"MLflow run {run_id} has no run folder under {runs_root / 'runs'}",
                         where="qflow.load_quantized", fix="pass runs_dir= of the store the run was made with")
    return run_dir


def _checkpoint_of_run(run_dir: Path, stage: str | None) -> Path:
    """The cached IR folder a run's quantizing stage produced (through the keys in its summary.json)."""
    import json

    from .artifacts import Artifact, QuantizedCheckpoint
    from .engine.cache import CacheStore

    summary = json.loads((run_dir / "summary.json").read_text())
    cache = run_dir.parent.parent / "cache"   # runs_root/runs/<run> -> runs_root/cache
    store = CacheStore(cache)
    found: dict[str, Path] = {}
    for sid, key in (summary.get("keys") or {}).items():
        entry = store.get(key) if key else None
        for slot_json in sorted(entry.outputs.glob("*/artifact.json")) if entry is not None else []:
            artifact = Artifact.load(slot_json.parent)
            if isinstance(artifact, QuantizedCheckpoint):
                found[sid] = artifact.ir_dir
    if stage is not None:
        if stage not in found:
            raise QflowError(f"stage '{stage}' of run {run_dir.name} has no quantized checkpoint in the cache",
                             where="qflow.load_quantized",
                             fix=f"stages with one: {', '.join(found) or 'none (re-run the recipe to restore them)'}")
        return found[stage]
    if not found:
        raise QflowError(f"run {run_dir.name} has no quantized checkpoint in the cache {cache}",
                         where="qflow.load_quantized",
                         fix="re-run the recipe (a `cache gc` may have removed it), or pass a checkpoint folder")
    if len(found) > 1:
        raise QflowError(f"run {run_dir.name} has several quantized checkpoints ({', '.join(found)})",
                         where="qflow.load_quantized", fix=f"pass stage=, e.g. stage='{list(found)[-1]}'")
    return next(iter(found.values()))
