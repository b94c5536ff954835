"""Per-layer control (issue 13): layers:/ignore: overrides, a BitAllocation plan input, their resolution,
every quantize method with mixed specs, and exact byte / bpw accounting of a mixed checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from qflow.errors import StageError
from qflow.quant.layerspec import linear_shapes, read_plan, resolve, write_plan
from qflow.quant.spec import QuantSpec

from .conftest import run_cli, write_recipe

BASE = QuantSpec(bits=4, group_size=32)
DOWN0 = "model.layers.0.mlp.down_proj"
DOWN1 = "model.layers.1.mlp.down_proj"
Q0 = "model.layers.0.self_attn.q_proj"
GATE1 = "model.layers.1.mlp.gate_proj"


@pytest.fixture(scope="module")
def shapes(tiny_model_dir):
    return linear_shapes(tiny_model_dir)


def make_ctx(tmp_path: Path, stage_id: str = "quantize"):
    from qflow.engine.context import StageContext

    return StageContext(stage_id=stage_id, uses="x", key="e" * 64, out_dir=tmp_path / "out",
                        scratch=tmp_path / "scratch", run_dir=tmp_path / "run", memo_dir=tmp_path / "runs" / "cache",
                        quiet=True)


# ---------------------------------------------------------------- resolution


def test_overrides_apply_in_order_last_match_wins(shapes):
    from stages.quantize_rtn import RTNConfig

    cfg = RTNConfig(bits=4, group_size=32, layers={"re:.*down_proj": {"bits": 8, "group_size": 64},
                                                   DOWN0: {"group_size": 32},
                                                   Q0: {"bits": 3, "group_size": 16}},
                    ignore=[r"re:.*layers\.1\.mlp\.gate"])
    r = resolve(shapes, cfg.base_spec(), layers=cfg.layers, ignore=cfg.ignore)
    assert (r.specs[DOWN0].bits, r.specs[DOWN0].group_size) == (8, 32)     # field by field, the exact name last
    assert (r.specs[DOWN1].bits, r.specs[DOWN1].group_size) == (8, 64)
    assert (r.specs[Q0].bits, r.specs[Q0].group_size) == (3, 16)
    assert r.specs[GATE1] is None and r.origin[GATE1] == "ignore"
    assert r.specs["model.layers.1.mlp.up_proj"] == cfg.base_spec() and r.origin["model.layers.1.mlp.up_proj"] == "stage"
    assert r.floats == [GATE1] and len(r.quantized) == len(shapes) - 1
    # regexes match from the start of the name (compressed-tensors' rule), exact names only whole
    assert resolve(shapes, BASE, layers={"re:model.layers.1": {"bits": 8}}).specs[DOWN1].bits == 8
    assert resolve(shapes, BASE, layers={"re:model.layers.1": {"bits": 8}}).specs[DOWN0].bits == 4


@pytest.mark.parametrize("kind", ["layers", "ignore"])
@pytest.mark.parametrize("pattern", ["model.layers.0.mlp.down", "re:.*down_projection", "re:layers\\.0"])
def test_zero_match_pattern_is_an_error_naming_closest_modules(shapes, kind, pattern):
    kw = {"layers": {pattern: {"bits": 8}}} if kind == "layers" else {"ignore": [pattern]}
    with pytest.raises(StageError) as err:
        resolve(shapes, BASE, where="stages.quantize.with", **kw)
    msg = str(err.value)
    assert repr(pattern) in msg and f"stages.quantize.with.{kind}" in msg and "closest: model.layers." in msg
    if "down" in pattern:
        assert "down_proj" in msg.split("closest:")[1]
    assert "\n" not in msg


def test_each_spec_is_checked_against_its_layer_shape(shapes):
    with pytest.raises(StageError, match=r"down_proj \[64x128\] under int4 g96.*does not divide in_features 128"):
        resolve(shapes, BASE, layers={DOWN0: {"group_size": 96}}, where="stages.q.with")
    with pytest.raises(StageError, match="stages.q.inputs.plan"):
        resolve(shapes, BASE, plan={DOWN0: {"group_size": 48}}, where="stages.q.with")


def test_config_validation_catches_patterns_and_fields():
    from stages.quantize_hqq import HQQConfig
    from stages.quantize_rtn import RTNConfig
    from stages.quantize_smoothquant import SmoothQuantConfig

    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RTNConfig(layers={"re:(": {"bits": 8}})
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RTNConfig(ignore=["re:[a-"])
    with pytest.raises(ValidationError, match="bits must be one of"):
        RTNConfig(layers={DOWN0: {"bits": 7}})
    with pytest.raises(ValidationError, match="scheme cannot be set per layer.*allowed: bits, group_size"):
        HQQConfig(layers={DOWN0: {"scheme": "sym_f"}})
    with pytest.raises(ValidationError, match="bits cannot be set per layer.*use ignore:"):
        SmoothQuantConfig(layers={DOWN0: {"bits": 4}})
    with pytest.raises(ValidationError, match="changes nothing"):
        RTNConfig(layers={DOWN0: {}})
    # fine: a format switch drops what nf4 cannot have, symmetric re-derives the scheme
    assert RTNConfig(layers={DOWN0: {"format": "nf4", "group_size": 64}}).layers[DOWN0].format == "nf4"


def test_plan_then_recipe_overrides_then_ignore(shapes, tmp_path):
    plan = write_plan(tmp_path / "plan", {DOWN0: {"bits": 3, "group_size": 64}, DOWN1: None, Q0: {"bits": 8},
                                          GATE1: {"bits": 2}}, method_hint="rtn", budget={"bpw": 4.0})
    layers = read_plan(plan)
    r = resolve(shapes, BASE, plan=layers, layers={DOWN0: {"bits": 8}}, ignore=[GATE1])
    assert (r.specs[DOWN0].bits, r.specs[DOWN0].group_size) == (8, 64)   # recipe bits over the plan's
    assert r.specs[DOWN1] is None and r.origin[DOWN1] == "plan"          # null: float
    assert r.specs[Q0].bits == 8 and r.origin[Q0] == "plan"
    assert r.specs[GATE1] is None and r.origin[GATE1] == "ignore"
    assert r.origin["model.layers.0.mlp.up_proj"] == "stage"             # absent from the plan
    said = r.summary()["recipe_over_plan"]
    assert len(said) == 2 and said[0].startswith(f"{DOWN0}: plan int3 g64") and "recipe int8 g64" in said[0]
    assert GATE1 in said[1] and "ignore" in said[1]
    with pytest.raises(StageError, match="does not quantize.*'model.layers.7.mlp.down_proj'"):
        resolve(shapes, BASE, plan={"model.layers.7.mlp.down_proj": {"bits": 8}})
    with pytest.raises(StageError, match="sets bits for .*allowed: null only"):
        resolve(shapes, BASE, plan={DOWN0: {"bits": 8}}, plan_fields=())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "allocation.json").write_text('{"layers": [1, 2]}')
    from qflow.artifacts import BitAllocation

    with pytest.raises(StageError, match="has no 'layers' mapping"):
        read_plan(BitAllocation(tmp_path / "bad"))


# ---------------------------------------------------------------- RTN: exact byte accounting


def _expected_layer_bytes(spec: QuantSpec, out: int, cols: int) -> int:
    """codes packed 32 // bits per int32 word + fp16 scales + uint8 zeros, by hand."""
    words = math.ceil(cols / (32 // spec.bits))
    groups = math.ceil(cols / spec.group_size) if spec.group_size > 0 else 1
    zeros = out * groups if spec.has_zero else 0
    return out * words * 4 + out * groups * 2 + zeros


def test_rtn_mixed_plan_exact_bytes_and_bpw(tiny_model_dir, tmp_path):
    from qflow.artifacts import ModelRef
    from qflow.evaluation.size import size_metrics
    from qflow.quant.ir import Checkpoint
    from stages.quantize_rtn import RTN

    plan = write_plan(tmp_path / "plan", {DOWN0: {"bits": 3, "group_size": 64}, DOWN1: None, Q0: {"bits": 2}})
    cfg = RTN.Config(bits=4, group_size=32, layers={"re:.*o_proj": {"bits": 8, "scheme": "sym_f"}, Q0: {"bits": 6}},
                     ignore=[GATE1])
    ctx = make_ctx(tmp_path)
    out = RTN().run(ctx, cfg, model=ModelRef(tiny_model_dir), plan=plan)
    ckpt = Checkpoint(out["model"].path)
    shapes = linear_shapes(tiny_model_dir)
    assert set(ckpt.layers) == set(shapes) - {DOWN1, GATE1}
    got = {n: (r.spec.bits, r.spec.group_size, r.spec.scheme) for n, r in ckpt.layers.items()}
    assert got[DOWN0] == (3, 64, "asym_z") and got[Q0] == (6, 32, "asym_z")
    assert got["model.layers.1.self_attn.o_proj"] == (8, 32, "sym_f")
    assert got["model.layers.1.self_attn.k_proj"] == (4, 32, "asym_z")
    # exact bytes per layer (codes + scales + zeros) and their total
    total_bytes, total_bits, total_weights = 0, 0.0, 0
    for name, rec in ckpt.layers.items():
        out_f, cols = shapes[name]
        expect = _expected_layer_bytes(rec.spec, out_f, cols)
        assert ckpt.layer_bytes(name) == expect, name
        total_bytes += expect
        groups = cols // rec.spec.group_size
        zero_bits = rec.spec.bits if rec.spec.has_zero else 0
        total_bits += rec.spec.bits * out_f * cols + (16 + zero_bits) * out_f * groups
        total_weights += out_f * cols
    assert ckpt.quantized_bytes() == total_bytes
    metrics, info = size_metrics(tiny_model_dir, ckpt)
    assert metrics["quantized_bytes"] == total_bytes and metrics["n_quantized_weights"] == total_weights
    assert metrics["bpw_quantized"] == pytest.approx(total_bits / total_weights, rel=1e-12)
    assert metrics["bpw_quantized_measured"] == pytest.approx(8 * total_bytes / total_weights, rel=1e-12)
    per_spec = info["quantized_specs"]
    assert per_spec["int3 g64 asym_z"]["layers"] == 1 and per_spec["int8 g32 sym_f"]["layers"] == 2
    assert sum(r["bytes"] for r in per_spec.values()) == total_bytes
    # the float layers count at the deployment dtype, like the head and embeddings
    n_params = metrics["n_params"]
    assert metrics["size_bytes_deploy"] == total_bytes + 2 * (n_params - total_weights)
    # the run summary says the recipe beat the plan
    note = ctx.info["tags"]["qflow.note.plan_overrides"]
    assert "recipe overrides win over the allocation plan for 1 layer(s)" in note and Q0 in note
    assert "int2" in note and "int6" in note
    specs_file = json.loads((tmp_path / "scratch" / "layer_specs.json").read_text())
    assert specs_file["layers"][DOWN1] == {"spec": None, "origin": "plan"}


# ---------------------------------------------------------------- every method with mixed specs


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    ids = torch.randint(0, 2000, (4, 64), generator=torch.Generator().manual_seed(3))
    torch.save(ids, folder / "ids.pt")
    return folder


METHOD_CASES = {
    "awq": dict(layers={"re:.*down_proj": {"bits": 8}, Q0: {"bits": 3, "group_size": 16}},
                ignore=["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]),
    "awq+gptq": dict(then="gptq", gptq_act_order=False,
                     layers={"re:.*down_proj": {"bits": 8}, Q0: {"bits": 3, "group_size": 16}},
                     ignore=["model.layers.0.self_attn.v_proj"]),
    "gptq": dict(act_order=False, layers={"re:.*down_proj": {"bits": 8}, Q0: {"bits": 3, "group_size": 16}},
                 ignore=["model.layers.0.self_attn.o_proj", "re:model.layers.1.self_attn.[qkv]_proj"]),
    "hqq": dict(layers={"re:.*down_proj": {"bits": 8}, Q0: {"bits": 3, "group_size": 16}},
                ignore=["model.layers.1.mlp.up_proj"]),
    "smoothquant": dict(ignore=["model.layers.0.self_attn.q_proj", "re:.*down_proj"]),
}


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_every_method_quantizes_each_layer_with_its_own_spec(method, tiny_model_dir, calib_dir, tmp_path):
    from qflow.artifacts import CalibSet, ModelRef
    from qflow.models.loading import load_model
    from qflow.models.quantized import apply_checkpoint
    from qflow.quant.ir import Checkpoint
    from stages.quantize_awq import AWQ
    from stages.quantize_gptq import GPTQ
    from stages.quantize_hqq import HQQ
    from stages.quantize_smoothquant import SmoothQuant

    stage = {"awq": AWQ, "awq+gptq": AWQ, "gptq": GPTQ, "hqq": HQQ, "smoothquant": SmoothQuant}[method]()
    kw = dict(METHOD_CASES[method])
    base = {"smoothquant": {}, "hqq": {"bits": 4, "group_size": 32}}.get(method, {"bits": 4, "group_size": 32})
    cfg = stage.Config(**base, **kw)
    model = ModelRef(tiny_model_dir)
    assert stage.check(cfg, {"model": model}) == []
    inputs = {"model": model} if method == "hqq" else {"model": model, "calib": CalibSet(calib_dir)}
    out = stage.run(make_ctx(tmp_path), cfg, **inputs)
    ckpt = Checkpoint(out["model"].path)
    expected = resolve(linear_shapes(tiny_model_dir), cfg.base_spec(), layers=cfg.layers, ignore=cfg.ignore)
    assert set(ckpt.layers) == set(expected.quantized)
    for name, rec in ckpt.layers.items():
        assert rec.spec == expected.specs[name], name
        codes, _, _ = ckpt.params(name)
        assert int(codes.max()) <= rec.spec.qmax
    if method != "smoothquant":
        assert {r.spec.bits for r in ckpt.layers.values()} == {3, 4, 8}
    # left-float linears that a fold (AWQ scales, SmoothQuant smoothing) changed travel as float deltas
    folded = {"awq": ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"],
              "awq+gptq": ["model.layers.0.self_attn.v_proj"], "smoothquant": [Q0]}.get(method, [])
    assert sorted(p for p in ckpt.floats if p.endswith("_proj.weight")) == sorted(f"{n}.weight" for n in folded)
    net, tok = load_model(tiny_model_dir, dtype=torch.float32)
    apply_checkpoint(net, ckpt)
    for name in expected.floats:
        assert isinstance(net.get_submodule(name), torch.nn.Linear)
    with torch.no_grad():
        logits = net(input_ids=torch.arange(1, 17)[None]).logits
    assert bool(torch.isfinite(logits).all())


def test_awq_search_with_equal_specs_matches_one_spec():
    """A list of one spec per linear is the same search as the single spec (mixed sites reuse the path)."""
    from qflow.quant.algos.awq import search_scale

    gen = torch.Generator().manual_seed(0)
    lin = [torch.nn.Linear(64, 32, bias=False) for _ in range(2)]
    for m in lin:
        m.weight.data = torch.randn(32, 64, generator=gen)
    x = torch.randn(2, 8, 64, generator=gen)

    class Both(torch.nn.Module):
        def forward(self, h):
            return torch.cat([m(h) for m in lin], -1)

    spec = QuantSpec(bits=3, group_size=32)
    one = search_scale(Both(), lin, x, spec, n_grid=10, duo_scaling=True)
    per = search_scale(Both(), lin, x, [spec, spec], n_grid=10, duo_scaling=True)
    assert torch.equal(one.scales, per.scales) and one.losses == per.losses
    mixed = search_scale(Both(), lin, x, [spec, None], n_grid=10)
    assert mixed.losses != one.losses
    with pytest.raises(ValueError, match="at least one of them quantized"):
        search_scale(Both(), lin, x, [None, None])


# ---------------------------------------------------------------- as a user runs it


def _recipe(model_dir: Path, quantize_with: str) -> str:
    return f"""
name: mixed
model: {{source: "{model_dir}"}}
stages:
  quantize:
    uses: quantize.rtn
    with:
{quantize_with}
"""


def test_cli_zero_match_refused_before_any_work(tmp_path, runs_dir, tiny_model_dir):
    recipe = write_recipe(tmp_path, _recipe(tiny_model_dir, """      bits: 4
      group_size: 32
      layers: {"re:.*down_prj": {bits: 8}}"""))
    done = run_cli("run", str(recipe), runs_dir=runs_dir)
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert "Traceback" not in text
    assert "'re:.*down_prj' matches none" in text and "closest: model.layers." in text and "down_proj" in text
    assert not list(runs_dir.rglob("ir.json"))   # nothing quantized, no cache entry


def test_cli_mixed_run_summary_lists_specs(tmp_path, runs_dir, tiny_model_dir):
    recipe = write_recipe(tmp_path, _recipe(tiny_model_dir, """      bits: 4
      group_size: 32
      layers:
        "re:.*down_proj": {bits: 8}
        model.layers.0.self_attn.q_proj: {bits: 3, group_size: 16}
      ignore: ["re:.*layers\\\\.1\\\\.mlp\\\\.gate_proj"]"""))
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    tags = summary["stages"]["quantize"]["tags"]
    assert tags["qflow.layers.specs"] == "int8 g32 asym_z: 2, int4 g32 asym_z: 10, int3 g16 asym_z: 1, float: 1"
    done = run_cli("run", str(recipe), runs_dir=runs_dir)   # cached: the printed summary still says it
    assert "notes:" in done.stdout and "quantize/specs: int8 g32 asym_z: 2" in done.stdout


def test_evaluate_layer_table_shows_each_layers_spec(tiny_model_dir, tmp_path):
    """The evaluate report's per-layer table carries every row's own bits, group, scheme and bpw."""
    import csv

    from qflow.artifacts import ModelRef
    from qflow.evaluation.layers import layer_report, write_tables
    from qflow.models.loading import load_model
    from qflow.models.quantized import apply_checkpoint
    from qflow.quant.ir import Checkpoint
    from stages.quantize_rtn import RTN

    cfg = RTN.Config(bits=4, group_size=32, layers={"re:.*down_proj": {"bits": 8, "scheme": "sym_f"}},
                     ignore=[GATE1])
    ckpt = Checkpoint(RTN().run(make_ctx(tmp_path), cfg, model=ModelRef(tiny_model_dir))["model"].path)
    fp, _ = load_model(tiny_model_dir, dtype=torch.float32)
    q, _ = load_model(tiny_model_dir, dtype=torch.float32)
    apply_checkpoint(q, ckpt)
    ids = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(1))
    rows = layer_report(fp, q, ckpt, ids)
    by_layer = {r["layer"]: r for r in rows}
    assert GATE1 not in by_layer and len(rows) == len(ckpt.layers)
    assert (by_layer[DOWN0]["bits"], by_layer[DOWN0]["scheme"]) == (8, "sym_f")
    assert by_layer[DOWN0]["bpw"] == pytest.approx(8 + 16 / 32)
    assert by_layer[Q0]["bpw"] == pytest.approx(4 + (16 + 4) / 32)
    csv_path, _ = write_tables(rows, tmp_path / "report")
    table = {r["layer"]: r for r in csv.DictReader(csv_path.open())}
    assert table[DOWN0]["bits"] == "8" and float(table[DOWN0]["bpw"]) == 8.5 and table[Q0]["scheme"] == "asym_z"
