"""Typed artifacts that flow between stages.

An artifact is a folder plus a little JSON metadata. A stage writes files
into ``ctx.output(slot)`` and returns ``SomeArtifact(ctx.output(slot), **meta)``;
the engine records ``artifact.json`` beside the files and rebuilds the object
from it on a cache hit. An artifact may point at an external folder instead
(``external=True``), e.g. a user's local model directory.

The class hierarchy is the type system of the DAG: an output feeds an input
slot when it is an instance of the slot's class (a ``QuantizedCheckpoint`` is
a ``ModelRef``, so ``evaluate`` takes either).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

ARTIFACT_FILE = "artifact.json"


class Artifact:
    kind: ClassVar[str] = "artifact"
    _kinds: ClassVar[dict[str, type["Artifact"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Artifact._kinds[cls.kind] = cls

    def __init__(self, path: str | Path, *, external: bool = False, **meta: Any):
        self.path = Path(path)
        self.external = external
        self.meta = meta

    def __getattr__(self, name: str) -> Any:
        meta = self.__dict__.get("meta", {})
        if name in meta:
            return meta[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "meta": self.meta}
        if self.external:
            data["external_path"] = str(self.path.resolve())
        return data

    @staticmethod
    def save(artifact: "Artifact", slot_dir: Path) -> None:
        slot_dir.mkdir(parents=True, exist_ok=True)
        (slot_dir / ARTIFACT_FILE).write_text(json.dumps(artifact.to_json(), indent=1, sort_keys=True, default=str))

    @staticmethod
    def load(slot_dir: Path) -> "Artifact":
        data = json.loads((slot_dir / ARTIFACT_FILE).read_text())
        cls = Artifact._kinds.get(data["kind"], Artifact)
        if "external_path" in data:
            return cls(Path(data["external_path"]), external=True, **data["meta"])
        return cls(slot_dir, **data["meta"])

    @classmethod
    def describe(cls) -> str:
        return cls.__name__


class ModelRef(Artifact):
    """A float model as a local Hugging Face folder (``path``); meta: ``source``, ``fingerprint``."""

    kind = "model"

    @property
    def base_model_dir(self) -> Path:
        """The float Hugging Face folder to load: for a float model its own folder (``path``, or its
        ``subdir``); for a :class:`QuantizedCheckpoint` the float base its IR applies to."""
        sub = self.meta.get("subdir")
        return self.path / sub if sub else self.path


class QuantizedCheckpoint(ModelRef):
    """A qflow IR folder (qflow.quant.ir) over a float base; meta: ``base_model`` (a folder), ``method``."""

    kind = "quantized"

    @property
    def base_model_dir(self) -> Path:
        """The float base model's folder (meta ``base_model``); the IR itself is ``ir_dir``."""
        return Path(self.meta["base_model"])

    @property
    def ir_dir(self) -> Path:
        return self.path


class CalibSet(Artifact):
    """Calibration token windows (``ids.pt``) and per-linear input statistics (``stats.safetensors``)."""

    kind = "calib"


class SensitivityTable(Artifact):
    """Per-layer, per-option estimated damage and stored bytes (``sensitivity-analyze``).

    ``table.csv`` (and ``table.parquet`` when pyarrow is installed), one row per
    (layer, option): layer, bits, group_size, bytes (exactly what the IR stores),
    damage, estimator, out_features, in_features; ``meta.json``: estimator, method
    and base spec, n_blocks, n_weights, fixed_bytes (the unquantized tensors per
    deployment dtype), the estimator check; meta: ``estimator``, ``method``, ``n_layers``.
    """

    kind = "sensitivity"


class BitAllocation(Artifact):
    """One quantization option per layer (``allocate-bits``), ``allocation.json``::

        {"layers": {"model.layers.0.self_attn.q_proj": {"bits": 4, "group_size": 64}, ...},
         "spec": {"method": "awq", "scheme": "asym_a", "scale_dtype": "float16"},
         "budget": {"bpw": 4.0, "bytes": null, ...},
         "predicted": {"bpw": ..., "bpw_nominal": ..., "bytes": ..., "damage": ...},
         "solver": {"name": "milp", "optimal": true, "gap": 0.0, ...}}

    A quantize stage applies each ``layers`` entry as a per-layer spec override;
    ``predicted.bytes``/``bpw`` are the bytes its IR then stores. Also ``pareto.csv``.
    meta: ``bpw``, ``solver``, ``n_layers``.
    """

    kind = "allocation"


class EvalReport(Artifact):
    """Metrics (``metrics.json``) and report files of an evaluation."""

    kind = "eval"


class ExportedModel(Artifact):
    """A deployable export (folder); meta: ``format``."""

    kind = "export"
