"""Two-phase validation: the recipe's shape, then each stage's ``with`` block.

Every message names the recipe file, the YAML path
(``stages.quantize.with.group_size``), what was expected and a fix; unknown
keys get the closest valid key, unknown stages the registered names.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..errors import RecipeError, closest, did_you_mean
from .schema import Gate, ModelSection, Recipe, StageSpec


def yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = "with" if part == "with_" else str(part)
            out += ("." if out else "") + part
    return out


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def describe_errors(exc: ValidationError, prefix: tuple[Any, ...],
                    fields_at: Callable[[tuple[Any, ...]], list[str]]) -> tuple[str, str]:
    """(what, fix) for a pydantic error list, one clause per error."""
    clauses: list[str] = []
    fixes: list[str] = []
    for err in exc.errors()[:6]:
        loc = tuple(prefix) + tuple(err["loc"])
        # pydantic puts model-validator errors at the model's own loc
        where = yaml_path(loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            valid = fields_at(loc[:-1])
            best = closest(key, valid)
            clauses.append(f"{where}: unknown key '{key}'")
            fixes.append(f"did you mean '{best}'?" if best else f"valid keys here: {', '.join(sorted(valid))}")
        elif kind == "renamed_key":
            clauses.append(f"{where}: {err['msg']}")
            fixes.append(err["ctx"]["fix"])
        elif kind == "missing":
            clauses.append(f"{where}: required key is missing")
            fixes.append(f"add '{loc[-1]}' to {yaml_path(loc[:-1]) or 'the top level'}")
        else:
            got = err.get("input")
            got_s = repr(got)
            if len(got_s) > 60:
                got_s = got_s[:57] + "..."
            msg = err["msg"].removeprefix("Value error, ")
            clauses.append(f"{where}: {msg} (got {got_s})")
            fixes.append(f"set {where} to a valid value")
    if len(exc.errors()) > 6:
        clauses.append(f"and {len(exc.errors()) - 6} more")
    return "; ".join(clauses), "; ".join(dict.fromkeys(fixes))


def reject_renamed_keys(data: Any, renamed: dict[str, tuple[str, str]], title: str) -> Any:
    """For a Config's ``mode="before"`` validator: ``data`` unchanged, or a ValidationError located at
    each old key of ``renamed`` (old key -> (new key, how to write it now)) that ``data`` still uses."""
    if not isinstance(data, dict):
        return data
    found = [InitErrorDetails(type=PydanticCustomError("renamed_key", "'{old}' was replaced by '{new}'",
                                                       {"old": old, "new": new, "fix": fix}),
                              loc=(old,), input=data[old])
             for old, (new, fix) in renamed.items() if old in data]
    if found:
        raise ValidationError.from_exception_data(title, found)
    return data


def _recipe_fields_at(loc: tuple[Any, ...]) -> list[str]:
    if not loc:
        return _field_names(Recipe)
    if loc[0] == "model":
        return _field_names(ModelSection)
    if loc[0] == "stages" and len(loc) == 2:
        return _field_names(StageSpec)
    if loc[0] == "stages" and len(loc) >= 4 and loc[2] == "gates":
        return _field_names(Gate)
    return []


def validate_shape(data: dict[str, Any], source: str) -> Recipe:
    """Phase 1: the recipe's own keys and types."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        what, fix = describe_errors(exc, (), _recipe_fields_at)
        raise RecipeError(f"invalid recipe: {what}", where=source, fix=fix) from None


def validate_stage_config(stage_id: str, spec: StageSpec, stage_cls, source: str) -> BaseModel:
    """Phase 2: one stage's ``with`` block against its ``Config``."""
    prefix = ("stages", stage_id, "with")
    try:
        return stage_cls.Config.model_validate(spec.with_)
    except ValidationError as exc:
        what, fix = describe_errors(exc, prefix, lambda loc: _field_names(stage_cls.Config)
                                    if tuple(loc) == prefix else [])
        raise RecipeError(f"invalid config for stage '{stage_id}' (uses {spec.uses}): {what}",
                          where=source, fix=fix) from None


def unknown_stage(stage_id: str, uses: str, registered: list[str], broken: dict[str, str], source: str) -> RecipeError:
    extra = ""
    if broken:
        extra = " Broken stage modules (failed to import): " + "; ".join(f"{m}: {e}" for m, e in broken.items())
    return RecipeError(f"stages.{stage_id}.uses: unknown stage '{uses}'.{extra}", where=source,
                       fix=did_you_mean(uses, registered))
