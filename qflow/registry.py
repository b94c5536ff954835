"""Stage base class, ``@register``, and discovery.

Stages are found through the entry-point group ``qflow.stages``: each entry
names a module whose import registers its stages, and pyproject.toml lists
every module of the built-in ``stages/`` package (``make setup`` installs
qflow, and so its entry points). A module that fails to import is reported
as *broken* with its error, never dropped silently. Stage modules must not
import torch at module level so that ``qflow ls`` stays fast.

Example::

    @register("quantize.rtn")
    class RTN(Stage):
        '''Round-to-nearest baseline.

            quantize: {uses: quantize.rtn, needs: [calibrate], with: {bits: 4}}
        '''
        version = 1
        class Config(StageConfig):
            bits: int = 4
        inputs = {"model": ModelRef}
        outputs = {"model": QuantizedCheckpoint}
        def run(self, ctx, cfg, model): ...
"""

from __future__ import annotations

import fnmatch
import importlib
import traceback
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict

from .artifacts import Artifact

ENTRY_POINT_GROUP = "qflow.stages"
ENGINE_METRICS = ("peak_rss_mb",)   # logged by the engine for every stage that runs (its process's peak RSS, MiB)


class UndeclaredMetricWarning(UserWarning):
    """A stage logged a metric that its ``Stage.metrics`` does not declare, so ``qflow lint`` would call a
    gate on it unknown (the test suite turns this warning into an error)."""


def undeclared_metrics(stage: "type[Stage]", names) -> list[str]:
    """The names in ``names`` that match none of ``stage.metrics`` (nor the engine's own); [] when the
    stage declares nothing."""
    declared = getattr(stage, "metrics", None)
    if declared is None:
        return []
    patterns = (*declared, *ENGINE_METRICS)
    return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns))


class StageConfig(BaseModel):
    """Base of every stage's ``Config``: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Upstream:
    """What the engine knows, before a stage runs, of one stage it depends on directly or not.

        Upstream("model", "model.load", {"source": "zoo:smollm2-135m", "dtype": "float32"},
                 {"model": ModelRef("/models/smollm2")})   # outputs stay empty until it has run
    """

    stage_id: str
    uses: str
    config: dict[str, Any]                                       # its resolved Config, as JSON
    outputs: dict[str, Artifact] = field(default_factory=dict)   # its artifacts once cached (or run)


class Stage:
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = StageConfig
    inputs: ClassVar[dict[str, type[Artifact]]] = {}
    optional_inputs: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[dict[str, type[Artifact]]] = {}
    # the top-level recipe section this stage is built from when the recipe does not list it
    # (model.load: "model"); the plan adds it under the section's name
    recipe_section: ClassVar[str | None] = None
    # capability flags, checked by the engine's preflight before any stage starts
    requires_packages: ClassVar[tuple[str, ...]] = ()
    requires_gpu: ClassVar[bool] = False   # refused unless the run's device is a CUDA GPU
    # the metric names the stage logs (fnmatch patterns); None: not declared, `qflow lint` skips its gates.
    # The engine warns (UndeclaredMetricWarning) when a declaring stage logs a name no pattern matches
    metrics: ClassVar[tuple[str, ...] | None] = None

    def run(self, ctx: Any, cfg: Any, **inputs: Artifact) -> dict[str, Artifact]:
        raise NotImplementedError(f"stage {self.name} does not implement run()")

    def on_hit(self, cfg: Any, outputs: dict[str, Artifact], *, key: str, stage_id: str) -> list[str]:
        """Called when a run finds this stage cached (override): side effects the run owes the user
        outside the cache, e.g. an export's copy at its ``path``. Must not change the outputs;
        returns notes for the run's log (one line each)."""
        return []

    @classmethod
    def fingerprint_sources(cls, cfg: Any, cache_root: Any) -> dict[str, str]:
        """Fingerprints of outside sources this stage reads (files, hub revisions): key ingredients."""
        return {}

    def check(self, cfg: Any, inputs_meta: dict[str, Any]) -> list[str]:
        """Problems found before anything runs (override); each a one-line message.

        ``inputs_meta``: per input slot the upstream artifact, or in preflight ``{"planned":
        <upstream stage config>}`` when it is not computed yet (as for ``estimate_peak_bytes``).
        """
        return []

    def estimate_peak_bytes(self, cfg: Any, inputs_meta: dict[str, Any], upstream: Sequence[Upstream]) -> int | None:
        """Rough peak memory of ``run`` in bytes (override), or None when unknown.

        ``inputs_meta``: per input slot the upstream artifact, or ``{"planned":
        <upstream stage config>}`` when it is not computed yet; ``upstream``: every
        stage this one depends on, directly or not, nearest first (e.g. the model
        stage's ``ModelRef`` once it has run, for the model's ``config.json``).
        Used by ``--dry-run``, the pre-stage memory warning and ``-j N`` sweeps
        (``qflow.models.memory`` has the building blocks).
        """
        return None

    @classmethod
    def doc(cls) -> str:
        import inspect

        return inspect.cleandoc(cls.__doc__ or "")


@dataclass
class Registry:
    stages: dict[str, type[Stage]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # module -> error text
    origins: dict[str, str] = field(default_factory=dict)  # stage name -> module


_REGISTRY = Registry()
_current_module: list[str] = []
_discovered = False


def register(name: str):
    """Class decorator: make a Stage subclass available to recipes as ``uses: name``."""

    def deco(cls: type[Stage]) -> type[Stage]:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"@register({name!r}) must decorate a Stage subclass")
        existing = _REGISTRY.stages.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"stage {name!r} registered twice ({existing.__module__} and {cls.__module__})")
        rival = cls.recipe_section and _section_stage(cls.recipe_section)
        if rival and rival.name != name:
            raise ValueError(f"stages {rival.name!r} and {name!r} both declare recipe_section {cls.recipe_section!r}")
        cls.name = name
        _REGISTRY.stages[name] = cls
        _REGISTRY.origins[name] = cls.__module__
        return cls

    return deco


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken plugin is reported, never hidden
        tb = traceback.format_exception_only(type(exc), exc)
        _REGISTRY.broken[module] = "".join(tb).strip()


def discover() -> Registry:
    """Import every stage module named in the ``qflow.stages`` entry points, once."""
    global _discovered
    if _discovered:
        return _REGISTRY
    _discovered = True
    from importlib.metadata import entry_points

    modules = [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    if not modules:
        _REGISTRY.broken[ENTRY_POINT_GROUP] = ("no module declares the entry-point group qflow.stages, so no stage "
                                               "is known: install qflow with `make setup` (pip install -e .)")
    for module in dict.fromkeys(modules):
        _import(module)
    return _REGISTRY


def get(name: str) -> type[Stage] | None:
    return discover().stages.get(name)


def _section_stage(section: str) -> type[Stage] | None:
    return next((cls for cls in _REGISTRY.stages.values() if cls.recipe_section == section), None)


def section_stage(section: str) -> type[Stage] | None:
    """The stage built from the recipe's top-level ``section`` when the recipe does not list it, or None.

        section_stage("model")   # the model.load stage class
    """
    discover()
    return _section_stage(section)
