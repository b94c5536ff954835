"""``allocate-bits``: one (bits, group size) per layer under a size budget, minimising the damage (docs/METHODS.md §9)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qflow.artifacts import BitAllocation, CalibSet, ModelRef, SensitivityTable
from qflow.registry import Stage, StageConfig, register


class RefineConfig(StageConfig):
    """Measured plan refinement (docs/METHODS.md §9.1): ``refine: {candidates: 4, windows: 8, rounds: 2}``."""

    candidates: int = Field(4, ge=2, le=16, description="round-1 plans: the unrefined one and candidates - 1 caps "
                                                        "on the count of lowest-width layers, down to 0")
    windows: int = Field(8, ge=1, description="calibration windows on which each candidate's KL is measured")
    rounds: int = Field(2, ge=1, le=6, description="rounds after the first try the caps midway between the best "
                                                   "cap and its measured neighbours")
    batch_size: int = Field(4, ge=1)


class AllocateConfig(StageConfig):
    """Budget, constraints, solver.

        allocate:
          uses: allocate-bits
          needs: [sensitivity]
          with:
            bpw: 4.0                       # or bytes: 95000000 (whole model, float tensors at float_dtype)
            constraints: ["blocks[0,-1] >= 4", "re:.*v_proj >= 4", "distinct_group_sizes <= 2"]
            solver: auto                   # milp up to milp_max_vars options, else greedy
            pareto_budgets: 8              # or a list of bpw values

    ``bpw`` counts the bytes the IR stores (codes, scales, zeros) over the
    quantized linears. Constraints: ``re:REGEX``, ``blocks[i,j,...]`` or ``all``,
    an optional attribute (``bits``, default, or ``group_size``), ``>=``/``<=``/``==``
    and a number; ``distinct_bits <= N``, ``distinct_group_sizes <= N``.
    """

    bpw: float | None = Field(None, gt=0, description="budget: bits per weight over the quantized linears (as stored)")
    bytes: int | None = Field(None, gt=0, description="budget: total model bytes (unquantized tensors at float_dtype)")
    float_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    constraints: list[str] = Field([], description="e.g. 'blocks[0,-1] >= 4', 're:.*v_proj >= 4'")
    solver: Literal["auto", "milp", "greedy"] = "auto"
    milp_max_vars: int = Field(20000, ge=1, description="auto: MILP up to this many (layer, option) binaries")
    time_limit_seconds: float = Field(60.0, gt=0, description="MILP time limit; the greedy fallback takes over")
    pareto_budgets: list[float] | int = Field(8, description="bpw values, or how many evenly spaced budgets")
    refine: RefineConfig | None = Field(None, description="measure candidate plans on calibration windows and keep "
                                                          "the best (needs calibrate in needs)")

    @field_validator("constraints")
    @classmethod
    def _parse(cls, values):
        from qflow.quant.allocate_rules import parse_rule

        for i, text in enumerate(values):
            try:
                parse_rule(text)
            except ValueError as exc:
                raise ValueError(f"constraints[{i}]: {exc}") from None
        return values

    @model_validator(mode="after")
    def _budget(self):
        if (self.bpw is None) == (self.bytes is None):
            raise ValueError("give exactly one budget: bpw (bits per weight over the quantized linears) or bytes "
                             "(total model bytes)")
        budgets = self.pareto_budgets
        if isinstance(budgets, int) and budgets < 0 or isinstance(budgets, list) and any(b <= 0 for b in budgets):
            raise ValueError("pareto_budgets must be a count >= 0 or a list of positive bpw values")
        if self.refine is not None and self.solver == "greedy":
            raise ValueError("refine solves each candidate plan with the MILP (a cap on the number of lowest-width "
                             "layers is one more MILP row); use solver: auto or milp with refine")
        return self

    def rules(self):
        from qflow.quant.allocate_rules import parse_rule

        return [parse_rule(t) for t in self.constraints]


@register("allocate-bits")
class AllocateBits(Stage):
    """Exact MILP (greedy above ``milp_max_vars``) over a sensitivity table; writes ``allocation.json``.

        allocate:
          uses: allocate-bits
          needs: [sensitivity]
          with: {bpw: 4.0, constraints: ["blocks[0,-1] >= 4"]}

    ``allocation.json``: ``layers`` ({name: {bits, group_size}}, a per-layer spec
    override for the quantize stage), ``budget``, ``predicted`` (bpw and bytes as
    the IR stores them, nominal bpw, summed damage), ``solver`` (name, optimal,
    gap to the LP bound). Also ``pareto.csv`` and a budget-vs-damage plot.
    """

    version = 2
    # the plan's predicted bpw (real and nominal), bytes and damage, the budget, and the solver's outcome;
    # refine: the chosen and the unrefined plan's measured KL, candidates measured, seconds
    metrics = ("predicted_bpw", "predicted_bpw_nominal", "predicted_bytes", "predicted_damage", "budget_bytes",
               "solver_optimal", "solver_seconds", "solver_gap", "refine_kl", "refine_unrefined_kl",
               "refine_kl_ratio", "refine_candidates", "refine_seconds", "refine_n_low")
    Config = AllocateConfig
    inputs = {"table": SensitivityTable, "model": ModelRef, "calib": CalibSet}
    optional_inputs = frozenset({"model", "calib"})
    outputs = {"plan": BitAllocation}

    def check(self, cfg, inputs_meta):
        if cfg.refine is not None and "calib" not in inputs_meta:
            return ["refine measures candidate plans on calibration windows, but no calibrate stage feeds this "
                    "stage: add calibrate to its needs"]
        return []

    def run(self, ctx, cfg, table, model=None, calib=None):
        import json
        import sys

        where = f"stages.{ctx.stage_id}.with"
        meta, problem, shapes = _read_table(ctx, table)
        rules = cfg.rules()
        problem, distinct = _apply_rules(problem, rules, meta["n_blocks"], where)
        budget_bytes = _budget_bytes(cfg, meta, problem, where)
        solution = _solve(problem, budget_bytes, distinct, cfg, meta, where)
        refined = None
        if cfg.refine is not None:
            refined = _refine(ctx, cfg, problem, distinct, budget_bytes, solution, meta, model, calib, where)
            solution = refined.chosen.solution
        chosen = solution.options(problem)
        nominal = _nominal_bpw(problem, chosen, shapes, meta)
        plan = {
            "layers": {name: {"bits": o.bits, "group_size": o.group_size} for name, o in zip(problem.layers, chosen)},
            "spec": {"method": meta["method"], **meta["spec"]},
            "budget": {"bpw": cfg.bpw, "bytes": cfg.bytes, "quantized_bytes": budget_bytes,
                       "float_dtype": cfg.float_dtype},
            "predicted": {"bpw": solution.bpw(problem), "bpw_nominal": nominal, "bytes": solution.nbytes,
                          "total_bytes": solution.nbytes + meta["fixed_bytes"][cfg.float_dtype],
                          "damage": solution.damage, "n_weights": problem.total_weights},
            "solver": {"name": solution.solver, "optimal": solution.optimal, "gap": solution.gap,
                       "lp_bound": solution.lp_bound, "seconds": solution.seconds, "notes": solution.notes},
            "constraints": list(cfg.constraints), "estimator": meta["estimator"],
        }
        if refined is not None:
            plan["refine"] = _refine_report(ctx, cfg, problem, refined, ctx.output("plan"))
        out = ctx.output("plan")
        (out / "allocation.json").write_text(json.dumps(plan, indent=1, sort_keys=True))
        ctx.log_artifact(out / "allocation.json")
        _pareto(ctx, cfg, problem, distinct, solution, out)
        ctx.log_metrics({"predicted_bpw": plan["predicted"]["bpw"], "predicted_bpw_nominal": nominal,
                         "predicted_bytes": solution.nbytes, "predicted_damage": solution.damage,
                         "budget_bytes": budget_bytes, "solver_optimal": float(solution.optimal),
                         "solver_seconds": solution.seconds})
        if solution.gap is not None:
            ctx.log_metric("solver_gap", solution.gap)
        if refined is not None:
            r = plan["refine"]
            ctx.log_metrics({"refine_kl": refined.chosen.measured_kl, "refine_unrefined_kl": r["unrefined_kl"],
                             "refine_kl_ratio": r["kl_ratio"], "refine_candidates": len(refined.candidates),
                             "refine_seconds": r["seconds"], "refine_n_low": refined.chosen.n_low})
        if not solution.optimal:
            print(f"[{ctx.stage_id}] {solution.solver} plan, not proven optimal: damage {solution.damage:.6g}, "
                  f"LP bound {solution.lp_bound:.6g}, gap {solution.gap:.2%}", file=sys.stderr)
        return {"plan": BitAllocation(out, bpw=plan["predicted"]["bpw"], solver=solution.solver,
                                      n_layers=len(problem.layers))}


def _refine(ctx, cfg, problem, distinct, budget_bytes, solution, meta, model, calib, where):
    """Measured plan refinement (qflow/evaluation/refine.py): the float model and calibration windows, then
    the candidates."""
    import sys
    import time

    from qflow.errors import StageError
    from qflow.evaluation.refine import PlanMeter, refine_plan
    from qflow.models.loading import load_model
    from qflow.quant.algos.calibrated import calibration_ids
    from qflow.quant.spec import QuantSpec

    if calib is None or model is None:
        raise StageError("refine measures candidate plans on calibration windows, but no calibrate stage (or no "
                         "model) feeds this stage", where=f"stages.{ctx.stage_id}.needs",
                         fix="add calibrate to the stage's needs, or drop refine")
    t0 = time.perf_counter()
    ids = calibration_ids(ctx, calib, uses="allocate-bits refine")
    if cfg.refine.windows > ids.shape[0]:
        raise StageError(f"refine.windows {cfg.refine.windows} is more than the {ids.shape[0]} calibration windows "
                         f"the calibrate stage holds", where=f"{where}.refine.windows",
                         fix=f"set refine.windows <= {ids.shape[0]} or raise calibrate's n_samples")
    net, _ = load_model(model.base_model_dir, dtype="float32", attn_implementation="sdpa")
    meter = PlanMeter(net, ids[:cfg.refine.windows], cfg.refine.batch_size)

    def spec_of(option):
        return QuantSpec(bits=option.bits, group_size=option.group_size, **meta["spec"])

    def report(cand):
        print(f"[{ctx.stage_id}] refine {cand.label}: {cand.n_low} low layers, bpw "
              f"{cand.solution.bpw(problem):.4f}, predicted {cand.solution.damage:.4g}, measured KL "
              f"{cand.measured_kl:.4g} ({cand.seconds:.0f} s)", file=sys.stderr)

    result = refine_plan(problem, budget_bytes, distinct, solution, meter, spec_of,
                         n_candidates=cfg.refine.candidates, rounds=cfg.refine.rounds,
                         time_limit_seconds=cfg.time_limit_seconds, progress=report)
    result.seconds = time.perf_counter() - t0
    return result


def _refine_report(ctx, cfg, problem, result, out) -> dict:
    """allocation.json's ``refine`` block, and refine.csv (one row per candidate)."""
    import csv
    import sys

    rows = [c.row(problem) for c in result.candidates]
    with open(out / "refine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    ctx.log_artifact(out / "refine.csv")
    unrefined = result.unrefined.measured_kl
    ratio = result.chosen.measured_kl / unrefined if unrefined > 0 else float("nan")
    print(f"[{ctx.stage_id}] refine chose {result.chosen.label}: measured KL {result.chosen.measured_kl:.4g} vs "
          f"{unrefined:.4g} unrefined ({ratio:.3f}x) on {cfg.refine.windows} calibration windows, "
          f"{len(rows)} candidates, {result.seconds:.0f} s", file=sys.stderr)
    return {"chosen": result.chosen.label, "low_bits": result.low_bits, "n0": result.n0,
            "windows": cfg.refine.windows, "unrefined_kl": unrefined, "kl": result.chosen.measured_kl,
            "kl_ratio": ratio, "seconds": result.seconds, "candidates": rows, "skipped": result.skipped,
            "estimate": "round to nearest on each option's grid; mean exact KL to the float model per scored "
                        "token on the first `windows` calibration windows"}


def _read_table(ctx, table):
    import csv
    import json

    from qflow.errors import StageError
    from qflow.quant.allocate import Option, Problem

    csv_path, meta_path = table.path / "table.csv", table.path / "meta.json"
    for p in (csv_path, meta_path):
        if not p.is_file():
            raise StageError(f"{p} is missing", where=f"stages.{ctx.stage_id}.needs",
                             fix="feed allocate-bits from a sensitivity-analyze stage")
    meta = json.loads(meta_path.read_text())
    options: dict[str, list[Option]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            options.setdefault(r["layer"], []).append(
                Option(int(r["bits"]), int(r["group_size"]), int(r["bytes"]), float(r["damage"])))
            shapes[r["layer"]] = (int(r["out_features"]), int(r["in_features"]))
    layers = list(options)
    return meta, Problem(layers, [o * i for o, i in (shapes[n] for n in layers)], [options[n] for n in layers]), shapes


def _apply_rules(problem, rules, n_blocks, where):
    from qflow.errors import StageError
    from qflow.quant.allocate_rules import DistinctRule

    layer_rules = [r for r in rules if not isinstance(r, DistinctRule)]
    for i, rule in enumerate(rules):
        if isinstance(rule, DistinctRule):
            continue
        bad = rule.bad_blocks(n_blocks)
        if bad:
            raise StageError(f"constraint {rule.text!r} names block {bad[0]}, but the model has {n_blocks} blocks",
                             where=f"{where}.constraints[{i}]", fix=f"use block indices in -{n_blocks}..{n_blocks - 1}")
        if not any(rule.selects(n, n_blocks) for n in problem.layers):
            raise StageError(f"constraint {rule.text!r} selects no layer (layers look like {problem.layers[0]})",
                             where=f"{where}.constraints[{i}]", fix="fix the regex or block list")
    restricted = problem.restricted(lambda li, o: all(r.allows(o) for r in layer_rules
                                                     if r.selects(problem.layers[li], n_blocks)))
    for li, opts in enumerate(restricted.options):
        if not opts:
            name = problem.layers[li]
            hit = [r.text for r in layer_rules if r.selects(name, n_blocks)]
            offered = sorted({(o.bits, o.group_size) for o in problem.options[li]})
            raise StageError(f"constraints {hit} leave {name} no option (the table offers (bits, group_size) "
                             f"{offered})", where=f"{where}.constraints",
                             fix="relax the constraint or add options to sensitivity-analyze's bits/group_sizes")
    return restricted, [r for r in rules if isinstance(r, DistinctRule)]


def _budget_bytes(cfg, meta, problem, where) -> int:
    from qflow.errors import StageError
    from qflow.quant.allocate import budget_bytes_for_bpw

    if cfg.bpw is not None:
        return budget_bytes_for_bpw(cfg.bpw, problem.total_weights)
    fixed = meta["fixed_bytes"][cfg.float_dtype]
    if cfg.bytes <= fixed:
        raise StageError(f"bytes {cfg.bytes} does not even hold the unquantized tensors ({fixed} bytes at "
                         f"{cfg.float_dtype})", where=f"{where}.bytes", fix="raise the budget or use bpw")
    return cfg.bytes - fixed


def _solve(problem, budget_bytes, distinct, cfg, meta, where):
    import math

    from qflow.errors import StageError
    from qflow.quant.allocate import InfeasibleBudget, allocate

    try:
        return allocate(problem, budget_bytes, distinct, solver=cfg.solver, milp_max_vars=cfg.milp_max_vars,
                        time_limit_seconds=cfg.time_limit_seconds)
    except InfeasibleBudget as exc:
        if exc.minimum is None:
            raise StageError(f"the distinct constraints {[r.text for r in distinct]} leave no assignment",
                             where=f"{where}.constraints", fix="raise the distinct counts") from None
        min_bpw = math.ceil(8 * exc.minimum / problem.total_weights * 1e4) / 1e4
        min_total = exc.minimum + meta["fixed_bytes"][cfg.float_dtype]
        asked = f"bpw {cfg.bpw} ({budget_bytes} bytes)" if cfg.bpw is not None else f"bytes {cfg.bytes}"
        raise StageError(f"budget {asked} is below the minimum feasible: {exc.minimum} bytes for the quantized "
                         f"linears = {min_bpw} bpw (total {min_total} bytes at {cfg.float_dtype}) under the "
                         f"options and constraints", where=f"{where}.{'bpw' if cfg.bpw is not None else 'bytes'}",
                         fix=f"set bpw >= {min_bpw} (or bytes >= {min_total}), add smaller options "
                             f"(bits/group_sizes) to sensitivity-analyze, or relax the constraints") from None


def _nominal_bpw(problem, chosen, shapes, meta) -> float:
    """Spec accounting (``QuantSpec.bpw``, evaluate's ``bpw_quantized``) of the plan."""
    from qflow.quant.spec import QuantSpec

    bits = 0.0
    for name, o in zip(problem.layers, chosen):
        out_features, in_features = shapes[name]
        spec = QuantSpec(bits=o.bits, group_size=o.group_size, **meta["spec"])
        bits += spec.bpw(out_features, in_features) * out_features * in_features
    return bits / problem.total_weights


def _pareto(ctx, cfg, problem, distinct, solution, out) -> None:
    """Optimal (bpw, damage) over a range of budgets: pareto.csv and a plot."""
    import csv

    import numpy as np

    from qflow.evaluation.allocation_plots import pareto_curve
    from qflow.quant.allocate import (InfeasibleBudget, allocate, budget_bytes_for_bpw, maximum_useful_bytes,
                                      minimum_bytes, pareto_front)

    n = problem.total_weights
    if isinstance(cfg.pareto_budgets, int):
        if cfg.pareto_budgets == 0:
            return
        lo = 8 * minimum_bytes(problem, distinct) / n
        hi = 8 * maximum_useful_bytes(problem) / n
        budgets = np.linspace(lo, hi, cfg.pareto_budgets).tolist() if cfg.pareto_budgets > 1 else [hi]
    else:
        budgets = list(cfg.pareto_budgets)
    points = []
    for bpw in budgets:
        try:
            s = allocate(problem, budget_bytes_for_bpw(bpw, n), distinct, solver=cfg.solver,
                         milp_max_vars=cfg.milp_max_vars, time_limit_seconds=cfg.time_limit_seconds)
        except InfeasibleBudget:
            continue
        points.append((s.nbytes, s.damage))
    front = pareto_front(points)
    with open(out / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bpw", "bytes", "damage"])
        w.writerows([8 * b / n, b, repr(d)] for b, d in front)
    png = pareto_curve([(8 * b / n, d) for b, d in front], out / "pareto.png",
                       chosen=(solution.bpw(problem), solution.damage))
    ctx.log_artifact(out / "pareto.csv")
    ctx.log_artifact(png)
