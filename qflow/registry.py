"""Stage base class, ``@register``, and discovery.

Stages are found through the entry-point group ``qflow.stages`` (each entry
names a module whose import registers its stages) plus the built-in
``stages/`` package. A module that fails to import is reported as *broken*
with its error, never dropped silently. Stage modules must not import torch
at module level so that ``qflow ls`` stays fast.

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

import importlib
import pkgutil
import traceback
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .artifacts import Artifact

ENTRY_POINT_GROUP = "qflow.stages"


class StageConfig(BaseModel):
    """Base of every stage's ``Config``: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Stage:
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = StageConfig
    inputs: ClassVar[dict[str, type[Artifact]]] = {}
    optional_inputs: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[dict[str, type[Artifact]]] = {}
    # capability flags checked before anything runs
    requires_packages: ClassVar[tuple[str, ...]] = ()
    requires_gpu: ClassVar[bool] = False
    # False for stages whose output must never be cached (e.g. timing-only)
    cacheable: ClassVar[bool] = True

    def run(self, ctx: Any, cfg: Any, **inputs: Artifact) -> dict[str, Artifact]:
        raise NotImplementedError(f"stage {self.name} does not implement run()")

    @classmethod
    def fingerprint_sources(cls, cfg: Any, cache_root: Any) -> dict[str, str]:
        """Fingerprints of outside sources this stage reads (files, hub revisions): key ingredients."""
        return {}

    def check(self, cfg: Any, inputs_meta: dict[str, Any]) -> list[str]:
        """Problems found before anything runs (override); each a one-line message."""
        return []

    def estimate_peak_bytes(self, cfg: Any, inputs_meta: dict[str, Any] | None = None,
                            model_config: dict[str, Any] | None = None) -> int | None:
        """Rough peak memory of ``run`` in bytes (override), or None when unknown.

        ``inputs_meta``: per input slot the cached upstream artifact, or
        ``{"planned": <upstream stage config>}`` when it is not computed yet;
        ``model_config``: the recipe model's ``config.json`` once the model stage
        has run. Used by ``--dry-run``, the pre-stage memory warning and ``-j N``
        sweeps (``qflow.quant.memory`` has the building blocks).
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
    """Import every stage module once (entry points + built-in ``stages`` package)."""
    global _discovered
    if _discovered:
        return _REGISTRY
    _discovered = True
    modules: list[str] = []
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        modules.append(ep.value.split(":")[0])
    try:
        import stages as builtin

        modules += [f"stages.{m.name}" for m in pkgutil.iter_modules(builtin.__path__) if not m.name.startswith("_")]
    except ImportError as exc:
        _REGISTRY.broken["stages"] = f"built-in stages package not importable: {exc}"
    for module in dict.fromkeys(modules):
        _import(module)
    return _REGISTRY


def get(name: str) -> type[Stage] | None:
    return discover().stages.get(name)
