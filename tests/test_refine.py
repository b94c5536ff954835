"""allocate-bits' measured plan refinement (qflow/evaluation/refine.py, docs/METHODS.md §9.1)."""

from __future__ import annotations

import json

import pytest
import torch

from qflow.evaluation.refine import PlanMeter, bisect_caps, cap_schedule, refine_plan
from qflow.quant.allocate import Option, Problem, allocate, budget_bytes_for_bpw, solve_milp
from qflow.quant.ir import layer_nbytes
from qflow.quant.spec import QuantSpec

from .test_blockwise import make_ctx


def test_cap_schedule_and_bisection():
    assert cap_schedule(12, 4) == [8, 4, 0]
    assert cap_schedule(3, 8) == [2, 1, 0]            # duplicates collapse
    assert cap_schedule(0, 4) == []
    assert bisect_caps({12: 1.0, 8: 0.9, 4: 0.8, 0: 0.95}, 12) == [2, 6]
    assert bisect_caps({12: 1.0, 8: 0.9, 4: 0.95, 0: 0.99}, 12) == [6, 10]
    assert bisect_caps({12: 1.0, 8: 1.1, 4: 1.2, 0: 0.5}, 12) == [2]
    assert bisect_caps({3: 1.0, 2: 0.5}, 3) == []      # no integer between


# ---- a synthetic problem whose "measurement" is super-additive in the number of 2-bit layers ----------------

def _problem(seed: int, n_layers: int = 10) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    options, sizes = [], []
    for _ in range(n_layers):
        out_features, in_features = 64, 128
        sizes.append(out_features * in_features)
        opts = []
        for bits in (2, 3, 4, 8):
            spec = QuantSpec(bits=bits, group_size=64, scheme="asym_z")
            # 2-bit options priced optimistically, as a single-layer estimate does
            price = (float(torch.rand(1, generator=gen)) + 0.5) * 4.0 ** -bits * (0.3 if bits == 2 else 1.0)
            opts.append(Option(bits, 64, layer_nbytes(spec, out_features, in_features), price))
        options.append(opts)
    return Problem([f"model.layers.{i}.mlp.up_proj" for i in range(n_layers)], sizes, options)


class InteractingMeter:
    """A stand-in for PlanMeter: the summed true single-layer damage plus a penalty that grows with the
    square of the number of 2-bit layers (the interaction the additive MILP cannot see)."""

    def __init__(self, problem: Problem, alpha: float):
        self.problem, self.alpha, self.calls = problem, alpha, 0
        self.true = {(name, o.bits): o.damage / (0.3 if o.bits == 2 else 1.0)
                     for name, opts in zip(problem.layers, problem.options) for o in opts}

    def kl(self, specs):
        self.calls += 1
        n2 = sum(s.bits == 2 for s in specs.values())
        return sum(self.true[(n, s.bits)] for n, s in specs.items()) + self.alpha * n2 ** 2


def _spec_of(option):
    return QuantSpec(bits=option.bits, group_size=option.group_size, scheme="asym_z")


@pytest.mark.parametrize("seed", range(3))
def test_refinement_keeps_the_measured_best_candidate_within_the_budget(seed):
    p = _problem(seed)
    budget = budget_bytes_for_bpw(3.7, p.total_weights)
    base = allocate(p, budget)
    meter = InteractingMeter(p, alpha=2e-3)
    result = refine_plan(p, budget, [], base, meter, _spec_of, n_candidates=4, rounds=3)
    assert result.unrefined.solution.choice == base.choice and result.low_bits == 2
    assert result.n0 == sum(o.bits == 2 for o in base.options(p)) > 0
    assert meter.calls == len(result.candidates)
    for c in result.candidates:
        assert c.solution.nbytes <= budget
        assert c.cap is None or c.n_low <= c.cap
        specs = {n: _spec_of(o) for n, o in zip(p.layers, c.solution.options(p))}
        assert c.measured_kl == pytest.approx(meter.kl(specs))   # the figure is the plan's own measurement
    assert result.chosen.measured_kl == min(c.measured_kl for c in result.candidates)
    assert result.chosen.measured_kl <= result.unrefined.measured_kl
    # with a strong interaction the best plan is a capped one, and round 1 reaches cap 0
    assert result.chosen.cap is not None and 0 in {c.cap for c in result.candidates}
    # every capped candidate is the MILP optimum of its cap
    for c in result.candidates[1:]:
        assert c.solution.damage == pytest.approx(solve_milp(p, budget, caps=[(2, c.cap)]).damage)


def test_nothing_to_refine_when_every_layer_is_at_the_widest_option():
    p = _problem(0)
    top = Problem(p.layers, p.n_weights, [[o for o in opts if o.bits == 8] for opts in p.options])
    wide = allocate(top, 10 ** 9)
    single = refine_plan(top, 10 ** 9, [], wide, InteractingMeter(top, 0.0), _spec_of, n_candidates=4, rounds=2)
    assert single.low_bits is None and len(single.candidates) == 1 and single.chosen.cap is None


# ---- the real meter and the stage on a tiny model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, tiny_model_dir):
    from qflow.artifacts import ModelRef
    from stages.calibrate import Calibrate, CalibrateConfig
    from stages.sensitivity_analyze import SensitivityAnalyze, SensitivityConfig

    root = tmp_path_factory.mktemp("refine")
    cfg = CalibrateConfig(data={"source": "zoo:wiki-pages", "seq_len": 32}, n_samples=4)
    calib = Calibrate().run(make_ctx(root / "calib"), cfg, ModelRef(tiny_model_dir))["calib"]
    table = SensitivityAnalyze().run(make_ctx(root / "sens"), SensitivityConfig(estimator="proxy", n_check=0,
                                                                                method="rtn", group_sizes=[32]),
                                     ModelRef(tiny_model_dir), calib)["table"]
    return ModelRef(tiny_model_dir), calib, table


def test_plan_meter_measures_the_whole_plan_and_restores_the_model(tiny_model_dir, tiny_inputs):
    from qflow.evaluation.sensitivity import single_layer_kl
    from qflow.models.loading import load_model

    _, calib, _ = tiny_inputs
    net, _ = load_model(tiny_model_dir, dtype="float32")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = torch.load(calib.path / "ids.pt")[:3]
    meter = PlanMeter(net, ids, batch_size=2)
    name = "model.layers.1.mlp.down_proj"
    spec = QuantSpec(bits=2, group_size=32, scheme="asym_z")
    assert meter.kl({name: spec}) == pytest.approx(single_layer_kl(net, name, spec, ids, meter.reference, 2), rel=1e-9)
    both = {name: spec, "model.layers.0.mlp.up_proj": spec}
    assert meter.kl(both) > 0 and meter.kl({}) == pytest.approx(0.0, abs=1e-9)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _allocate(root, inputs, **cfg):
    from stages.allocate_bits import AllocateBits, AllocateConfig

    model, calib, table = inputs
    plan = AllocateBits().run(make_ctx(root), AllocateConfig(**cfg), table, model=model, calib=calib)["plan"]
    return json.loads((plan.path / "allocation.json").read_text()), plan.path


def test_stage_refinement_reports_each_candidate_and_never_measures_worse(tmp_path, tiny_model_dir, tiny_inputs):
    from qflow.models.loading import load_model

    plan, folder = _allocate(tmp_path / "r", tiny_inputs, bpw=3.3, pareto_budgets=0,
                             refine={"candidates": 3, "windows": 3, "rounds": 2})
    unrefined, _ = _allocate(tmp_path / "u", tiny_inputs, bpw=3.3, pareto_budgets=0)
    r = plan["refine"]
    budget = plan["budget"]["quantized_bytes"]
    assert r["candidates"][0]["label"] == "unrefined" and len(r["candidates"]) >= 2
    assert r["candidates"][0]["predicted_damage"] == pytest.approx(unrefined["predicted"]["damage"])
    assert all(c["bytes"] <= budget for c in r["candidates"])
    assert r["kl"] == min(c["measured_kl"] for c in r["candidates"]) <= r["unrefined_kl"]
    chosen = next(c for c in r["candidates"] if c["label"] == r["chosen"])
    assert plan["predicted"]["bytes"] == chosen["bytes"] and plan["predicted"]["damage"] == chosen["predicted_damage"]
    assert sum(v["bits"] <= r["low_bits"] for v in plan["layers"].values()) == chosen["n_low"]
    assert (folder / "refine.csv").read_text().splitlines()[0].startswith("label,round,cap,n_low,bpw")
    # the reported KL is what the written plan measures on the same windows, independently recomputed
    net, _ = load_model(tiny_model_dir, dtype="float32")
    meter = PlanMeter(net, torch.load(tiny_inputs[1].path / "ids.pt")[:3], batch_size=4)
    specs = {n: QuantSpec(bits=v["bits"], group_size=v["group_size"], scheme="asym_z") for n, v in plan["layers"].items()}
    assert meter.kl(specs) == pytest.approx(r["kl"], rel=1e-6)
    plain = {n: QuantSpec(bits=v["bits"], group_size=v["group_size"], scheme="asym_z")
             for n, v in unrefined["layers"].items()}
    assert meter.kl(plain) == pytest.approx(r["unrefined_kl"], rel=1e-6)


def test_bad_refine_values_are_clean_errors(tmp_path, tiny_inputs):
    from pydantic import ValidationError

    from qflow.errors import StageError
    from stages.allocate_bits import AllocateBits, AllocateConfig

    for bad, message in [({"candidates": 1}, "greater than or equal to 2"), ({"windows": 0}, "greater than"),
                         ({"rounds": 0}, "greater than"), ({"candidate": 3}, "Extra inputs")]:
        with pytest.raises(ValidationError, match=message):
            AllocateConfig(bpw=3.5, refine=bad)
    with pytest.raises(ValidationError, match="use solver: auto or milp"):
        AllocateConfig(bpw=3.5, solver="greedy", refine={})
    with pytest.raises(StageError) as err:
        _allocate(tmp_path / "w", tiny_inputs, bpw=3.5, pareto_budgets=0, refine={"windows": 9})
    assert "refine.windows" in str(err.value) and "4 calibration windows" in str(err.value)
    model, _, table = tiny_inputs
    with pytest.raises(StageError, match="add calibrate"):
        AllocateBits().run(make_ctx(tmp_path / "n"), AllocateConfig(bpw=3.5, refine={}), table, model=model)
    assert AllocateBits().check(AllocateConfig(bpw=3.5, refine={}), {"table": table})


@pytest.mark.slow
def test_cli_refine_recipe_and_bad_value(tmp_path, tiny_model_dir, runs_dir):
    from .conftest import run_cli, write_recipe

    recipe = write_recipe(tmp_path, f"""
name: tiny-refine
model: {{source: "{tiny_model_dir}"}}
stages:
  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: 32}}, n_samples: 4}}}}
  sensitivity: {{uses: sensitivity-analyze, needs: [calibrate], with: {{method: rtn, n_check: 0, n_windows: 2}}}}
  allocate:
    uses: allocate-bits
    needs: [calibrate, sensitivity]
    with: {{bpw: 3.4, pareto_budgets: 0, refine: {{candidates: 3, windows: 2}}}}
""")
    done = run_cli("run", str(recipe), runs_dir=runs_dir, check=True)
    assert "refine chose" in done.stderr
    plan = json.loads(next((runs_dir / "cache").rglob("plan/allocation.json")).read_text())
    assert plan["refine"]["windows"] == 2 and plan["refine"]["kl"] <= plan["refine"]["unrefined_kl"]
    bad = run_cli("run", str(recipe), "stages.allocate.with.refine.candidates=1", runs_dir=runs_dir)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "refine" in bad.stderr and "candidates" in bad.stderr
