"""allocate-bits: exact byte accounting, MILP vs brute force, greedy gap, constraints, budgets (docs/METHODS.md §9)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from qflow.quant import dispatch
from qflow.quant.allocate import (InfeasibleBudget, Option, Problem, allocate, budget_bytes_for_bpw, pareto_front,
                                  solve_greedy, solve_milp)
from qflow.quant.allocate_rules import DistinctRule, parse_rule
from qflow.quant.ir import Checkpoint, CheckpointWriter, encode_layer, layer_nbytes
from qflow.quant.spec import QuantSpec

from .test_blockwise import make_ctx

SPECS = ([QuantSpec(bits=b, group_size=g, scheme=s) for b in (2, 3, 4, 5, 6, 8) for g in (32, -1, 0)
          for s in ("asym_z", "asym_a", "sym_f")]
         + [QuantSpec(bits=4, group_size=32, scale_dtype="float32"), QuantSpec(bits=3, group_size=48, pad_last_group=True),
            QuantSpec(bits=4, group_size=32, scheme="asym_h", zero_float=True),
            QuantSpec(format="nf4", group_size=32), QuantSpec(format="fp4", group_size=64, double_quant=True)])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}{s.bits}-g{s.group_size}-{s.scheme}-{s.scale_dtype}"
                                                         f"{'-dq' if s.double_quant else ''}{'-zf' if s.zero_float else ''}")
@pytest.mark.parametrize("g_idx", [False, True])
def test_layer_nbytes_is_what_encode_layer_stores(spec, g_idx):
    w = torch.randn(40, 160, generator=torch.Generator().manual_seed(0))
    scale, zero = dispatch.compute_params(w, spec)
    codes = dispatch.quantize(w, scale, zero, spec)
    stored = encode_layer(spec, codes, scale, zero, torch.arange(160) // 32 if g_idx else None)
    assert layer_nbytes(spec, 40, 160, g_idx=g_idx) == sum(t.numel() * t.element_size() for t in stored.values())


# ---- docs/METHODS.md §9 worked example --------------------------------------------------------------

def _methods_problem() -> Problem:
    ns = {"a": 4096 * 4096, "b": 4096 * 11008, "c": 11008 * 4096}
    errs = {"a": [1.0, 0.30, 0.08], "b": [2.0, 0.50, 0.12], "c": [4.0, 1.20, 0.20]}
    bpws = [(2, 64, 2.5), (3, 128, 3.25), (4, 128, 4.25)]
    return Problem(list(ns), list(ns.values()),
                   [[Option(b, g, int(n * bpw / 8), e) for (b, g, bpw), e in zip(bpws, errs[k])] for k, n in ns.items()])


def test_methods_example_milp_greedy_and_pareto():
    p = _methods_problem()
    budget = budget_bytes_for_bpw(3.6, p.total_weights)
    milp = allocate(p, budget)
    assert [o.bits for o in milp.options(p)] == [2, 3, 4]
    assert milp.damage == pytest.approx(1.70) and milp.bpw(p) == pytest.approx(3.5539, abs=1e-4)
    assert milp.optimal and milp.gap == 0
    greedy = allocate(p, budget, solver="greedy")
    assert [o.bits for o in greedy.options(p)] == [4, 3, 3] and greedy.damage == pytest.approx(1.78)
    assert not greedy.optimal and greedy.gap > 0 and greedy.lp_bound <= milp.damage + 1e-9
    assert [o.bits for o in allocate(p, budget_bytes_for_bpw(3.25, p.total_weights)).options(p)] == [3, 3, 3]
    points = [(sum(p.options[li][k].nbytes for li, k in enumerate(c)), sum(p.options[li][k].damage for li, k in enumerate(c)))
              for c in itertools.product(range(3), repeat=3)]
    front = [(round(8 * s / p.total_weights, 4), round(d, 4)) for s, d in pareto_front(points)]
    assert len(front) == 14 and front[:4] == [(2.5, 7.0), (2.6176, 6.3), (2.7745, 6.08), (2.8162, 4.2)]


# ---- MILP against brute force on tiny problems --------------------------------------------------

def _random_problem(seed: int, n_layers: int = 5) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    options, n_weights = [], []
    for _ in range(n_layers):
        out_features, in_features = 32 * int(torch.randint(1, 4, (1,), generator=gen)), 128
        n_weights.append(out_features * in_features)
        opts = []
        for bits in (2, 3, 4, 8):
            for g in (32, 64, 128):
                spec = QuantSpec(bits=bits, group_size=g, scheme="asym_a")
                noise = float(torch.rand(1, generator=gen)) + 0.5
                opts.append(Option(bits, g, layer_nbytes(spec, out_features, in_features),
                                   noise * 4.0 ** -bits * (1 + g / 128)))
        options.append(opts)
    return Problem([f"model.layers.{i}.mlp.up_proj" for i in range(n_layers)], n_weights, options)


def _brute_force(p: Problem, budget: int, distinct=()):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in p.options]):
        opts = [p.options[li][k] for li, k in enumerate(choice)]
        if sum(o.nbytes for o in opts) > budget:
            continue
        if any(len({getattr(o, r.attr) for o in opts}) > r.max_count for r in distinct):
            continue
        damage = sum(o.damage for o in opts)
        if best is None or damage < best - 1e-15:
            best = damage
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("distinct", [(), (DistinctRule("distinct_group_sizes <= 1", "group_size", 1),)])
def test_milp_matches_brute_force(seed, distinct):
    p = _random_problem(seed, n_layers=4)
    lo = sum(min(o.nbytes for o in opts) for opts in p.options)
    hi = sum(max(o.nbytes for o in opts) for opts in p.options)
    for frac in (0.1, 0.35, 0.7):
        budget = int(lo + frac * (hi - lo))
        sol = solve_milp(p, budget, list(distinct))
        want = _brute_force(p, budget, distinct)
        assert sol.optimal and sol.nbytes <= budget
        assert sol.damage == pytest.approx(want, rel=1e-9)
        greedy = solve_greedy(p, budget, list(distinct))
        assert greedy.damage >= want - 1e-15 and greedy.gap >= -1e-9 and not greedy.optimal


def test_infeasible_budget_names_the_minimum():
    p = _methods_problem()
    with pytest.raises(InfeasibleBudget) as err:
        allocate(p, budget_bytes_for_bpw(2.4, p.total_weights))
    assert err.value.minimum == sum(min(o.nbytes for o in opts) for opts in p.options)
    assert allocate(p, err.value.minimum).bpw(p) == pytest.approx(2.5)


# ---- constraint grammar -------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("re:.*v_proj => 4", "does not parse"), ("blocks[0,x] >= 4", "block indices must be integers"),
    ("re:([ >= 4", "does not compile"), ("distinct_group_sizes <= 0", "at least 1"), ("bits >= 4", "does not parse")])
def test_bad_constraints_are_refused_at_config_time(text, message):
    from pydantic import ValidationError

    from stages.allocate_bits import AllocateConfig

    with pytest.raises(ValueError, match=message):
        parse_rule(text)
    with pytest.raises(ValidationError, match=r"constraints\[0\]"):
        AllocateConfig(bpw=4, constraints=[text])


def test_config_needs_exactly_one_budget():
    from pydantic import ValidationError

    from stages.allocate_bits import AllocateConfig

    for kwargs in ({}, {"bpw": 4.0, "bytes": 10}):
        with pytest.raises(ValidationError, match="exactly one budget"):
            AllocateConfig(**kwargs)


# ---- the stages end to end on the tiny model -----------------------------------------------------

@pytest.fixture(scope="module")
def proxy_table(tmp_path_factory, tiny_model_dir):
    from qflow.artifacts import ModelRef
    from stages.calibrate import Calibrate, CalibrateConfig
    from stages.sensitivity_analyze import SensitivityAnalyze, SensitivityConfig

    root = tmp_path_factory.mktemp("alloc")
    cfg = CalibrateConfig(data={"source": "zoo:wiki-pages", "seq_len": 32}, n_samples=4)
    calib = Calibrate().run(make_ctx(root / "calib"), cfg, ModelRef(tiny_model_dir))["calib"]
    return SensitivityAnalyze().run(make_ctx(root / "sens"), SensitivityConfig(estimator="proxy", n_check=0),
                                    ModelRef(tiny_model_dir), calib)["table"]


def _allocate(root, table, **cfg):
    from stages.allocate_bits import AllocateBits, AllocateConfig

    plan = AllocateBits().run(make_ctx(root), AllocateConfig(**cfg), table)["plan"]
    return json.loads((plan.path / "allocation.json").read_text())


def test_plan_realises_its_predicted_bpw_exactly(tmp_path, tiny_model_dir, proxy_table):
    """Quantize each layer with its planned spec into the IR: stored bytes == predicted bytes, to the byte."""
    from qflow.quant.weights import iter_linear_weights

    plan = _allocate(tmp_path / "a", proxy_table, bpw=3.7, pareto_budgets=4)
    assert plan["solver"]["name"] == "milp" and plan["solver"]["optimal"]
    assert plan["predicted"]["bpw"] <= 3.7 and len({(v["bits"], v["group_size"]) for v in plan["layers"].values()}) > 1
    writer = CheckpointWriter(tmp_path / "ir", base_model=str(tiny_model_dir), method="rtn")
    for name, w in iter_linear_weights(tiny_model_dir, list(plan["layers"])):
        spec = QuantSpec(**plan["layers"][name], scheme=plan["spec"]["scheme"], scale_dtype=plan["spec"]["scale_dtype"])
        scale, zero = dispatch.compute_params(w, spec)
        writer.add_quantized(name, spec, dispatch.quantize(w, scale, zero, spec), scale, zero)
    ckpt = writer.close()
    assert ckpt.quantized_bytes() == plan["predicted"]["bytes"]
    assert 8 * ckpt.quantized_bytes() / ckpt.n_quantized_weights() == plan["predicted"]["bpw"]
    assert Checkpoint(tmp_path / "ir").bpw_quantized() == pytest.approx(plan["predicted"]["bpw_nominal"], rel=1e-12)
    pareto = (tmp_path / "a" / "out" / "plan" / "pareto.csv").read_text().splitlines()
    assert pareto[0] == "bpw,bytes,damage" and len(pareto) >= 3
    assert (tmp_path / "a" / "run" / "artifacts" / "quantize" / "pareto.png").is_file()


def test_constraints_are_respected(tmp_path, proxy_table):
    plan = _allocate(tmp_path, proxy_table, bpw=4.2, pareto_budgets=0,
                     constraints=["blocks[-1] >= 4", "re:.*v_proj bits == 8", "distinct_group_sizes <= 1"])
    layers = plan["layers"]
    assert all(v["bits"] >= 4 for n, v in layers.items() if ".layers.1." in n)
    assert all(v["bits"] == 8 for n, v in layers.items() if n.endswith("v_proj"))
    assert len({v["group_size"] for v in layers.values()}) == 1
    assert any(v["bits"] < 4 for n, v in layers.items() if ".layers.0." in n)  # block 0 was free to go low
    assert plan["predicted"]["bpw"] <= 4.2 and plan["solver"]["optimal"]


def test_greedy_plan_reports_its_gap(tmp_path, proxy_table):
    plan = _allocate(tmp_path, proxy_table, bpw=3.3, solver="greedy", pareto_budgets=0)
    exact = _allocate(tmp_path / "exact", proxy_table, bpw=3.3, solver="milp", pareto_budgets=0)
    solver = plan["solver"]
    assert solver["name"] == "greedy" and solver["optimal"] is False
    assert solver["gap"] >= 0 and solver["lp_bound"] <= exact["predicted"]["damage"] * (1 + 1e-9)
    assert plan["predicted"]["damage"] >= exact["predicted"]["damage"] * (1 - 1e-9)
    auto = _allocate(tmp_path / "auto", proxy_table, bpw=3.3, milp_max_vars=10, pareto_budgets=0)
    assert auto["solver"]["name"] == "greedy" and "milp_max_vars" in auto["solver"]["notes"][0]


def test_infeasible_budget_is_a_clean_error_naming_the_minimum(tmp_path, proxy_table):
    from qflow.errors import StageError

    with pytest.raises(StageError) as err:
        _allocate(tmp_path / "a", proxy_table, bpw=2.0, constraints=["blocks[0] >= 4"], pareto_budgets=0)
    message = str(err.value)
    assert "stages.quantize.with.bpw" in message and "minimum feasible" in message and "\n" not in message
    minimum = float(message.split("set bpw >= ")[1].split(" ")[0])
    plan = _allocate(tmp_path / "b", proxy_table, bpw=minimum, constraints=["blocks[0] >= 4"], pareto_budgets=0)
    assert plan["predicted"]["bpw"] <= minimum
    with pytest.raises(StageError, match=r"constraints\[0\].*names block 5.*has 2 blocks"):
        _allocate(tmp_path / "c", proxy_table, bpw=4.0, constraints=["blocks[5] >= 4"], pareto_budgets=0)
    with pytest.raises(StageError, match="selects no layer"):
        _allocate(tmp_path / "d", proxy_table, bpw=4.0, constraints=["re:wq >= 4"], pareto_budgets=0)
    with pytest.raises(StageError, match="leave model.layers.0.* no option"):
        _allocate(tmp_path / "e", proxy_table, bpw=4.0, constraints=["all bits == 5"], pareto_budgets=0)


def test_total_bytes_budget_counts_the_unquantized_tensors(tmp_path, proxy_table):
    meta = json.loads((proxy_table.path / "meta.json").read_text())
    fixed = meta["fixed_bytes"]["float16"]
    by_bpw = _allocate(tmp_path / "a", proxy_table, bpw=4.0, pareto_budgets=0)
    total = by_bpw["predicted"]["bytes"] + fixed
    by_bytes = _allocate(tmp_path / "b", proxy_table, bytes=total, pareto_budgets=0)
    assert by_bytes["predicted"]["total_bytes"] <= total
    assert by_bytes["predicted"]["damage"] == pytest.approx(by_bpw["predicted"]["damage"], rel=1e-9)


def test_cli_recipe_plans_and_refuses_an_infeasible_budget_cleanly(tmp_path, tiny_model_dir, runs_dir):
    from .conftest import run_cli, write_recipe

    recipe = write_recipe(tmp_path, f"""
name: tiny-mixed
model: {{source: "{tiny_model_dir}"}}
params: {{bpw: 3.8}}
stages:
  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: 32}}, n_samples: 4}}}}
  sensitivity: {{uses: sensitivity-analyze, needs: [calibrate], with: {{n_check: 3, n_windows: 2}}}}
  allocate:
    uses: allocate-bits
    needs: [sensitivity]
    with: {{bpw: "${{params.bpw}}", constraints: ["blocks[0,-1] >= 3", "distinct_group_sizes <= 2"], pareto_budgets: 3}}
""")
    done = run_cli("run", str(recipe), runs_dir=runs_dir, check=True)
    assert "Spearman rank correlation" in done.stdout + done.stderr
    plans = list((runs_dir / "cache").rglob("plan/allocation.json"))
    assert len(plans) == 1
    plan = json.loads(plans[0].read_text())
    assert plan["predicted"]["bpw"] <= 3.8 and all(v["bits"] >= 3 for v in plan["layers"].values())
    bad = run_cli("run", str(recipe), "params.bpw=1.5", runs_dir=runs_dir)
    assert bad.returncode == 1, bad.stderr  # the run failed at that stage (one paragraph, no traceback)
    assert "Traceback" not in bad.stderr
    assert "stages.allocate.with.bpw" in bad.stderr and "minimum feasible" in bad.stderr and "set bpw >=" in bad.stderr


def test_budget_sweep_reuses_calibration_and_sensitivity(tmp_path, tiny_model_dir, runs_dir):
    """`qflow run -m ... params.bpw=a,b`: calibrate and sensitivity run once (cached for the second
    point); allocate and quantize run per point; the realised bpw equals the plan's prediction."""
    from .conftest import parse_json_stdout, run_cli, write_recipe

    recipe = write_recipe(tmp_path, f"""
name: tiny-mixed-sweep
model: {{source: "{tiny_model_dir}"}}
params: {{bpw: 4.5}}
stages:
  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: 32}}, n_samples: 4}}}}
  sensitivity: {{uses: sensitivity-analyze, needs: [calibrate], with: {{method: rtn, n_check: 0, n_windows: 2}}}}
  allocate: {{uses: allocate-bits, needs: [sensitivity], with: {{bpw: "${{params.bpw}}", pareto_budgets: 0}}}}
  quantize:
    uses: quantize.rtn
    needs: [calibrate, allocate]
    inputs: {{plan: allocate.plan}}
    with: {{bits: 4, group_size: 32}}
  evaluate:
    uses: evaluate.lm
    needs: [quantize]
    with: {{data: {{source: "zoo:lee-news", seq_len: 32}}, n_windows: 2, topk: 16, speed: false, layer_report: false}}
""")
    done = run_cli("run", "-m", str(recipe), "params.bpw=3.5,4.5", "--json", runs_dir=runs_dir, timeout=900)
    assert done.returncode == 0, done.stderr
    points = parse_json_stdout(done)["points"]
    assert len(points) == 2 and all(p["status"] == "ok" for p in points)
    first, second = sorted(points, key=lambda p: p["job"])
    for sid in ("calibrate", "sensitivity"):
        assert first["stages"][sid]["key"] == second["stages"][sid]["key"]
        assert second["stages"][sid]["status"] == "cached", second["stages"][sid]
    for sid in ("allocate", "quantize"):
        assert first["stages"][sid]["key"] != second["stages"][sid]["key"]
        assert second["stages"][sid]["status"] == "ran"
    for p in points:
        m = p["metrics"]
        assert m["allocate/predicted_bpw"] == pytest.approx(m["evaluate/bpw_quantized_measured"], abs=1e-9), m
    assert first["metrics"]["evaluate/bpw_quantized_measured"] < second["metrics"]["evaluate/bpw_quantized_measured"]


def test_solver_output_on_fd1_goes_to_stderr(capfd):
    """HiGHS writes diagnostics with C++ on file descriptor 1: the guard keeps `qflow run --json`'s stdout clean."""
    import os

    from qflow.quant.allocate import _stdout_to_stderr

    with _stdout_to_stderr():
        os.write(1, b"solver chatter\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert "solver chatter" in err and "solver chatter" not in out and "after" in out
