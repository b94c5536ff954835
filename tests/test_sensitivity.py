"""sensitivity-analyze: the three estimators (docs/METHODS.md §8 tests) and the stage on a tiny model."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch

from qflow.evaluation.sensitivity import (fisher_damage, fisher_factors, fisher_token_damages, float_logits, hessian_damage, hessian_traces, hutchinson, option_grid,
                                          proxy_damage, single_layer_kl, weight_error)
from qflow.quant import dispatch
from qflow.quant.ir import layer_nbytes
from qflow.quant.spec import QuantSpec

from .test_blockwise import calib_ids, make_ctx, tiny_llama

SPEC = QuantSpec(bits=3, group_size=32, scheme="asym_a")


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


# ---- option grid and bytes -------------------------------------------------------------------

def test_option_grid_keeps_the_options_the_width_allows_with_stored_bytes():
    grid = option_grid({"a": (64, 96), "b": (32, 128)}, bits=[2, 4], group_sizes=[32, 64, 128],
                       base={"scheme": "asym_a"})
    assert [(o.spec.bits, o.spec.group_size) for o in grid["a"]] == [(2, 32), (4, 32)]  # 64, 128 do not divide 96
    assert [(o.spec.bits, o.spec.group_size) for o in grid["b"]] == [(b, g) for b in (2, 4) for g in (32, 64, 128)]
    for name, (out_features, in_features) in {"a": (64, 96), "b": (32, 128)}.items():
        for o in grid[name]:
            assert o.nbytes == layer_nbytes(o.spec, out_features, in_features)


# ---- proxy -----------------------------------------------------------------------------------

def test_proxy_with_diagonal_xtx_is_the_output_error_exactly():
    """METHODS §8 test 4: X^T X diagonal -> proxy == ||dW X^T||^2 / N; the full C form is exact for any X."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    q = torch.linalg.qr(torch.randn(256, 64, generator=gen, dtype=torch.float64))[0]  # orthonormal columns
    x = q * torch.linspace(0.5, 3, 64, dtype=torch.float64)                         # X^T X diagonal
    dw = weight_error(w, SPEC).double()
    exact = float((dw @ x.T).pow(2).sum() / x.shape[0])
    xtx = x.T @ x / x.shape[0]
    assert torch.allclose(xtx, torch.diag(torch.diag(xtx)), atol=1e-12)
    assert proxy_damage(w, SPEC, xtx=xtx) == pytest.approx(exact, rel=1e-9)
    x_any = torch.randn(256, 64, generator=gen, dtype=torch.float64)
    assert proxy_damage(w, SPEC, xtx=x_any.T @ x_any / 256) == pytest.approx(
        float((dw @ x_any.T).pow(2).sum() / 256), rel=1e-9)
    mean_abs = torch.rand(64, generator=gen) + 0.1
    assert proxy_damage(w, SPEC, mean_abs=mean_abs) == pytest.approx(
        float((dw.pow(2) * mean_abs.double().pow(2)).sum()), rel=1e-9)


# ---- Hutchinson ------------------------------------------------------------------------------

def test_hutchinson_on_a_diagonal_hessian_is_exact_every_sample():
    """METHODS §8 test 2: H = diag(1, 2, 3, 4): v^T H v = 10 for every Rademacher v."""
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])
    seen = []

    def hvp(vs):
        seen.append(float((vs[0] * h * vs[0]).sum()))
        return [h * vs[0]]

    est = hutchinson(hvp, [torch.Size([4])], torch.Generator().manual_seed(0), max_iter=20)
    assert seen and all(s == 10.0 for s in seen)
    assert est.traces == [10.0] and est.converged


def test_hutchinson_on_a_random_symmetric_matrix_is_within_three_sigma():
    """METHODS §8 test 3: 2000 samples within 3 sigma of tr(B), sigma^2 = 2 sum_{i!=j} B_ij^2 / m."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(50, 50, generator=gen, dtype=torch.float64)
    b = (a + a.T) / 2
    est = hutchinson(lambda vs: [b @ vs[0]], [torch.Size([50])], gen, max_iter=2000, tol=0.0, dtype=torch.float64)
    off = b - torch.diag(torch.diag(b))
    sigma = math.sqrt(2 * float(off.pow(2).sum()) / 2000)
    assert est.n_iter == 2000
    assert abs(est.traces[0] - float(torch.trace(b))) < 3 * sigma


# ---- kl --------------------------------------------------------------------------------------

def test_kl_matches_a_direct_single_layer_quantize_and_kl():
    model = tiny_llama()
    ids = calib_ids(6, 24)
    layer = "model.layers.1.mlp.down_proj"
    reference = float_logits(model, ids, batch_size=4)
    got = single_layer_kl(model, layer, SPEC, ids, reference, batch_size=4)

    direct = tiny_llama()  # an independent copy: quantize the layer by hand, KL with torch's kl_div
    with torch.no_grad():
        fp = torch.log_softmax(direct(input_ids=ids).logits[:, :-1].double(), -1)
        lin = direct.get_submodule(layer)
        lin.weight.copy_(dispatch.fake_quant(lin.weight, SPEC))
        q = torch.log_softmax(direct(input_ids=ids).logits[:, :-1].double(), -1)
    want = float(torch.nn.functional.kl_div(q, fp, log_target=True, reduction="sum")) / fp[..., 0].numel()
    assert got == pytest.approx(want, rel=1e-4)
    assert got > 0
    # the model's weights are restored: the float model again has KL 0 to itself
    assert single_layer_kl(model, layer, QuantSpec(bits=8, group_size=32), ids, reference, 4) < got
    assert float_logits(model, ids, 4).equal(reference)


def test_kl_falls_with_more_bits():
    """METHODS §8 test 1: Delta_KL(2-bit) > Delta_KL(4-bit) > Delta_KL(8-bit)."""
    model = tiny_llama()
    ids = calib_ids(4, 24)
    reference = float_logits(model, ids, 4)
    kls = [single_layer_kl(model, "model.layers.0.self_attn.o_proj", QuantSpec(bits=b, group_size=32, scheme="asym_a"),
                           ids, reference, 4) for b in (2, 4, 8)]
    assert kls[0] > kls[1] > kls[2] > 0


# ---- hessian ---------------------------------------------------------------------------------

def _damage_down_proj(model, block: int) -> str:
    """Dead MLP channels (gate and up rows zero) whose down_proj columns are 40x: the float model is unchanged
    by those columns, but they set every group's range, so quantizing that down_proj is far worse."""
    mlp = model.model.layers[block].mlp
    dead = torch.tensor([5, 40, 77, 100])  # one per group of 32
    with torch.no_grad():
        mlp.gate_proj.weight[dead] = 0
        mlp.up_proj.weight[dead] = 0
        mlp.down_proj.weight[:, dead] *= 40
    return f"model.layers.{block}.mlp.down_proj"


@pytest.mark.parametrize("seed,block", [(0, 0), (1, 1)])
def test_hessian_is_positive_and_ranks_the_damaged_layer_first(seed, block):
    model = tiny_llama(attn="eager", seed=seed)
    damaged = _damage_down_proj(model, block)
    layers = _linears(model)
    ids = calib_ids(8, 32)
    est = hessian_traces(model, layers, ids, torch.Generator().manual_seed(0), max_iter=100)
    assert all(t > 0 for t in est.traces), est.traces
    spec = QuantSpec(bits=4, group_size=32, scheme="asym_a")
    damage = {n: hessian_damage(t, model.get_submodule(n).weight.detach(), spec) for n, t in zip(layers, est.traces)}
    ranked = sorted(damage, key=damage.get, reverse=True)
    assert ranked[0] == damaged
    assert damage[ranked[0]] > 3 * damage[ranked[1]]
    # the measured KL agrees on the worst layer
    reference = float_logits(model, ids, 8)
    kl = {n: single_layer_kl(model, n, spec, ids, reference, 8) for n in (ranked[0], ranked[1])}
    assert kl[damaged] > kl[ranked[1]]


# ---- fisher (K-FAC) ----------------------------------------------------------------------------

def test_fisher_predicts_the_measured_single_layer_kl_of_small_perturbations():
    """Second order: for 4/8-bit rounding the estimate is the measured KL up to the K-FAC factorisation."""
    model = tiny_llama()
    layers = _linears(model)
    ids = calib_ids(8, 32)
    f = fisher_factors(model, layers, ids, torch.Generator().manual_seed(0), batch_size=4, n_samples=8)
    assert f.n_tokens == 8 * 32 and all(f.g2[n].min() >= 0 for n in layers)
    reference = float_logits(model, ids, 8)
    ratios = []
    for name in (layers[0], layers[3], layers[6], layers[-1]):
        w = model.get_submodule(name).weight.detach()
        for bits in (4, 8):
            spec = QuantSpec(bits=bits, group_size=32, scheme="asym_a")
            est = fisher_damage(w, spec, f.xtx[name], f.g2[name])
            ratios.append(est / single_layer_kl(model, name, spec, ids, reference, 8))
    assert all(0.4 < r < 2.5 for r in ratios), ratios


def test_fisher_ranks_the_damaged_layer_first_and_leaves_the_model_as_it_was():
    model = tiny_llama(seed=1)
    damaged = _damage_down_proj(model, 1)
    layers = _linears(model)
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    f = fisher_factors(model, layers, calib_ids(8, 32), torch.Generator().manual_seed(0), batch_size=4)
    spec = QuantSpec(bits=4, group_size=32, scheme="asym_a")
    damage = {n: fisher_damage(model.get_submodule(n).weight.detach(), spec, f.xtx[n], f.g2[n]) for n in layers}
    assert max(damage, key=damage.get) == damaged
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and p.grad is None and p.detach().equal(before[n][1])


def test_fisher_token_form_predicts_the_measured_kl_and_leaves_the_model_as_it_was():
    """The per-position form keeps (g, x) paired and the cross-channel terms: close to the measured KL."""
    model = tiny_llama()
    layers = _linears(model)
    picked = [layers[0], layers[3], layers[6], layers[-1]]
    ids = calib_ids(8, 32)
    specs = [QuantSpec(bits=b, group_size=32, scheme="asym_a") for b in (4, 8)]
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    damages, n_positions = fisher_token_damages(model, {n: specs for n in picked}, ids,
                                                torch.Generator().manual_seed(0), batch_size=4, n_samples=8)
    assert n_positions == 8 * 31
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and p.grad is None and p.detach().equal(before[n][1])
    reference = float_logits(model, ids, 8)
    ratios = [damages[name][k] / single_layer_kl(model, name, spec, ids, reference, 8)
              for name in picked for k, spec in enumerate(specs)]
    assert all(0.5 < r < 2.0 for r in ratios), ratios
    # 8-bit rounding is a far smaller perturbation than 4-bit for every layer
    assert all(damages[n][1] < damages[n][0] / 10 for n in picked)


def test_hessian_traces_leave_the_model_as_it_was():
    model = tiny_llama(attn="eager")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    hessian_traces(model, _linears(model)[:2], calib_ids(2, 16), torch.Generator().manual_seed(0), max_iter=3)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


# ---- the stage ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory, tiny_model_dir):
    from qflow.artifacts import ModelRef
    from stages.calibrate import Calibrate, CalibrateConfig

    root = tmp_path_factory.mktemp("calib")
    cfg = CalibrateConfig(data={"source": "zoo:wiki-pages", "seq_len": 32}, n_samples=4)
    return Calibrate().run(make_ctx(root), cfg, ModelRef(tiny_model_dir))["calib"]


def _run_stage(root, model_dir, calib, **cfg):
    from qflow.artifacts import ModelRef
    from stages.sensitivity_analyze import SensitivityAnalyze, SensitivityConfig

    return SensitivityAnalyze().run(make_ctx(root), SensitivityConfig(**cfg), ModelRef(model_dir), calib)["table"]


def test_proxy_stage_needs_no_forward_pass(tmp_path, tiny_model_dir, tiny_calib):
    """Weights and statistics only: no config.json (no model can be built) and no token windows."""
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for f in tiny_model_dir.glob("*.safetensors"):
        shutil.copy(f, weights_only / f.name)
    stats_only = tmp_path / "calib"
    stats_only.mkdir()
    shutil.copy(tiny_calib.path / "stats.safetensors", stats_only / "stats.safetensors")
    from qflow.artifacts import CalibSet

    table = _run_stage(tmp_path / "stage", weights_only, CalibSet(stats_only), estimator="proxy", n_check=0)
    with open(table.path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "bits", "group_size", "bytes", "damage", "estimator", "out_features",
                             "in_features"]
    layers = {r["layer"] for r in rows}
    assert len(layers) == 14  # 2 blocks x 7 linears
    for r in rows:
        spec = QuantSpec(bits=int(r["bits"]), group_size=int(r["group_size"]), scheme="asym_a")
        assert int(r["bytes"]) == layer_nbytes(spec, int(r["out_features"]), int(r["in_features"]))
        assert float(r["damage"]) > 0 and r["estimator"] == "proxy"
    # per layer, fewer bits never predicts less damage at the same group size
    by = {(r["layer"], int(r["bits"]), int(r["group_size"])): float(r["damage"]) for r in rows}
    for (layer, bits, g), d in by.items():
        if (layer, 8, g) in by and bits < 8:
            assert d > by[(layer, 8, g)]
    meta = json.loads((table.path / "meta.json").read_text())
    assert meta["n_blocks"] == 2 and meta["proxy_form"] == "diagonal mean_abs^2"
    if meta["parquet"]:
        import pyarrow.parquet as pq

        assert pq.read_table(table.path / "table.parquet").num_rows == len(rows)
    assert (tmp_path / "stage" / "run" / "artifacts" / "quantize" / "damage_heatmap.png").is_file()


def test_stage_check_reports_a_rank_correlation(tmp_path, tiny_model_dir, tiny_calib):
    table = _run_stage(tmp_path, tiny_model_dir, tiny_calib, estimator="proxy", bits=[2, 8], group_sizes=[32],
                       n_check=5, n_windows=2)
    check = json.loads((table.path / "meta.json").read_text())["check"]
    assert check["n"] == 5 and -1 <= check["spearman"] <= 1
    rows = list(csv.DictReader(open(table.path / "check.csv")))
    assert len(rows) == 5 and all(float(r["measured_kl"]) > 0 for r in rows)
    assert (tmp_path / "run" / "artifacts" / "quantize" / "estimator_vs_kl.png").is_file()


@pytest.mark.parametrize("form", ["kfac", "token"])
def test_fisher_stage_forms_agree_on_the_ranking(tmp_path, tiny_model_dir, tiny_calib, form):
    """Both fisher forms through the stage: the table's damages rank options like the measured KL check."""
    table = _run_stage(tmp_path, tiny_model_dir, tiny_calib, estimator="fisher", fisher_form=form, bits=[2, 8],
                       group_sizes=[32], n_check=4, n_windows=2, fisher_samples=2)
    meta = json.loads((table.path / "meta.json").read_text())
    assert meta["fisher_form"] == form and meta["fisher_samples"] == 2
    rows = list(csv.DictReader(open(table.path / "table.csv")))
    by = {(r["layer"], int(r["bits"])): float(r["damage"]) for r in rows}
    assert all(by[(layer, 2)] > by[(layer, 8)] > 0 for layer, _ in by)
    assert meta["check"]["n"] == 4 and meta["check"]["spearman"] > 0


def test_bits_correction_rescales_each_width_by_its_measured_kl(tmp_path, tiny_model_dir, tiny_calib):
    """Per bit width, one factor (geometric mean of measured / estimated) multiplies every option of that width."""
    common = dict(estimator="fisher", bits=[2, 8], group_sizes=[32], n_check=0, n_windows=2)
    raw = _run_stage(tmp_path / "raw", tiny_model_dir, tiny_calib, **common)
    fixed = _run_stage(tmp_path / "fixed", tiny_model_dir, tiny_calib, bits_correction=2, **common)
    meta = json.loads((fixed.path / "meta.json").read_text())["bits_correction"]
    assert set(meta["factors"]) == {"2", "8"} and len(meta["samples"]) == 4
    for b, factor in meta["factors"].items():
        ratios = [s["measured_kl"] / s["estimate"] for s in meta["samples"] if s["bits"] == int(b)]
        assert min(ratios) * 0.999 <= factor <= max(ratios) * 1.001
    before = {(r["layer"], r["bits"]): float(r["damage"]) for r in csv.DictReader(open(raw.path / "table.csv"))}
    after = {(r["layer"], r["bits"]): float(r["damage"]) for r in csv.DictReader(open(fixed.path / "table.csv"))}
    for (layer, bits), d in before.items():
        assert after[(layer, bits)] == pytest.approx(d * meta["factors"][bits], rel=1e-9)


def test_stage_errors_are_clean(tmp_path, tiny_model_dir, tiny_calib):
    from pydantic import ValidationError

    from qflow.artifacts import CalibSet
    from qflow.errors import StageError
    from stages.sensitivity_analyze import SensitivityConfig

    with pytest.raises(StageError, match="stats.safetensors is missing.*calibrate with stats: true"):
        _run_stage(tmp_path / "a", tiny_model_dir, CalibSet(tmp_path), estimator="proxy", n_check=0)
    with pytest.raises(StageError, match="no option.*fits.*in_features 64.*group size that divides"):
        _run_stage(tmp_path / "b", tiny_model_dir, tiny_calib, group_sizes=[128], n_check=0)
    with pytest.raises(ValidationError, match="bits must be one of"):
        SensitivityConfig(bits=[7])
    with pytest.raises(ValidationError, match="lists a value twice"):
        SensitivityConfig(group_sizes=[32, 32])
