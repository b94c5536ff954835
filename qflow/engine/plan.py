"""The DAG: stages, their wiring, a topological order, checked before anything runs.

Wiring rule for an input slot of a stage (first match wins):
1. an explicit ``inputs: {slot: "stage_id.output"}`` entry;
2. an output with the same name among ``needs`` (in order) whose type fits;
3. the single output among ``needs`` whose type fits;
4. for a ``ModelRef`` slot, the implicit ``model`` stage built from the recipe's
   ``model:`` section (the registered stage whose ``recipe_section`` is ``model``:
   ``model.load``).
A slot that stays unbound is an error unless the stage marks it optional.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..artifacts import ModelRef
from ..errors import PlanError, did_you_mean
from ..recipe.schema import Gate, Recipe, StageSpec
from ..recipe.validate import unknown_stage, validate_stage_config
from ..registry import Stage, discover, section_stage

IMPLICIT_MODEL = "model"   # the recipe section, and the id of the stage the plan builds from it


@dataclass
class PlannedStage:
    id: str
    uses: str
    cls: type[Stage]
    config: BaseModel
    needs: list[str]
    bindings: dict[str, tuple[str, str]] = field(default_factory=dict)  # slot -> (stage id, output slot)
    gates: dict[str, Gate] = field(default_factory=dict)
    implicit: bool = False


@dataclass
class Plan:
    recipe: Recipe
    source: str
    stages: dict[str, PlannedStage]       # in topological order
    resolved: dict[str, Any]              # the composed, resolved recipe (plain dict)

    def order(self) -> list[str]:
        return list(self.stages)

    def downstream(self, stage_id: str) -> set[str]:
        out = {stage_id}
        for sid, st in self.stages.items():  # topological order: one pass suffices
            if any(src in out for src, _ in st.bindings.values()) or any(n in out for n in st.needs):
                out.add(sid)
        return out

    def upstream(self, stage_id: str) -> set[str]:
        seen: set[str] = set()
        todo = [stage_id]
        while todo:
            sid = todo.pop()
            if sid in seen:
                continue
            seen.add(sid)
            st = self.stages[sid]
            todo += [s for s, _ in st.bindings.values()] + st.needs
        return seen


def _toposort(specs: dict[str, list[str]], source: str) -> list[str]:
    """Kahn's algorithm, stable in declaration order; reports a cycle by its members."""
    indeg = {s: 0 for s in specs}
    for s, deps in specs.items():
        for d in deps:
            indeg[s] += 1
    order: list[str] = []
    ready = [s for s in specs if indeg[s] == 0]
    children: dict[str, list[str]] = {s: [] for s in specs}
    for s, deps in specs.items():
        for d in deps:
            children[d].append(s)
    while ready:
        s = ready.pop(0)
        order.append(s)
        for c in children[s]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    if len(order) != len(specs):
        stuck = [s for s in specs if s not in order]
        cycle = _find_cycle({s: [d for d in specs[s] if d in stuck] for s in stuck})
        raise PlanError(f"the stages form a cycle: {' -> '.join(cycle)}", where=source,
                        fix="remove one of these 'needs' entries so the graph is acyclic")
    return order


def _find_cycle(graph: dict[str, list[str]]) -> list[str]:
    path: list[str] = []
    on_path: set[str] = set()
    done: set[str] = set()

    def visit(n: str) -> list[str] | None:
        path.append(n)
        on_path.add(n)
        for d in graph[n]:
            if d in on_path:
                return path[path.index(d):] + [d]
            if d not in done:
                found = visit(d)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(n)
        return None

    for n in graph:
        found = visit(n)
        if found:
            return found
    return list(graph)


def build_plan(recipe: Recipe, resolved: dict[str, Any], source: str) -> Plan:
    reg = discover()
    registered = sorted(reg.stages)
    specs: dict[str, StageSpec] = dict(recipe.stages)
    stages: dict[str, PlannedStage] = {}

    uses_model = IMPLICIT_MODEL not in specs and recipe.model is not None
    if uses_model:
        specs = {IMPLICIT_MODEL: StageSpec(uses=_section_stage_name(IMPLICIT_MODEL, reg.broken, source),
                                           **{"with": recipe.model.model_dump()}), **specs}

    for sid, spec in specs.items():
        cls = reg.stages.get(spec.uses)
        if cls is None:
            raise unknown_stage(sid, spec.uses, registered, reg.broken, source)
        for need in spec.needs:
            if need not in specs or (need == IMPLICIT_MODEL and not uses_model and need not in recipe.stages):
                raise PlanError(f"stages.{sid}.needs: unknown stage '{need}'", where=source,
                                fix=did_you_mean(need, [s for s in specs if s != sid]))
            if need == sid:
                raise PlanError(f"stages.{sid}.needs lists the stage itself", where=source, fix=f"remove '{sid}' from its needs")
        config = validate_stage_config(sid, spec, cls, source)
        for metric in spec.gates:
            if "/" in metric:
                raise PlanError(f"stages.{sid}.gates.{metric}: name the metric without the stage prefix",
                                where=source, fix=f"write '{metric.split('/', 1)[1]}'")
        stages[sid] = PlannedStage(sid, spec.uses, cls, config, list(spec.needs), gates=dict(spec.gates),
                                   implicit=(sid == IMPLICIT_MODEL and uses_model))

    # wiring
    implicit_model = _model_output(stages.get(IMPLICIT_MODEL))
    for sid, st in stages.items():
        spec = specs[sid]
        for slot, want in st.cls.inputs.items():
            bound = _bind(sid, slot, want, spec, stages, source, implicit_model=implicit_model)
            if bound is not None:
                st.bindings[slot] = bound
        for slot in spec.inputs:
            if slot not in st.cls.inputs:
                raise PlanError(f"stages.{sid}.inputs.{slot}: stage {st.uses} has no input '{slot}'", where=source,
                                fix=did_you_mean(slot, list(st.cls.inputs)))

    deps = {sid: list(dict.fromkeys(st.needs + [s for s, _ in st.bindings.values()])) for sid, st in stages.items()}
    order = _toposort(deps, source)
    stages = {sid: stages[sid] for sid in order}
    return Plan(recipe=recipe, source=source, stages=stages, resolved=resolved)


def _section_stage_name(section: str, broken: dict[str, str], source: str) -> str:
    """The name of the stage that the recipe's top-level ``section`` becomes."""
    cls = section_stage(section)
    if cls is None:
        failed = "".join(f" Broken stage module {module}: {error}." for module, error in broken.items())
        raise PlanError(f"no registered stage is built from the recipe's '{section}:' section.{failed}",
                        where=f"{source}: {section}",
                        fix=f"install qflow with `make setup` (its stages declare recipe_section = '{section}'), "
                            f"or list the stage under stages:")
    return cls.name


def _model_output(model: PlannedStage | None) -> tuple[str, str] | None:
    """(stage id, output) of the model stage that ``ModelRef`` inputs fall back on, if there is one."""
    if model is None:
        return None
    slot = next((o for o, t in model.cls.outputs.items() if issubclass(t, ModelRef)), None)
    return (model.id, slot) if slot else None


def _bind(sid: str, slot: str, want: type, spec: StageSpec, stages: dict[str, PlannedStage], source: str,
          *, implicit_model: tuple[str, str] | None) -> tuple[str, str] | None:
    where = f"stages.{sid}"
    if slot in spec.inputs:
        ref = spec.inputs[slot]
        src, _, out = ref.partition(".")
        if src not in stages:
            raise PlanError(f"{where}.inputs.{slot}: unknown stage '{src}'", where=source,
                            fix=did_you_mean(src, [s for s in stages if s != sid]))
        outputs = stages[src].cls.outputs
        if out not in outputs:
            raise PlanError(f"{where}.inputs.{slot}: stage '{src}' has no output '{out}'", where=source,
                            fix=did_you_mean(out, list(outputs)))
        if not issubclass(outputs[out], want):
            raise PlanError(f"{where}.inputs.{slot}: type mismatch, {src}.{out} is {outputs[out].__name__} "
                            f"but {stages[sid].uses} expects {want.__name__}", where=source,
                            fix=f"wire '{slot}' to an output of type {want.__name__}")
        return (src, out)
    needs = spec.needs
    for need in needs:
        outputs = stages[need].cls.outputs
        if slot in outputs:
            if issubclass(outputs[slot], want):
                return (need, slot)
    candidates = [(need, o) for need in needs for o, t in stages[need].cls.outputs.items() if issubclass(t, want)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        listing = ", ".join(f"{n}.{o}" for n, o in candidates)
        raise PlanError(f"{where}: input '{slot}' ({want.__name__}) could come from several stages: {listing}",
                        where=source, fix=f"choose one with inputs: {{{slot}: STAGE.OUTPUT}}")
    if issubclass(ModelRef, want) and implicit_model and sid != implicit_model[0]:
        return implicit_model
    if slot in stages[sid].cls.optional_inputs:
        return None
    # a need that produces the slot name with a wrong type is the most likely mistake
    for need in needs:
        outputs = stages[need].cls.outputs
        if slot in outputs:
            raise PlanError(f"{where}: type mismatch, '{need}' outputs {slot} as {outputs[slot].__name__} "
                            f"but {stages[sid].uses} expects {want.__name__}", where=source,
                            fix=f"add a stage producing {want.__name__} to needs, or wire it with inputs:")
    produced = sorted({f"{s}.{o} ({t.__name__})" for s, p in stages.items() for o, t in p.cls.outputs.items() if s != sid})
    raise PlanError(f"{where}: nothing provides input '{slot}' ({want.__name__})", where=source,
                    fix=f"add the stage that produces it to stages.{sid}.needs (available: {', '.join(produced) or 'none'})")
