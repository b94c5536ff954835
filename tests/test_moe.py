"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): unfused experts, per-expert calibration.

Fast part: tiny random models (2 layers, hidden 64, 4 experts, top-2) in process: the unfused
forward equals transformers' fused one, every stored layout reads back under qflow's names,
exact AWQ / SmoothQuant folds, AWQ and GPTQ per expert with the token report, the all-experts
option and the RTN fallback. Slow part: the CLI (calibrate -> RTN / HQQ / AWQ / GPTQ /
SmoothQuant -> evaluate -> compressed-tensors export) per family.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

from qflow.models.adapters import get_adapter
from qflow.models.moe import UnfusedSparseMoe, set_calibrate_all_experts, unfuse_experts
from qflow.models.quantized import apply_checkpoint
from qflow.quant.algos.awq import AWQOptions, quantize_model_awq
from qflow.quant.algos.gptq_model import GPTQOptions, quantize_model_gptq
from qflow.quant.ir import Checkpoint

from .conftest import fold_random_scales
from .test_blockwise import calib_ids, make_ctx

VOCAB = 97
N_EXPERTS = 4
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    # tiny tensors: the torch reference kernels (bit-equal to numba, tests/test_kernels_cpu.py) avoid
    # thread start-up per call, which dominates on a loaded machine
    monkeypatch.setenv("QFLOW_KERNEL_BACKEND", "torch")


def tiny_moe(family: str, *, seed: int = 0, vocab: int = VOCAB, fused: bool = False) -> nn.Module:
    """A 2-layer random ``family`` model: hidden 64, 4 heads (GQA 2), 4 experts of width 32, top-2."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2,
                  tie_word_embeddings=False)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=N_EXPERTS)
        model = transformers.MixtralForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=64, num_experts=N_EXPERTS)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                                          num_experts=N_EXPERTS, norm_topk_prob=True)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.endswith("gate.weight") else 0.05))
            elif name.endswith("norm.weight"):
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=gen))
    model.eval()
    if not fused:
        unfuse_experts(model)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _n_linears(family: str) -> int:
    """Quantized linears of one block: attention 4 + 3 per expert (+ 3 for Qwen2-MoE's shared expert)."""
    return 4 + 3 * N_EXPERTS + (3 if family == "qwen2_moe" else 0)


# ---- unfusing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_forward_equals_the_fused_one(family):
    model = tiny_moe(family, fused=True)
    ids = calib_ids(3, 24, vocab=VOCAB)
    ref = _logits(model, ids)
    assert unfuse_experts(model) == 2
    assert _rel(_logits(model, ids), ref) <= 1e-5
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, UnfusedSparseMoe) and isinstance(mlp.gate, nn.Linear)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {f"model.layers.1.mlp.experts.{e}.{p}_proj" for e in range(N_EXPERTS) for p in ("gate", "up", "down")} <= names
    # every expert on every token changes no output: only the routed tokens' results are added
    set_calibrate_all_experts(model, True)
    assert _rel(_logits(model, ids), ref) <= 1e-5


@pytest.mark.parametrize("family,fused", [("mixtral", False), ("mixtral", True), ("qwen2_moe", False),
                                          ("qwen3_moe", True)])
def test_every_stored_layout_reads_back_under_qflow_names(tmp_path, family, fused):
    """Mixtral's w1/w3/w2, Qwen's per-expert names and transformers 5's fused 3-D tensors all give
    the same per-expert weights, by name (RTN, HQQ) and block by block (the lazy loader)."""
    from qflow.models.lazy import block_loader, load_model_lazy
    from qflow.quant.weights import iter_linear_weights, linear_names, weight_files

    model = tiny_moe(family, fused=True)
    model.save_pretrained(tmp_path, save_original_format=not fused)
    stored = list(weight_files(tmp_path))
    if fused:
        assert "model.layers.0.mlp.experts.gate_up_proj" in stored
    elif family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in stored
    unfused = tiny_moe(family)
    state = unfused.state_dict()
    names = linear_names(tmp_path)
    assert len(names) == 2 * (_n_linears(family) + 1 + (family == "qwen2_moe"))   # + routers
    for name, w in iter_linear_weights(tmp_path, names):
        assert torch.equal(w, state[name + ".weight"]), name
    net, adapter = load_model_lazy(tmp_path, dtype="float32", attn_implementation="eager")
    loader = block_loader(net)
    for i in range(adapter.n_blocks()):
        loader.load(i)
    ids = calib_ids(2, 16, vocab=VOCAB)
    assert _rel(_logits(net, ids), _logits(unfused, ids)) <= 1e-6


def test_fused_model_is_refused_by_the_adapter_with_the_fix():
    from qflow.errors import StageError

    with pytest.raises(StageError, match="fused 3-D parameters.*unfuse_experts"):
        get_adapter(tiny_moe("mixtral", fused=True))


@pytest.mark.parametrize("quantize_router", [False, True])
def test_routers_stay_float_unless_the_stage_quantizes_them(tmp_path, quantize_router):
    from types import SimpleNamespace

    from qflow.quant.layerspec import stage_layer_specs
    from stages.quantize_rtn import RTNConfig

    tiny_moe("qwen2_moe", fused=True).save_pretrained(tmp_path)
    cfg = RTNConfig(bits=4, group_size=32, moe_quantize_router=quantize_router)
    specs = stage_layer_specs(cfg, SimpleNamespace(base_model_dir=tmp_path), None)
    routers = ["model.layers.0.mlp.gate", "model.layers.1.mlp.shared_expert_gate"]
    assert all((specs.spec_for(n) is not None) == quantize_router for n in routers)
    assert specs.spec_for("model.layers.1.mlp.experts.3.down_proj") is not None


def test_preflight_sees_the_experts_widths_and_weights():
    """Group-size check and memory estimate from config.json count the experts (no model build)."""
    from qflow.models.adapters import check_group_size
    from qflow.models.memory import calibrated_stage_bytes, model_params

    config = tiny_moe("qwen2_moe").config.to_dict()
    assert any("[32]" in p for p in check_group_size(config, 64))   # moe_intermediate_size 32
    dense = {k: v for k, v in config.items() if k not in ("num_experts", "moe_intermediate_size")}
    assert model_params(config) > model_params(dense)
    assert calibrated_stage_bytes(config, n_samples=4, seq_len=16, hessians=True) > \
        calibrated_stage_bytes(dense, n_samples=4, seq_len=16, hessians=True)


# ---- adapter and exact folds ---------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_sites_groups_and_inputs(family):
    model = tiny_moe(family)
    adapter = get_adapter(model)
    block = adapter.blocks()[0]
    shared = ["up_down.shared"] if family == "qwen2_moe" else []
    assert [s.name for s in adapter.awq_sites(block)] == (["attn_in", "mlp_in"] + shared
                                                          + [f"up_down.{e}" for e in range(N_EXPERTS)])
    mlp_in = adapter.awq_sites(block)[1]
    assert mlp_in.prev == "post_attention_layernorm" and mlp_in.loss_module == "mlp" and "mlp.gate" in mlp_in.linears
    groups = adapter.sequential_groups(block)
    assert sorted(n for g in groups for n in g) == sorted(adapter.linear_names(block))
    assert adapter.routed("mlp.experts.2.down_proj") and not adapter.routed("mlp.gate")
    assert adapter.canonical_input("mlp.experts.2.up_proj") == "mlp.experts.2.gate_proj"
    set_calibrate_all_experts(model, True)   # every expert reads the router's input: one statistic for all
    assert adapter.canonical_input("mlp.experts.2.up_proj") == "mlp.gate"


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_and_smoothquant_folds_leave_logits_unchanged(family):
    """Random scales at every AWQ site, then SmoothQuant's folds: logits move <= 1e-4 relative (the
    router's columns are scaled with the experts', so the routing is unchanged)."""
    from qflow.quant.algos.smoothquant_model import collect_act_max, smooth_block

    model = tiny_moe(family)
    ids = calib_ids(2, 24, vocab=VOCAB)
    ref = _logits(model, ids)
    adapter = get_adapter(model)
    fold_random_scales(adapter)
    assert _rel(_logits(model, ids), ref) <= 1e-4
    names = [f"{adapter.block_name(i)}.{s.linears[0]}" for i, b in enumerate(adapter.blocks())
             for s in adapter.smooth_sites(b)]
    act_max = collect_act_max(model, adapter, ids, names=names)
    for i, block in enumerate(adapter.blocks()):
        smooth_block(block, adapter.block_name(i), adapter, act_max, alpha=0.5)
    assert _rel(_logits(model, ids), ref) <= 1e-4


# ---- per-expert calibration ----------------------------------------------------------------------

def _quantize(tmp_path, model, method, ids, **kw):
    ctx = make_ctx(tmp_path)
    adapter = get_adapter(model)
    if method == "awq":
        res = quantize_model_awq(ctx, model, adapter, ids, AWQOptions(bits=4, group_size=32, n_grid=3, **kw),
                                 base_model="tiny", batch_size=4)
    else:
        res = quantize_model_gptq(ctx, model, adapter, ids, GPTQOptions(bits=4, group_size=32, **kw),
                                  base_model="tiny", batch_size=4)
    return Checkpoint(res.checkpoint_dir), json.loads((tmp_path / "scratch" / "moe_tokens.json").read_text())


@pytest.mark.parametrize("family,method", [("mixtral", "awq"), ("qwen2_moe", "gptq"),
                                           pytest.param("mixtral", "gptq", marks=pytest.mark.slow),
                                           pytest.param("qwen2_moe", "awq", marks=pytest.mark.slow),
                                           pytest.param("qwen3_moe", "gptq", marks=pytest.mark.slow)])
def test_methods_calibrate_each_expert_on_its_tokens(tmp_path, family, method):
    fp = tiny_moe(family, seed=5)
    ids = calib_ids(4, 16, vocab=VOCAB)
    ckpt, report = _quantize(tmp_path / "routed", copy.deepcopy(fp), method, ids)
    assert len(ckpt.layers) == 2 * _n_linears(family)
    assert not any(n.endswith("mlp.gate") or n.endswith("shared_expert_gate") for n in ckpt.layers)   # routers float
    quant = apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant")
    err = _rel(_logits(quant, ids), _logits(fp, ids))
    assert 0 < err < 0.5, err
    if method == "awq":   # evaluation's per-layer report: experts get the isolated error only
        from qflow.evaluation.layers import layer_report

        rows = {r["layer"]: r for r in layer_report(fp, quant, ckpt, ids[:2])}
        expert = rows["model.layers.1.mlp.experts.0.up_proj"]
        assert expert["isolated_sqnr_db"] > 0 and expert["accumulated_sqnr_db"] != expert["accumulated_sqnr_db"]
        assert rows["model.layers.1.self_attn.o_proj"]["accumulated_sqnr_db"] > 0
    n_tokens = ids.numel()
    for name, counts in report["blocks"].items():
        assert sum(counts["routed"]) == 2 * n_tokens, name   # top-2: every token reaches two experts
        assert counts["calibration"] == counts["routed"]
    assert report["metrics"]["moe_expert_tokens_min"] == min(min(c["routed"]) for c in report["blocks"].values())
    if method == "awq":   # the routers' columns took the mlp_in fold: stored as float deltas
        assert "model.layers.0.mlp.gate.weight" in ckpt.floats

    work = copy.deepcopy(fp)
    set_calibrate_all_experts(work, True)
    ckpt_all, report_all = _quantize(tmp_path / "all", work, method, ids)
    for name, counts in report_all["blocks"].items():
        assert counts["calibration"] == [n_tokens] * N_EXPERTS
        assert sum(counts["routed"]) == 2 * n_tokens
    expert = "model.layers.0.mlp.experts.0.down_proj"
    assert not torch.equal(ckpt.dequantized(expert), ckpt_all.dequantized(expert))   # other statistics


def _without_expert_3(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose routers never choose expert 3."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        route = layer.mlp.route
        layer.mlp.route = lambda logits, route=route: route(logits.index_fill(1, torch.tensor([3]), float("-inf")))
    return model


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_an_expert_without_tokens_falls_back_to_rtn_with_a_warning(tmp_path, method, caplog):
    """Expert 3 is never routed to: it is rounded to nearest (no scale, no Hessian), named in a warning
    and counted in moe_experts_without_tokens; with the all-experts option it is calibrated."""
    from qflow.quant import dispatch

    fp = tiny_moe("mixtral", seed=5)
    ids = calib_ids(4, 16, vocab=VOCAB)
    with caplog.at_level(logging.WARNING):
        ckpt, report = _quantize(tmp_path / "routed", _without_expert_3(fp), method, ids)
    assert report["metrics"]["moe_experts_without_tokens"] == 2
    assert "model.layers.0.mlp.experts.3.gate_proj" in report["rtn_fallback"]
    assert "saw no calibration token" in caplog.text and "moe_calibrate_all_experts" in caplog.text
    name = "model.layers.1.mlp.experts.3.down_proj"
    spec = ckpt.layers[name].spec
    w = fp.get_submodule(name).weight.data.float()
    scale, zero = dispatch.compute_params(w, spec)
    assert torch.equal(ckpt.dequantized(name), dispatch.dequantize(dispatch.quantize(w, scale, zero, spec), scale,
                                                                    zero, spec))
    work = _without_expert_3(fp)
    set_calibrate_all_experts(work, True)
    _, report_all = _quantize(tmp_path / "all", work, method, ids)
    assert report_all["metrics"]["moe_experts_without_tokens"] == 0 and not report_all["rtn_fallback"]


# ---- the CLI, per family (slow) ------------------------------------------------------------------

def moe_recipe(model_dir: str) -> str:
    evaluate = '{data: "${data.eval}", n_windows: 2, topk: 16, speed: false, layer_report: false}'
    return f"""
name: moe
model: {{source: "{model_dir}"}}
data:
  calib: {{source: "zoo:wiki-pages", seq_len: 64}}
  eval: {{source: "zoo:lee-news", seq_len: 64}}
stages:
  calibrate: {{uses: calibrate, with: {{data: "${{data.calib}}", n_samples: 4}}}}
  rtn: {{uses: quantize.rtn, with: {{bits: 4, group_size: 32}}}}
  hqq: {{uses: quantize.hqq, with: {{bits: 4, group_size: 32}}}}
  awq: {{uses: quantize.awq, needs: [calibrate], with: {{bits: 4, group_size: 32, n_grid: 4}}}}
  gptq: {{uses: quantize.gptq, needs: [calibrate], with: {{bits: 4, group_size: 32}}}}
  gptq_all: {{uses: quantize.gptq, needs: [calibrate], with: {{bits: 4, group_size: 32,
                                                              moe_calibrate_all_experts: true}}}}
  sq: {{uses: quantize.smoothquant, needs: [calibrate]}}
  eval_rtn: {{uses: evaluate.lm, needs: [rtn], with: {evaluate}}}
  eval_hqq: {{uses: evaluate.lm, needs: [hqq], with: {evaluate}}}
  eval_awq: {{uses: evaluate.lm, needs: [awq], with: {evaluate}}}
  eval_gptq: {{uses: evaluate.lm, needs: [gptq], with: {evaluate}}}
  eval_sq: {{uses: evaluate.lm, needs: [sq], with: {evaluate}}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_every_method_and_evaluation_per_moe_family(tmp_path, runs_dir, bundled_tokenizer_dir, family):
    from transformers import AutoTokenizer

    from .conftest import parse_json_stdout, run_cli, write_recipe

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir, local_files_only=True)
    model_dir = tmp_path / "model"
    tiny_moe(family, vocab=len(tok), fused=True).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    recipe = write_recipe(tmp_path / "recipes", moe_recipe(str(model_dir)))
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    out = parse_json_stdout(done)
    assert {s["status"] for s in out["stages"].values()} == {"ran"}
    m = out["metrics"]
    for ev in ("eval_rtn", "eval_hqq", "eval_awq", "eval_gptq", "eval_sq"):
        assert m[f"{ev}/ppl"] > 1 and 0 < m[f"{ev}/kl_mean"] < 1, (ev, m)
    assert m["gptq/moe_expert_tokens_min"] < m["gptq_all/moe_expert_tokens_min"] == 4 * 64
    # compressed-tensors writes every expert; the round trip reloads it (tests/test_moe_export.py); the
    # AWQ GEMM layout refuses the family before writing anything
    export = recipe.read_text() + ("  export: {uses: export.safetensors, needs: [gptq],\n"
                                   "           with: {verify_data: \"${data.eval}\", verify_windows: 2}}\n")
    done = run_cli("run", str(write_recipe(tmp_path / "recipes", export, "export.yaml")), "--json", runs_dir=runs_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    m = parse_json_stdout(done)["metrics"]
    assert m["export/roundtrip_max_abs_diff"] < 1e-4 and m["export/roundtrip_top1_agree"] == 1, m
    # GGUF as llama.cpp writes the family (llama / qwen2moe / qwen3moe): every expert exact, and the stage's
    # round trip through qflow's GGUF import gives qflow's model
    gguf = recipe.read_text() + ("  gguf: {uses: export.gguf, needs: [gptq],\n"
                                 "         with: {verify_data: \"${data.eval}\", verify_windows: 2}}\n")
    done = run_cli("run", str(write_recipe(tmp_path / "recipes", gguf, "gguf.yaml")), "--json", runs_dir=runs_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    m = parse_json_stdout(done)["metrics"]
    assert m["gguf/n_requantized_tensors"] == 0 and m["gguf/roundtrip_max_abs_diff"] == 0, m
    assert m["gguf/roundtrip_top1_agree"] == 1 and m["gguf/roundtrip_kl"] < 1e-6, m
    refused = recipe.read_text() + "  export: {uses: export.safetensors, needs: [gptq], with: {layout: awq-gemm}}\n"
    done = run_cli("run", str(write_recipe(tmp_path / "recipes", refused, "refused.yaml")), runs_dir=runs_dir)
    assert done.returncode == 2 and "mixture-of-experts" in done.stderr and "Traceback" not in done.stderr
