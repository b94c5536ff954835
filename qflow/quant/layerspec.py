"""Per-layer control of a quantize stage: recipe overrides, an allocation plan, their resolution.

A quantize stage quantizes a set of linears (module names such as
``model.layers.0.mlp.down_proj``) with one spec of its own. Three things may
change that per layer, applied in this order (later wins):

1. the stage's own spec (``bits``, ``group_size``, ... of ``with:``);
2. a plan: the ``allocation.json`` of a ``BitAllocation`` artifact wired to the
   stage's optional ``plan`` input (``{"layers": {name: {bits, group_size, ...} | null}}``;
   null = left float; a layer absent from the plan keeps the stage's spec);
3. ``layers:`` overrides in the recipe, ``{pattern: {field: value}}``, applied in
   order, field by field (the last match wins);
4. ``ignore:`` patterns: those linears are left float.

A pattern is an exact module name or ``re:REGEX`` (``re.match`` on the module
name, anchored at the start, as compressed-tensors' targets). Every pattern must
match at least one linear of the stage and every resulting spec must fit its
layer's shape; both are checked before any work (the stage's ``check``).

Example::

    quantize:
      uses: quantize.rtn
      with:
        bits: 4
        layers: {"re:.*down_proj": {bits: 8}, model.layers.0.self_attn.q_proj: {bits: 4, group_size: 32}}
        ignore: ["re:.*layers\\.1\\.mlp\\.gate_proj"]

    specs = resolve(shapes, cfg.base_spec(), layers=cfg.layers, ignore=cfg.ignore, plan=read_plan(plan))
    specs.spec_for("model.layers.0.mlp.down_proj")   # QuantSpec(bits=8, ...) or None (float)
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import StageError
from ..registry import StageConfig
from .spec import QuantSpec

ALLOCATION_FILE = "allocation.json"


class LayerOverride(BaseModel):
    """The spec fields one ``layers:`` entry may change (each stage allows a subset)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int | None = None
    group_size: int | None = None
    scheme: Literal["asym_z", "asym_a", "asym_h", "sym_r", "sym_f"] | None = None
    symmetric: bool | None = None
    format: Literal["int", "nf4", "fp4"] | None = None
    double_quant: bool | None = None
    scale_dtype: Literal["float16", "float32", "bfloat16"] | None = None

    def update(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable layer pattern, or None."""
    if not isinstance(pattern, str) or not pattern.strip():
        return "a layer pattern must be a non-empty module name or re:REGEX"
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            return f"{pattern!r} is not a valid regular expression ({exc})"
    return None


def matches(pattern: str, name: str) -> bool:
    """Exact module name, or ``re:REGEX`` matched at the start of the name (compressed-tensors' rule)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def closest_names(pattern: str, names: list[str], n: int = 3) -> list[str]:
    """Module names nearest to ``pattern`` (regex punctuation ignored) for an error hint."""
    plain = pattern[3:] if pattern.startswith("re:") else pattern
    plain = re.sub(r"\\(.)", r"\1", plain)
    plain = re.sub(r"[\^\$\*\+\?\(\)\[\]\{\}\|]", "", plain).replace("..", ".")
    close = difflib.get_close_matches(plain, names, n=n, cutoff=0.0)
    return close or names[:n]


def merged_spec(base: QuantSpec, update: dict[str, Any]) -> QuantSpec:
    """``base`` with the fields of ``update`` changed (ValueError when the result is not a valid spec).

    Setting ``symmetric`` alone re-derives the scheme; switching format drops what the
    other format cannot have (a scheme for nf4/fp4, double quantization for int).
    """
    if not update:
        return base
    data = base.model_dump()
    fmt = update.get("format", data["format"])
    if "symmetric" in update and "scheme" not in update:
        data["scheme"] = None
    if fmt != "int":
        data["scheme"], data["symmetric"], data["zero_float"] = None, False, False
    elif data["format"] != "int":
        data["double_quant"] = False
    data.update(update)
    return QuantSpec(**data)


def spec_text(spec: QuantSpec | None) -> str:
    """Short human form of a spec: ``int4 g64 asym_z``, ``nf4 g64``, ``float``."""
    if spec is None:
        return "float"
    if spec.format != "int":
        return f"{spec.format} g{spec.group_size}{' dq' if spec.double_quant else ''}"
    act = f" a{spec.act_bits}" if spec.act_bits else ""
    return f"int{spec.bits} g{spec.group_size} {spec.scheme}{' zero_float' if spec.zero_float else ''}{act}"


# ---------------------------------------------------------------------------
# the stage config part
# ---------------------------------------------------------------------------

class PerLayerConfig(StageConfig):
    """Base of a quantize stage's config: ``layers:`` overrides and ``ignore:`` patterns.

    Subclasses set ``layer_fields`` (the spec fields a layer may change; empty: only
    ``ignore`` is allowed) and implement ``base_spec()``.
    """

    layer_fields: ClassVar[tuple[str, ...]] = ("bits", "group_size")

    layers: dict[str, LayerOverride] = Field(
        default_factory=dict, description="per-layer spec changes {module name | re:REGEX: {bits, group_size, ...}}, "
                                          "applied in order, the last match wins; beat a plan input")
    ignore: list[str] = Field(default_factory=list, description="module names / re:REGEX patterns left float")
    moe_quantize_router: bool = Field(False, description="mixture-of-experts: quantize the routers (mlp.gate, "
                                      "mlp.shared_expert_gate) too; by default they stay float")

    @field_validator("ignore")
    @classmethod
    def _ignore_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            problem = pattern_problem(pattern)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _layer_overrides(self):
        if not self.layers:
            return self
        base = self.base_spec()
        for pattern, override in self.layers.items():
            problem = pattern_problem(pattern)
            if problem:
                raise ValueError(f"layers: {problem}")
            update = override.update()
            stray = sorted(set(update) - set(self.layer_fields))
            if stray:
                allowed = ", ".join(self.layer_fields) or "nothing (use ignore: to leave layers float)"
                raise ValueError(f"layers.{pattern}: {', '.join(stray)} cannot be set per layer in this stage "
                                 f"(allowed: {allowed})")
            if not update:
                raise ValueError(f"layers.{pattern} changes nothing; give e.g. {{bits: 8}} or remove it")
            try:
                merged_spec(base, update)
            except ValueError as exc:
                raise ValueError(f"layers.{pattern}: {exc}") from None
        return self

    def base_spec(self) -> QuantSpec:  # pragma: no cover - every stage config overrides it
        raise NotImplementedError


# ---------------------------------------------------------------------------
# the plan input (BitAllocation)
# ---------------------------------------------------------------------------

def read_plan(plan: Any, *, where: str = "plan") -> dict[str, dict[str, Any] | None] | None:
    """``{layer: {field: value} | None}`` of a BitAllocation artifact (None when no plan is wired)."""
    if plan is None:
        return None
    path = Path(plan.path) / ALLOCATION_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read the allocation plan {path} ({exc})", where=where,
                         fix="re-run the allocate-bits stage (qflow run --force STAGE)") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise StageError(f"{path} has no 'layers' mapping", where=where,
                         fix="an allocation.json holds {\"layers\": {module: {bits, group_size} | null}}")
    out: dict[str, dict[str, Any] | None] = {}
    for name, entry in layers.items():
        if entry is not None and not isinstance(entry, dict):
            raise StageError(f"{path}: layers.{name} is {entry!r}, expected an object or null", where=where,
                             fix="write e.g. {\"bits\": 3, \"group_size\": 64}, or null to leave it float")
        out[name] = entry
    return out


def write_plan(folder: str | Path, layers: dict[str, dict[str, Any] | None], **extra: Any):
    """A ``BitAllocation`` artifact in ``folder`` holding ``layers`` (for tests and hand-made plans)."""
    from ..artifacts import BitAllocation

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ALLOCATION_FILE).write_text(json.dumps({"layers": layers, **extra}, indent=1, sort_keys=True))
    return BitAllocation(folder)


# ---------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSpecs:
    """The spec of every candidate linear of a stage (None: left float) and where it came from."""

    base: QuantSpec
    specs: dict[str, QuantSpec | None]
    origin: dict[str, str]                                  # "stage" | "plan" | "layers" | "ignore"
    overruled: list[str] = field(default_factory=list)      # "NAME: plan X -> recipe Y"

    def spec_for(self, name: str) -> QuantSpec | None:
        """The layer's spec (the stage's own for a linear the resolution did not see)."""
        return self.specs.get(name, self.base)

    @property
    def quantized(self) -> list[str]:
        return [n for n, s in self.specs.items() if s is not None]

    @property
    def floats(self) -> list[str]:
        return [n for n, s in self.specs.items() if s is None]

    def is_uniform(self) -> bool:
        return all(s == self.base for s in self.specs.values())

    def signature(self) -> dict[str, Any] | None:
        """The layers whose spec differs from the stage's (JSON; None when uniform), for resume guards."""
        if self.is_uniform():
            return None
        return {n: (s.model_dump(mode="json") if s is not None else None)
                for n, s in self.specs.items() if s != self.base}

    def summary(self) -> dict[str, Any]:
        """Counts per spec and per origin, and the layers where the recipe beat the plan."""
        per_spec: dict[str, int] = {}
        for s in self.specs.values():
            per_spec[spec_text(s)] = per_spec.get(spec_text(s), 0) + 1
        per_origin: dict[str, int] = {}
        for o in self.origin.values():
            per_origin[o] = per_origin.get(o, 0) + 1
        return {"specs": per_spec, "origin": per_origin, "recipe_over_plan": list(self.overruled)}


def resolve(shapes: dict[str, tuple[int, int]], base: QuantSpec, *, layers: dict[str, Any] | None = None,
            ignore: list[str] | None = None, plan: dict[str, dict[str, Any] | None] | None = None,
            plan_fields: tuple[str, ...] | None = None, where: str = "with") -> LayerSpecs:
    """Each linear's spec: stage ``base`` < ``plan`` < ``layers`` overrides (in order) < ``ignore``.

    ``shapes``: ``{module name: (out_features, in_features)}`` of the linears the stage
    quantizes. ``plan_fields``: the fields a plan entry may set (default: any spec field
    a ``layers:`` entry could). Raises StageError for a pattern that matches nothing
    (naming the closest modules), a plan naming unknown layers or fields, an invalid
    spec, or a spec that does not fit its layer's shape.
    """
    names = list(shapes)
    layers = dict(layers or {})
    ignore = list(ignore or [])
    for kind, patterns in (("layers", list(layers)), ("ignore", ignore)):
        for pattern in patterns:
            if not any(matches(pattern, n) for n in names):
                near = ", ".join(closest_names(pattern, names))
                raise StageError(f"{kind} pattern {pattern!r} matches none of the {len(names)} linears this stage "
                                 f"quantizes (closest: {near})", where=f"{where}.{kind}",
                                 fix="use an exact module name or re:REGEX (matched from the start of the name)")
    specs: dict[str, QuantSpec | None] = {}
    origin: dict[str, str] = {}
    overruled: list[str] = []
    if plan is not None:
        unknown = sorted(set(plan) - set(names))
        if unknown:
            near = ", ".join(closest_names(unknown[0], names))
            raise StageError(f"the allocation plan names {len(unknown)} layer(s) this stage does not quantize, e.g. "
                             f"{unknown[0]!r} (closest: {near})", where=f"{where.rsplit('.', 1)[0]}.inputs.plan",
                             fix="allocate bits for the same model and targets, or widen the stage's targets")
    for name in names:
        spec: QuantSpec | None = base
        source = "stage"
        plan_update: dict[str, Any] | None = None
        if plan is not None and name in plan:
            entry = plan[name]
            source = "plan"
            if entry is None:
                spec = None
            else:
                plan_update = dict(entry)
                allowed = plan_fields if plan_fields is not None else tuple(LayerOverride.model_fields)
                stray = sorted(set(plan_update) - set(allowed))
                if stray:
                    raise StageError(f"the allocation plan sets {', '.join(stray)} for {name}, which this stage "
                                     f"cannot change per layer (allowed: {', '.join(allowed) or 'null only'})",
                                     where=f"{where.rsplit('.', 1)[0]}.inputs.plan",
                                     fix="feed the plan to a quantize stage that supports those fields")
                try:
                    spec = merged_spec(base, plan_update)
                except ValueError as exc:
                    raise StageError(f"the allocation plan's entry for {name} ({plan_update}) is not a valid spec: "
                                     f"{exc}", where=f"{where.rsplit('.', 1)[0]}.inputs.plan",
                                     fix="re-run allocate-bits with options this method supports") from None
        recipe_update: dict[str, Any] = {}
        for pattern, override in layers.items():
            if matches(pattern, name):
                upd = override.update() if isinstance(override, LayerOverride) else dict(override)
                recipe_update.update(upd)
        if recipe_update:
            start = spec if spec is not None else base
            try:
                new = merged_spec(start, recipe_update)
            except ValueError as exc:
                raise StageError(f"{name}: the layers: overrides {recipe_update} give an invalid spec: {exc}",
                                 where=f"{where}.layers", fix="change the override") from None
            if source == "plan":
                before = spec_text(spec)
                overruled.append(f"{name}: plan {before} -> recipe {spec_text(new)}")
            spec, source = new, "layers"
        if any(matches(p, name) for p in ignore):
            if source == "plan" and spec is not None:
                overruled.append(f"{name}: plan {spec_text(spec)} -> recipe ignore (float)")
            spec, source = None, "ignore"
        if spec is not None:
            problem = spec.check_shape(*shapes[name])
            if problem:
                fix_at = {"plan": f"{where.rsplit('.', 1)[0]}.inputs.plan", "layers": f"{where}.layers"}.get(
                    source, f"{where}.group_size")
                raise StageError(f"{name} [{shapes[name][0]}x{shapes[name][1]}] under {spec_text(spec)} "
                                 f"(from the {source}): {problem}", where=fix_at,
                                 fix="override that layer's group_size in layers:, or ignore it")
        specs[name], origin[name] = spec, source
    return LayerSpecs(base, specs, origin, overruled)


# ---------------------------------------------------------------------------
# the model's linears, from the folder (no weights loaded)
# ---------------------------------------------------------------------------

def linear_shapes(folder: str | Path, targets: str | None = None,
                  exclude: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of the folder's decoder linears (safetensors headers only)."""
    from .weights import DEFAULT_TARGETS, linear_names, tensor_index

    folder = Path(folder)
    names = linear_names(folder, targets or DEFAULT_TARGETS, exclude)
    index = tensor_index(folder)
    out: dict[str, tuple[int, int]] = {}
    for name in names:
        rows, cols = index[name + ".weight"].shape
        out[name] = (int(rows), int(cols))
    return out


def _model_folder(ref: Any) -> Path | None:
    if ref is None or isinstance(ref, dict):  # not computed yet ({"planned": ...})
        return None
    folder = getattr(ref, "base_model_dir", None)
    return Path(folder) if folder is not None else None


def stage_layer_specs(cfg: Any, model: Any, plan: Any, *, stage_id: str | None = None,
                      targets: str | None = None, exclude: list[str] | None = None,
                      plan_fields: tuple[str, ...] | None = None) -> LayerSpecs:
    """Resolve a quantize stage's per-layer specs from its model folder, config and plan artifact."""
    folder = _model_folder(model)
    if folder is None:
        raise StageError("the model input has no folder", where=f"stages.{stage_id or '?'}")
    where = f"stages.{stage_id}.with" if stage_id else "with"
    shapes = linear_shapes(folder, targets, exclude)
    if not shapes:
        raise StageError(f"no linear weights match targets {targets!r} in {folder}", where=f"{where}.targets",
                         fix="adjust the targets regex (a BERT-family encoder's layers: '\\.layer\\.\\d+\\.')")
    # mixture-of-experts routers stay float unless the stage says otherwise (docs/METHODS.md §4.2)
    from .expert_names import is_router

    routers = [] if getattr(cfg, "moe_quantize_router", False) else [n for n in shapes if is_router(n)]
    return resolve(shapes, cfg.base_spec(), layers=cfg.layers, ignore=[*cfg.ignore, *routers],
                   plan=read_plan(plan, where=f"stages.{stage_id}.inputs.plan" if stage_id else "plan"),
                   plan_fields=plan_fields if plan_fields is not None else cfg.layer_fields, where=where)


def check_layer_specs(cfg: Any, inputs_meta: dict[str, Any] | None, *, targets: str | None = None,
                      exclude: list[str] | None = None) -> list[str]:
    """A stage ``check``'s problems with its per-layer control (empty until the model folder is known)."""
    inputs_meta = inputs_meta or {}
    model = inputs_meta.get("model")
    if _model_folder(model) is None:
        return []
    plan = inputs_meta.get("plan")
    if isinstance(plan, dict):   # the plan is not computed yet: check the recipe's own patterns now
        plan = None
    if not cfg.layers and not cfg.ignore and plan is None:
        return []
    try:
        stage_layer_specs(cfg, model, plan, targets=targets, exclude=exclude)
    except StageError as err:
        return [str(err)]
    except (OSError, ValueError) as exc:   # an unreadable model folder is reported by the stage itself
        return [f"cannot list the model's linears ({exc})"]
    return []


def report_resolution(ctx: Any, specs: LayerSpecs) -> None:
    """Log the per-layer outcome and put it into the run's summary (tags, ``layer_specs.json``)."""
    summary = specs.summary()
    tags = dict(ctx.info.get("tags") or {})
    if not specs.is_uniform():
        mix = ", ".join(f"{k}: {v}" for k, v in summary["specs"].items())
        ctx.log.info("per-layer specs: %s", mix)
        tags["qflow.layers.specs"] = mix
    if summary["origin"].get("plan") or summary["recipe_over_plan"]:
        tags["qflow.layers.plan"] = f"{summary['origin'].get('plan', 0)} layer(s) from the allocation plan"
    if specs.overruled:
        text = (f"recipe overrides win over the allocation plan for {len(specs.overruled)} layer(s): "
                + "; ".join(specs.overruled[:8]) + ("; ..." if len(specs.overruled) > 8 else ""))
        ctx.log.warning("%s", text)
        tags["qflow.note.plan_overrides"] = text
    if tags:
        ctx.info["tags"] = tags
    try:
        path = Path(ctx.scratch) / "layer_specs.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"summary": summary, "layers": {
            n: {"spec": s.model_dump(mode="json") if s is not None else None, "origin": specs.origin[n]}
            for n, s in specs.specs.items()}}, indent=1))
        ctx.log_artifact(path, "layer_specs.json")
    except Exception as exc:  # a report copy must not fail the stage; say so
        ctx.log.warning("could not record layer_specs.json: %s", exc)
