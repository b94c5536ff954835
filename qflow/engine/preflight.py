"""Before a stage runs: capability checks and peak-memory estimates.

    preflight(plan, store, keys, device)        # PlanError listing every problem, before any stage starts
    estimate_peaks(plan, store, keys)           # {stage id: bytes or None}, for --dry-run and -j N sweeps

What the engine knows of a stage's upstream before it runs is what is cached
(or, during a run, what has run): the stages answer the rest themselves
(``Stage.check``, ``Stage.estimate_peak_bytes``), so the engine needs no model
or quantization knowledge.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from ..artifacts import Artifact
from ..errors import PlanError
from ..registry import Upstream
from ..units import format_bytes
from .cache import CacheStore
from .keys import Keys
from .plan import Plan, PlannedStage

log = logging.getLogger(__name__)

Outputs = dict[str, dict[str, Artifact]]   # stage id -> {output slot: artifact}, for the stages that have them


def cached_outputs(plan: Plan, store: CacheStore, keys: Keys) -> Outputs:
    """The outputs of every stage whose cache entry exists (read without waiting on locks)."""
    known: Outputs = {}
    for sid, st in plan.stages.items():
        entry = store.get(keys[sid][0])
        if entry is not None:
            known[sid] = {slot: Artifact.load(entry.outputs / slot) for slot in st.cls.outputs
                          if (entry.outputs / slot / "artifact.json").is_file()}
    return known


def inputs_meta(st: PlannedStage, known: Outputs, plan: Plan | None = None) -> dict[str, Any]:
    """Per input slot of ``st``, its upstream artifact when known; with ``plan``, ``{"planned":
    <upstream stage config>}`` for the other slots (what ``Stage.estimate_peak_bytes`` reads)."""
    out: dict[str, Any] = {}
    for slot, (src, name) in st.bindings.items():
        artifact = known.get(src, {}).get(name)
        if artifact is not None:
            out[slot] = artifact
        elif plan is not None:
            out[slot] = {"planned": plan.stages[src].config.model_dump(mode="json")}
    return out


def upstream_of(plan: Plan, sid: str, known: Outputs) -> list[Upstream]:
    """Every stage ``sid`` depends on, directly or not, nearest first, with its known outputs."""
    ancestors = plan.upstream(sid) - {sid}
    return [Upstream(a, plan.stages[a].uses, plan.stages[a].config.model_dump(mode="json"), dict(known.get(a, {})))
            for a in reversed(plan.order()) if a in ancestors]


def preflight(plan: Plan, store: CacheStore, keys: Keys, device: str) -> None:
    """Capability checks of every stage, before the first one starts.

    A stage that ``requires_gpu`` is refused unless the run's device is ``cuda``;
    every ``requires_packages`` entry must be importable; a stage's ``check(cfg,
    inputs)`` sees the upstream artifacts that are already cached (e.g. the model
    folder, for group-size checks) and ``{"planned": <upstream config>}`` for the
    others (e.g. ``model.load``'s local folder, whose tokenizer measures a
    calibration text). The runner calls ``check`` again with the real
    inputs right before the stage runs.
    """
    known = cached_outputs(plan, store, keys)
    problems = []
    for sid, st in plan.stages.items():
        if st.cls.requires_gpu and device != "cuda":
            problems.append(f"stages.{sid} ({st.uses}) needs a CUDA GPU but this run's device is {device} "
                            f"(device: {plan.recipe.device}); run it on a machine with a GPU")
        for pkg in st.cls.requires_packages:
            if importlib.util.find_spec(pkg) is None:
                problems.append(f"stages.{sid} ({st.uses}) needs the Python package '{pkg}' (pip install {pkg})")
        for msg in st.cls().check(st.config, inputs_meta(st, known, plan)):
            problems.append(f"stages.{sid} ({st.uses}): {msg}")
    if problems:
        raise PlanError("; ".join(problems), where=plan.source, fix="fix the listed problems before running")


def estimate_peak(st: PlannedStage, meta: dict[str, Any], upstream: list[Upstream]) -> int | None:
    """The stage's own peak-memory estimate in bytes; None when unknown or when the estimate fails."""
    try:
        return st.cls().estimate_peak_bytes(st.config, meta, upstream)
    except Exception as exc:  # an estimate must never stop a run
        log.debug("peak estimate of %s failed: %s", st.id, exc)
        return None


def estimate_peaks(plan: Plan, store: CacheStore, keys: Keys) -> dict[str, int | None]:
    """Each stage's peak-memory estimate (bytes, None when unknown) from what is cached and planned."""
    known = cached_outputs(plan, store, keys)
    return {sid: estimate_peak(st, inputs_meta(st, known, plan), upstream_of(plan, sid, known))
            for sid, st in plan.stages.items()}


def memory_warning(sid: str, estimate: int | None) -> str | None:
    """A warning when ``estimate`` exceeds the memory available now, else None."""
    if not estimate:
        return None
    import psutil

    available = psutil.virtual_memory().available
    if estimate <= available:
        return None
    return (f"[{sid}] warning: estimated peak memory {format_bytes(estimate)} exceeds the "
            f"{format_bytes(available)} available; the stage may be killed (lower batch_size / "
            f"n_samples, or free memory)")
