"""The recipe's shape (phase 1 of validation); stage configs are phase 2.

Example::

    name: llama-rtn
    model: {source: "zoo:smollm2-135m"}
    data:
      calib: {source: "zoo:wiki-pages", seq_len: 512}
      eval: {source: "zoo:lee-news", seq_len: 512}
    params: {bits: 4, group_size: 64}
    stages:
      calibrate: {uses: calibrate, with: {data: ${data.calib}, n_samples: 16}}
      quantize: {uses: quantize.rtn, needs: [calibrate], with: {bits: ${params.bits}}}
      evaluate: {uses: evaluate.lm, needs: [quantize], with: {data: ${data.eval}},
                 gates: {ppl_ratio: {max: 1.2}}}
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STAGE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class Gate(BaseModel):
    """A bound on one metric of the stage: ``{max: 1.05}``, ``{min: 0.9}`` or both."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "Gate":
        if self.min is None and self.max is None:
            raise ValueError("a gate needs 'min' and/or 'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate min {self.min} > max {self.max}")
        return self

    def check(self, value: float) -> str | None:
        if value != value:  # NaN never passes
            return "is NaN"
        if self.min is not None and value < self.min:
            return f"{value:.6g} < min {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{value:.6g} > max {self.max:g}"
        return None


class StageSpec(BaseModel):
    """One node of the DAG: ``{uses, needs, with, gates, inputs}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    uses: str
    needs: list[str] = Field(default_factory=list)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    gates: dict[str, Gate] = Field(default_factory=dict)
    # explicit wiring, e.g. {model: "quantize.model"}; by default slots bind by name/type
    inputs: dict[str, str] = Field(default_factory=dict)

    @field_validator("needs", mode="before")
    @classmethod
    def _needs_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return [] if v is None else v

    @field_validator("with_", mode="before")
    @classmethod
    def _with_dict(cls, v: Any) -> Any:
        return {} if v is None else v


class ModelSection(BaseModel):
    """Where the float model comes from: ``zoo:NAME``, ``hf:org/name[@rev]``, ``gguf:PATH`` or a folder."""

    model_config = ConfigDict(extra="forbid")
    source: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class SweepSpec(BaseModel):
    """A recipe's declared sweep (``qflow run -m``): Hydra sweep values per key, and the objective."""

    model_config = ConfigDict(extra="forbid")
    params: dict[str, str | int | float | bool | list[str | int | float | bool]] = Field(default_factory=dict)
    objective: str | None = None
    direction: Literal["minimize", "maximize"] = "minimize"
    constraints: list[str] = Field(default_factory=list)
    sweeper: Literal["basic", "optuna"] | None = None
    n_trials: int | None = Field(default=None, ge=1)

    @field_validator("params")
    @classmethod
    def _values(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: ",".join(map(str, x)) if isinstance(x, list) else x for k, x in v.items()}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    model: ModelSection | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)    # shared evaluation-protocol knobs (interpolated)
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    stages: dict[str, StageSpec]
    sweep: SweepSpec = Field(default_factory=SweepSpec)   # declared sweep (see `qflow run -m`)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be empty")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_ids(cls, v: dict[str, StageSpec]) -> dict[str, StageSpec]:
        if not v:
            raise ValueError("a recipe needs at least one stage")
        for sid in v:
            if not STAGE_ID.match(sid):
                raise ValueError(f"stage id {sid!r} must match {STAGE_ID.pattern}")
        return v
