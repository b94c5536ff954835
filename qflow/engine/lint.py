"""``qflow lint RECIPE...``: what is wrong with a recipe, found before a long run.

Each finding is ``{recipe, code, where, message, fix}``; the codes:

* ``schema``: the recipe does not compose, a value has the wrong type, a
  required key is missing, a stage is unknown, or the stages cannot be wired;
* ``unknown-key``: a key the recipe's schema or the stage's ``Config`` does
  not have (with the closest valid key);
* ``pattern-matches-nothing``: a ``layers:`` / ``ignore:`` pattern that no
  linear of the model matches, and ``group-size``: a group size that does not
  divide a linear's input width (both from the model's configuration built on
  the meta device, no weights: ``qflow/models/lint.py``, handed in by the CLI);
* ``unused-param``: a ``params`` key the recipe's own file (or the command
  line) sets that no ``${params.KEY}`` interpolation and no sweep reads
  (shared library pieces may set knobs a recipe does not use);
* ``gate-metric``: a gate on a metric the stage does not produce (checked for
  stages that declare ``Stage.metrics``);
* ``unconsumed-output``: a stage whose outputs no other stage takes, unless it
  is an end point (``evaluate.*`` and ``export.*`` stages).

Example::

    findings = lint("recipes/llama-awq.yaml", [], libraries=[], cache_root=Path("runs/cache"))
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from ..errors import QflowError
from ..registry import undeclared_metrics

ModelCheck = Callable[[str | None, list[tuple[str, Any]]], list[dict[str, str]]]
_PARAM_REF = re.compile(r"\$\{\s*params\.([A-Za-z0-9_]+)")
_END_POINTS = ("evaluate.", "export.")


def _finding(recipe: str, code: str, where: str, message: str, fix: str = "") -> dict[str, str]:
    return {"recipe": recipe, "code": code, "where": where, "message": message, "fix": fix}


def _validation_findings(recipe: str, exc, prefix: tuple[Any, ...], fields_at) -> list[dict[str, str]]:
    from ..errors import closest
    from ..recipe.validate import yaml_path

    out = []
    for err in exc.errors():
        loc = tuple(prefix) + tuple(err["loc"])
        where = yaml_path(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = fields_at(loc[:-1])
            best = closest(str(loc[-1]), valid)
            out.append(_finding(recipe, "unknown-key", where, f"unknown key '{loc[-1]}'",
                                f"did you mean '{best}'?" if best else f"valid keys: {', '.join(sorted(valid))}"))
        else:
            out.append(_finding(recipe, "schema", where, err["msg"].removeprefix("Value error, "),
                                f"set {where} to a valid value"))
    return out


def lint(recipe: str, overrides: list[str], *, libraries: list[str], cache_root: Path,
         model_check: ModelCheck | None = None) -> list[dict[str, str]]:
    from omegaconf import OmegaConf
    from pydantic import ValidationError

    from ..recipe.compose import compose_recipe, to_plain
    from ..recipe.schema import Recipe
    from ..recipe.validate import _field_names, _recipe_fields_at
    from ..registry import discover
    from .plan import build_plan

    try:
        cfg = compose_recipe(recipe, overrides, libraries=libraries, cache_dir=cache_root)
        raw = OmegaConf.to_container(compose_recipe(recipe, overrides, libraries=libraries, cache_dir=cache_root,
                                                    resolve=False), resolve=False)
    except QflowError as exc:
        return [_finding(recipe, "schema", exc.where or recipe, exc.what, exc.fix or "")]
    data = to_plain(cfg)
    try:
        shape = Recipe.model_validate(data)
    except ValidationError as exc:
        return _validation_findings(recipe, exc, (), _recipe_fields_at)
    findings: list[dict[str, str]] = []
    reg = discover()
    for sid, spec in shape.stages.items():
        cls = reg.stages.get(spec.uses)
        if cls is None:
            findings.append(_finding(recipe, "schema", f"stages.{sid}.uses", f"unknown stage '{spec.uses}'",
                                     "see `qflow ls stages`"))
            continue
        try:
            cls.Config.model_validate(spec.with_)
        except ValidationError as exc:
            prefix = ("stages", sid, "with")
            findings += _validation_findings(recipe, exc, prefix, lambda loc, c=cls, p=prefix:
                                             _field_names(c.Config) if tuple(loc) == p else [])
    if findings:
        return findings
    try:
        plan = build_plan(shape, data, recipe)
    except QflowError as exc:
        return [_finding(recipe, "schema", exc.where or recipe, exc.what, exc.fix or "")]

    findings += _unused_params(recipe, raw, overrides, shape)
    findings += _gates(recipe, plan)
    findings += _unconsumed(recipe, plan)
    if model_check is not None:
        per_layer = [(sid, st.config) for sid, st in plan.stages.items() if hasattr(st.config, "layers")]
        source = shape.model.source if shape.model is not None else None
        for f in model_check(source, per_layer):
            findings.append(_finding(recipe, f["code"], f["where"], f["message"], f.get("fix", "")))
    return findings


def _strings(obj: Any):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _unused_params(recipe: str, raw: dict[str, Any], overrides: list[str], shape) -> list[dict[str, str]]:
    from ..recipe.provenance import file_lines

    used = {m.group(1) for s in _strings(raw) for m in _PARAM_REF.finditer(s)}
    used |= {k.split(".", 1)[1].split(".")[0] for k in shape.sweep.params if k.startswith("params.")}
    own = {path[1]: f"{recipe}:{line}" for path, line in file_lines(Path(recipe), "").items()
           if len(path) >= 2 and path[0] == "params"}
    for o in overrides:
        key = o.lstrip("+~").partition("=")[0]
        if key.startswith("params."):
            own[key.split(".")[1]] = f"command line {o}"
    return [_finding(recipe, "unused-param", f"params.{k}", f"params.{k} (set at {at}) is read by no ${{params.{k}}} "
                     f"interpolation and no sweep", f"remove it, or use it in a stage's with: as ${{params.{k}}}")
            for k, at in sorted(own.items()) if k not in used and k in (raw.get("params") or {})]


def _gates(recipe: str, plan) -> list[dict[str, str]]:
    out = []
    for sid, st in plan.stages.items():
        declared = getattr(st.cls, "metrics", None)
        if declared is None:
            continue
        for metric in st.gates:
            if undeclared_metrics(st.cls, [metric]):
                shown = ", ".join(declared) or "none"
                out.append(_finding(recipe, "gate-metric", f"stages.{sid}.gates.{metric}",
                                    f"stage {st.uses} produces no metric '{metric}' (it logs: {shown}); the gate "
                                    f"would fail every run", "gate a metric the stage logs (`qflow show stage "
                                                             f"{st.uses}`), or move the gate to the stage that logs it"))
    return out


def _unconsumed(recipe: str, plan) -> list[dict[str, str]]:
    consumed = {src for st in plan.stages.values() for src, _ in st.bindings.values()}
    out = []
    for sid, st in plan.stages.items():
        if not st.cls.outputs or sid in consumed or st.uses.startswith(_END_POINTS):
            continue
        out.append(_finding(recipe, "unconsumed-output", f"stages.{sid}",
                            f"no stage takes the outputs of '{sid}' ({', '.join(st.cls.outputs)}): it runs for nothing",
                            f"remove it, or wire it: inputs: {{SLOT: {sid}.{next(iter(st.cls.outputs))}}} in the stage "
                            f"that should use it"))
    return out
