"""GPTQ / SmoothQuant / HQQ model passes and the four quantize stages on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qflow.artifacts import CalibSet, ModelRef, QuantizedCheckpoint
from qflow.quant import dispatch
from qflow.models.adapters import get_adapter
from qflow.quant.algos.gptq_model import GPTQOptions, quantize_model_gptq
from qflow.quant.algos.hqq_model import HQQOptions, quantize_model_hqq
from qflow.quant.algos.smoothquant_model import (SmoothQuantOptions, collect_act_max, quantize_model_smoothquant,
                                                 smooth_block)
from qflow.models.quantized import apply_checkpoint
from qflow.quant.ir import Checkpoint
from qflow.quant.qlinear import QLinear

from .conftest import REPO, run_cli, write_recipe
from .test_blockwise import calib_ids, make_ctx, tiny_llama


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- SmoothQuant -------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_alone_keeps_float_logits(alpha):
    model = tiny_llama(layers=2)
    adapter = get_adapter(model)
    ids = calib_ids(6, 32)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        act_max = collect_act_max(model, adapter, ids, batch_size=4)
        norms = []
        for i, block in enumerate(adapter.blocks()):
            norms += smooth_block(block, adapter.block_name(i), adapter, act_max, alpha)
        out = model(input_ids=ids).logits
    assert len(norms) == 4  # input + post-attention norm of each block
    assert _rel(out, ref) <= 1e-4


def test_smoothing_flattens_activation_outliers():
    model = tiny_llama(layers=1)
    adapter = get_adapter(model)
    ids = calib_ids(6, 32)
    with torch.no_grad():
        before = collect_act_max(model, adapter, ids)["model.layers.0.self_attn.q_proj"]
        smooth_block(model.model.layers[0], "model.layers.0", adapter, {"model.layers.0.self_attn.q_proj": before,
                                                                         "model.layers.0.mlp.gate_proj":
                                                                         collect_act_max(model, adapter, ids)[
                                                                             "model.layers.0.mlp.gate_proj"]}, 0.5)
        after = collect_act_max(model, adapter, ids)["model.layers.0.self_attn.q_proj"]
    assert float(after.max() / after.median()) < float(before.max() / before.median())


def test_smoothquant_w8a8_checkpoint_quantizes_activations(tmp_path):
    fp = tiny_llama(layers=2)
    ids = calib_ids(6, 32)
    work = tiny_llama(layers=2)
    adapter = get_adapter(work)
    act_max = collect_act_max(work, adapter, ids)
    res = quantize_model_smoothquant(make_ctx(tmp_path), work, adapter, act_max, SmoothQuantOptions(alpha=0.5),
                                     base_model="tiny")
    ckpt = Checkpoint(res.checkpoint_dir)
    assert len(ckpt.layers) == 14  # o_proj / down_proj quantized too (unsmoothed)
    spec = next(iter(ckpt.layers.values())).spec
    assert (spec.bits, spec.group_size, spec.scheme, spec.act_bits, spec.act_granularity) == (8, -1, "sym_r", 8, "token")
    assert sorted(ckpt.floats) == sorted(f"model.layers.{i}.{n}.weight" for i in range(2)
                                         for n in ("input_layernorm", "post_attention_layernorm"))
    q = apply_checkpoint(tiny_llama(layers=2), ckpt, mode="qlinear")
    assert isinstance(q.model.layers[0].self_attn.o_proj, QLinear)
    with torch.no_grad():
        ref = fp(input_ids=ids).logits
        out = q(input_ids=ids).logits
        for mod in q.modules():  # same weights, activations left float: the W8 part only
            if isinstance(mod, QLinear):
                mod.spec = mod.spec.model_copy(update={"act_bits": None})
        w_only = q(input_ids=ids).logits
    assert _rel(out, ref) < 0.05
    assert not torch.equal(out, w_only)  # the activation quantization is really applied
    assert _rel(w_only, ref) < _rel(out, ref)


# ---- GPTQ over the model -----------------------------------------------------------

def test_gptq_model_beats_rtn_on_layer_reconstruction(tmp_path):
    fp = tiny_llama(layers=2, seed=7)
    ids = calib_ids(16, 64, seed=4)
    opts = GPTQOptions(bits=3, group_size=32, symmetric=False)
    work = tiny_llama(layers=2, seed=7)
    res = quantize_model_gptq(make_ctx(tmp_path), work, get_adapter(work), ids, opts, base_model="tiny")
    ckpt = Checkpoint(res.checkpoint_dir)
    assert len(ckpt.layers) == 14 and ckpt.method == "gptq"
    # isolated reconstruction error on the FP model's own inputs
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in fp.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    with torch.no_grad():
        fp(input_ids=ids)
    for h in hooks:
        h.remove()
    spec = opts.spec()
    total_g = total_r = 0.0
    for name in ckpt.layers:
        w = fp.get_submodule(name).weight.data
        x = inputs[name]
        err_g = float((x @ (ckpt.dequantized(name) - w).T).pow(2).sum())
        err_r = float((x @ (dispatch.fake_quant(w, spec) - w).T).pow(2).sum())
        total_g, total_r = total_g + err_g, total_r + err_r
        if name.startswith("model.layers.0.self_attn.") and name[-6:] in ("q_proj", "k_proj", "v_proj"):
            assert err_g < 0.8 * err_r, name  # same inputs as GPTQ saw: a clear win
    assert total_g < 0.8 * total_r


def test_gptq_act_order_without_static_groups_stores_g_idx(tmp_path):
    work = tiny_llama(layers=1)
    res = quantize_model_gptq(make_ctx(tmp_path), work, get_adapter(work), calib_ids(8, 32),
                              GPTQOptions(bits=4, group_size=32, static_groups=False, true_sequential=False),
                              base_model="tiny")
    ckpt = Checkpoint(res.checkpoint_dir)
    assert any(rec.g_idx for rec in ckpt.layers.values())
    # the IR dequantizes to the weights the block was propagated with
    for name in ckpt.layers:
        assert torch.equal(ckpt.dequantized(name), work.get_submodule(name).weight.data)


# ---- HQQ ----------------------------------------------------------------------------

def test_hqq_model_lowers_error_and_stores_float_zeros(tmp_path):
    model = tiny_llama(layers=2)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    from qflow.quant.weights import linear_names

    names = linear_names(folder)
    res = quantize_model_hqq(make_ctx(tmp_path), folder, HQQOptions(bits=4, group_size=32), names)
    ckpt = Checkpoint(res.checkpoint_dir)
    assert sorted(ckpt.layers) == sorted(names)
    rec = next(iter(ckpt.layers.values()))
    assert rec.spec.zero_float and rec.spec.scheme == "asym_h"
    assert ckpt.layer_tensors(names[0])["zeros"].dtype == torch.float16
    assert all(r["err_final"] < r["err_minmax"] for r in res.records)


# ---- the stages (glue: inputs, config checks, outputs) ---------------------------------

@pytest.fixture()
def tiny_calib(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    ids = calib_ids(8, 32, vocab=200)
    torch.save(ids, folder / "ids.pt")
    (folder / "info.json").write_text(json.dumps({"fingerprint": "f", "source": "test", "n_samples": 8, "seq_len": 32}))
    return CalibSet(folder, fingerprint="f")


def _stage(name):
    from qflow import registry

    cls = registry.get(name)
    assert cls is not None, registry.discover().broken
    return cls


@pytest.mark.parametrize("stage,cfg", [
    ("quantize.awq", {"bits": 4, "group_size": 32, "n_grid": 4, "n_search_tokens": 64}),
    ("quantize.gptq", {"bits": 4, "group_size": 32, "symmetric": False}),
    ("quantize.smoothquant", {"alpha": 0.5}),
    ("quantize.hqq", {"bits": 4, "group_size": 32}),
])
def test_stage_runs_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_calib, stage, cfg):
    cls = _stage(stage)
    config = cls.Config(**cfg)
    assert "uses: " + stage in cls.Config.__doc__ and "uses: " + stage in cls.doc()
    model = ModelRef(tiny_model_dir)
    inputs = {"model": model} | ({"calib": tiny_calib} if "calib" in cls.inputs else {})
    assert cls().check(config, inputs) == []
    ctx = make_ctx(tmp_path / "run")
    out = cls().run(ctx, config, **inputs)["model"]
    assert isinstance(out, QuantizedCheckpoint) and out.base_model_dir == tiny_model_dir and out.ir_dir == out.path
    ckpt = Checkpoint(out.path)
    assert len(ckpt.layers) == 14 and ctx.info["peak_rss_bytes"] > 0


def test_model_folders_are_named_for_what_they_hold(tmp_path):
    """``base_model_dir`` is the float folder to load, for a float model and for a checkpoint over one;
    a checkpoint's own folder is ``ir_dir`` (the old ``model_dir`` of a checkpoint named the base)."""
    float_model = ModelRef(tmp_path / "hf", subdir="snapshot")
    assert float_model.base_model_dir == tmp_path / "hf" / "snapshot"
    ckpt = QuantizedCheckpoint(tmp_path / "ir", base_model=str(tmp_path / "hf"), method="rtn")
    assert ckpt.base_model_dir == tmp_path / "hf" and ckpt.ir_dir == tmp_path / "ir"
    assert not hasattr(ckpt, "model_dir") and not hasattr(float_model, "model_dir")


def test_stage_check_flags_group_size(tiny_model_dir):
    for name in ("quantize.awq", "quantize.gptq", "quantize.hqq"):
        cls = _stage(name)
        problems = cls().check(cls.Config(group_size=128), {"model": ModelRef(tiny_model_dir)})
        assert problems and "does not divide" in problems[0]


def test_stage_configs_cross_checks():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="only apply with then: gptq"):
        _stage("quantize.awq").Config(gptq_act_order=False)
    _stage("quantize.awq").Config(then="gptq", gptq_act_order=False)
    with pytest.raises(ValidationError, match="evaluates no clip factor"):
        _stage("quantize.awq").Config(max_shrink=0.01)
    with pytest.raises(ValidationError, match="bits"):
        _stage("quantize.gptq").Config(bits=7)
    with pytest.raises(ValidationError, match="alpha has no effect"):
        _stage("quantize.smoothquant").Config(smooth=False, alpha=0.8)


def test_rtn_says_its_grid_with_scheme_alone():
    from pydantic import ValidationError

    from qflow.quant.spec import QuantSpec

    config = _stage("quantize.rtn").Config
    assert "symmetric" not in config.model_fields
    assert config().spec() == QuantSpec(bits=4, group_size=128, scheme="asym_z")
    assert config(scheme="sym_f").spec() == QuantSpec(bits=4, group_size=128, symmetric=True)
    assert config(format="nf4", group_size=64).spec().scheme is None
    with pytest.raises(ValidationError, match="scheme applies to format: int only"):
        config(format="nf4", group_size=64, scheme="sym_f")  # was silently ignored


def test_awq_clip_and_scale_search_token_counts_are_named_apart():
    config = _stage("quantize.awq").Config(n_clip_tokens=256, n_search_tokens=1024)
    options = config.options()
    assert (options.n_clip_tokens, options.n_search_tokens) == (256, 1024)


def test_bundled_rtn_recipe_takes_a_scheme(tmp_path):
    from qflow.engine.runner import RunOptions, load_plan

    plan = load_plan(str(REPO / "recipes/llama-rtn.yaml"), ["params.scheme=sym_f"],
                     RunOptions(runs_root=tmp_path / "runs"))
    assert plan.stages["quantize"].config.spec().scheme == "sym_f"


RENAMED_KEYS = [
    ("quantize.rtn", "symmetric", "true", "write scheme: sym_f for symmetric: true"),
    ("quantize.awq", "n_sample_token", "256", "write n_clip_tokens (the clip search's token sample"),
]


def _recipe_with(folder, uses: str, key: str, value: str):
    return write_recipe(folder, f"""
name: renamed
model: {{source: "zoo:smollm2-135m"}}
stages:
  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: 64}}, n_samples: 2}}}}
  quantize: {{uses: {uses}, needs: [calibrate], with: {{bits: 4, group_size: 32, {key}: {value}}}}}
""")


@pytest.mark.parametrize("uses, key, value, fix", RENAMED_KEYS)
def test_a_renamed_key_points_to_its_replacement(tmp_path, uses, key, value, fix):
    from qflow.engine.runner import RunOptions, load_plan
    from qflow.errors import RecipeError

    recipe = _recipe_with(tmp_path, uses, key, value)
    with pytest.raises(RecipeError) as info:
        load_plan(str(recipe), [], RunOptions(runs_root=tmp_path / "runs"))
    message = str(info.value)
    assert message.startswith(str(recipe)) and "\n" not in message
    assert f"stages.quantize.with.{key}: '{key}' was replaced by" in message and f"Fix: {fix}" in message


def test_a_renamed_key_is_one_paragraph_from_the_cli(tmp_path, runs_dir):
    recipe = _recipe_with(tmp_path, "quantize.rtn", "symmetric", "false")
    done = run_cli("run", str(recipe), "--dry-run", runs_dir=runs_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "stages.quantize.with.symmetric: 'symmetric' was replaced by 'scheme'" in done.stderr
    assert "scheme: asym_z (the default) for symmetric: false" in done.stderr


def test_stage_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import stages.quantize_awq, stages.quantize_gptq, stages.quantize_hqq, "
            "stages.quantize_rtn, stages.quantize_smoothquant; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
