"""Mixture-of-experts checkpoints through RTN / HQQ and out through the exporters (docs/METHODS.md §4.2).

Tiny random Mixtral / Qwen2-MoE / Qwen3-MoE folders (2 layers, hidden 64, 4 experts, top-2):
the RTN and HQQ stages quantize every expert and leave the routers float; export.safetensors'
compressed-tensors layout writes one tensor set per expert under the family's checkpoint names,
and transformers (which re-fuses the experts into its 3-D tensors while loading) and qflow's
own reader give the logits of qflow's dequantized model.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from qflow.artifacts import ModelRef
from qflow.models.quantized import apply_checkpoint
from qflow.quant.ir import Checkpoint

from .test_blockwise import calib_ids, make_ctx
from .test_moe import FAMILIES, N_EXPERTS, VOCAB, _logits, _n_linears, _rel, tiny_moe


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("QFLOW_KERNEL_BACKEND", "torch")


def _folder(tmp_path, family, *, fused_files: bool = False):
    """A saved tiny MoE model with a character-level BPE tokenizer of its vocabulary, and the same model unfused."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model = tiny_moe(family, seed=4, fused=True)
    model.save_pretrained(tmp_path / "base", save_original_format=not fused_files)
    byte_chars = bytes_to_unicode()   # GPT-2's byte-level alphabet: the first VOCAB - 1 bytes and one merge
    vocab = {byte_chars[b]: b for b in range(VOCAB - 1)} | {byte_chars[33] + byte_chars[34]: VOCAB - 1}
    tok = Tokenizer(BPE(vocab, [(byte_chars[33], byte_chars[34])]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "base")
    return tmp_path / "base", tiny_moe(family, seed=4)


def _run(tmp_path, stage_name: str, base, **config):
    from stages.quantize_hqq import HQQ
    from stages.quantize_rtn import RTN

    stage = {"rtn": RTN, "hqq": HQQ}[stage_name]()
    out = stage.run(make_ctx(tmp_path / stage_name), stage.Config(bits=4, group_size=32, **config),
                    model=ModelRef(base))
    return Checkpoint(out["model"].path)


def _load_transformers(folder):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


# ---- HQQ (and RTN, below) quantize every expert -------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["hqq"])
def test_hqq_quantizes_every_expert_and_leaves_routers_float(tmp_path, family, method):
    base, fp = _folder(tmp_path, family)
    ckpt = _run(tmp_path, method, base)
    assert len(ckpt.layers) == 2 * _n_linears(family)
    assert all(f"model.layers.1.mlp.experts.{e}.down_proj" in ckpt.layers for e in range(N_EXPERTS))
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in ckpt.layers)
    ids = calib_ids(2, 16, vocab=VOCAB)
    err = _rel(_logits(apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant"), ids), _logits(fp, ids))
    assert 0 < err < 0.5, (family, method, err)


# AWQ / GPTQ combinations tests/test_moe.py runs only under -m slow (it runs each twice: routed and all
# experts); here once, so every method meets every MoE family in the fast suite
@pytest.mark.parametrize("family,method", [("mixtral", "gptq"), ("qwen2_moe", "awq"), ("qwen3_moe", "awq"),
                                           ("qwen3_moe", "gptq")])
def test_calibrated_methods_produce_an_ir_per_moe_family(tmp_path, family, method):
    from .conftest import quantize_calibrated

    fp = tiny_moe(family, seed=5)
    ids = calib_ids(4, 16, vocab=VOCAB)
    res = quantize_calibrated(make_ctx(tmp_path), copy.deepcopy(fp), ids, method, n_grid=3)
    ckpt = Checkpoint(res.checkpoint_dir)
    assert len(ckpt.layers) == 2 * _n_linears(family)
    err = _rel(_logits(apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant"), ids), _logits(fp, ids))
    assert 0 < err < 0.5, (family, method, err)


# ---- compressed-tensors export -------------------------------------------------------------------

EXPORT_CASES = [("mixtral", False), ("qwen2_moe", False), ("qwen3_moe", False), ("qwen3_moe", True)]


@pytest.mark.parametrize("family,fused_files", EXPORT_CASES,
                         ids=[f + ("-fused-files" if f2 else "") for f, f2 in EXPORT_CASES])
def test_compressed_tensors_export_loads_in_transformers_with_qflows_logits(tmp_path, family, fused_files):
    """Per-expert packed tensors under the family's names; transformers loads them into its fused experts:
    each expert's weight equals qflow's dequantized one and the logits match qflow's model. Symmetric
    weights: transformers 5.24 decompresses experts without zero points (asymmetric: next test)."""
    from safetensors import safe_open

    from qflow.export.readers import load_exported_model
    from qflow.export.safetensors_ct import export_hf_folder

    base, fp = _folder(tmp_path, family, fused_files=fused_files)
    ckpt = _run(tmp_path, "rtn", base, scheme="sym_f")
    assert len(ckpt.layers) == 2 * _n_linears(family)   # every expert; routers float
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in ckpt.layers)
    report = export_hf_folder(ckpt, tmp_path / "export")
    assert report["n_exact"] == len(ckpt.layers) and report["n_float"] == 0
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as h:
        keys = set(h.keys())
    expert = ("model.layers.1.block_sparse_moe.experts.3.w2" if family == "mixtral"
              else "model.layers.1.mlp.experts.3.down_proj")
    assert {f"{expert}.weight_packed", f"{expert}.weight_scale"} <= keys
    router = "model.layers.0.block_sparse_moe.gate" if family == "mixtral" else "model.layers.0.mlp.gate"
    assert f"{router}.weight" in keys and router in report["quantization_config"]["ignore"]
    assert not any("gate_up_proj" in k for k in keys)

    ids = calib_ids(2, 16, vocab=VOCAB)
    ref = _logits(apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant"), ids)
    loaded = _load_transformers(tmp_path / "export")
    experts = loaded.model.layers[1].mlp.experts
    assert experts.down_proj.dim() == 3   # re-fused by transformers' conversion mapping
    for e in range(N_EXPERTS):
        assert torch.equal(experts.down_proj[e], ckpt.dequantized(f"model.layers.1.mlp.experts.{e}.down_proj").float())
        gate_up = torch.cat([ckpt.dequantized(f"model.layers.1.mlp.experts.{e}.{p}_proj").float()
                             for p in ("gate", "up")])
        assert torch.equal(experts.gate_up_proj[e], gate_up)
    assert _rel(_logits(loaded, ids), ref) <= 1e-5
    own, _ = load_exported_model(tmp_path / "export")
    assert _rel(_logits(own, ids), ref) <= 1e-5


def test_asymmetric_experts_read_back_by_the_compressed_tensors_library(tmp_path):
    """transformers 5.24 passes no zero points to its expert decompression, so an asymmetric export is
    read by compressed-tensors' own compressors (the stage's reader falls back and says so)."""
    from qflow.export.readers import load_with_compressed_tensors
    from qflow.export.safetensors_ct import export_hf_folder

    base, fp = _folder(tmp_path, "qwen2_moe")
    ckpt = _run(tmp_path, "rtn", base)   # asym_z
    export_hf_folder(ckpt, tmp_path / "export")
    model, _, how = load_with_compressed_tensors(tmp_path / "export")
    assert how.startswith("compressed-tensors compressors"), how
    ids = calib_ids(2, 16, vocab=VOCAB)
    ref = _logits(apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant"), ids)
    assert _rel(_logits(model, ids), ref) <= 1e-5


def test_quantized_routers_are_written_as_their_dequantized_float_weight(tmp_path):
    """moe_quantize_router: no loader builds a quantized router, so the export writes the IR's dequantized
    router as float, names it in the notes, and transformers still gives qflow's logits."""
    from qflow.export.safetensors_ct import export_hf_folder
    from stages.quantize_rtn import RTN

    base, fp = _folder(tmp_path, "mixtral")
    out = RTN().run(make_ctx(tmp_path / "rtn"), RTN.Config(bits=4, group_size=32, scheme="sym_f",
                                                            moe_quantize_router=True), model=ModelRef(base))
    ckpt = Checkpoint(out["model"].path)
    assert "model.layers.0.mlp.gate" in ckpt.layers
    report = export_hf_folder(ckpt, tmp_path / "export")
    assert report["n_float"] == 2 and report["layers"]["model.layers.0.mlp.gate"]["status"] == "float"
    assert any("MoE routers load as float" in n for n in report["notes"])
    ids = calib_ids(2, 16, vocab=VOCAB)
    ref = _logits(apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant"), ids)
    assert _rel(_logits(_load_transformers(tmp_path / "export"), ids), ref) <= 1e-5


def test_other_layouts_and_formats_refuse_moe_before_writing(tmp_path):
    from qflow.artifacts import QuantizedCheckpoint
    from stages.export_gguf import ExportGGUF
    from stages.export_onnx import ExportOnnx
    from stages.export_safetensors import ExportSafetensors

    base, _ = _folder(tmp_path, "qwen2_moe")
    ckpt = _run(tmp_path, "rtn", base)
    ref = {"model": QuantizedCheckpoint(ckpt.path, base_model=str(base), method="rtn")}
    stage = ExportSafetensors()
    assert stage.check(ExportSafetensors.Config(), ref) == []
    for layout in ("awq-gemm", "gptq"):
        problems = stage.check(ExportSafetensors.Config(layout=layout), ref)
        assert any(f"layout {layout} does not write mixture-of-experts" in p and "compressed-tensors" in p
                   for p in problems), problems
    assert ExportGGUF().check(ExportGGUF.Config(path=str(tmp_path / "out" / "m.gguf")), ref) == []
    problems = ExportOnnx().check(ExportOnnx.Config(), ref)
    assert any("export.onnx does not write 'qwen2_moe' mixture-of-experts" in p and "layout: compressed-tensors" in p
               and "export.gguf" in p and "qwen3_moe" in p for p in problems), problems
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_onnx_refuses_moe_before_writing_anything(tmp_path, quantized):
    """export.onnx has no per-expert graph: a float or quantized MoE model is refused by the stage's check and,
    should the check have met the input before it existed, by run() before its output folder is made; the
    message names the family and the formats that do carry MoE."""
    from qflow.artifacts import QuantizedCheckpoint
    from qflow.errors import StageError
    from stages.export_onnx import ExportOnnx

    base, _ = _folder(tmp_path, "qwen3_moe")
    if quantized:
        ckpt = _run(tmp_path, "rtn", base)
        model = QuantizedCheckpoint(ckpt.path, base_model=str(base), method="rtn")
    else:
        model = ModelRef(base)
    stage = ExportOnnx()
    expected = ("export.onnx does not write 'qwen3_moe' mixture-of-experts checkpoints.*layout: compressed-tensors"
                ".*export.gguf \\(llama.cpp's layout, for mixtral, qwen2_moe, qwen3_moe\\)")
    problems = stage.check(ExportOnnx.Config(), {"model": model})
    assert len(problems) == 1 and re.search(expected, problems[0]), problems
    ctx = make_ctx(tmp_path / "onnx")
    with pytest.raises(StageError, match=expected):
        stage.run(ctx, ExportOnnx.Config(), model=model)
    assert not (tmp_path / "onnx").exists()


# ---- GGUF (Mixtral: llama.cpp's llama architecture with ffn_*_exps; Qwen2-MoE / Qwen3-MoE: qwen2moe / qwen3moe) --

GGUF_CASES = [("mixtral", "sym_f"), ("mixtral", "asym_z"), ("qwen2_moe", "sym_f"), ("qwen3_moe", "asym_z")]


@pytest.mark.parametrize("family,scheme", GGUF_CASES, ids=[f"{f}-{s}" for f, s in GGUF_CASES])
def test_gguf_export_stacks_the_experts_and_reads_back_exactly(tmp_path, family, scheme):
    """Every block's experts as ffn_{gate,up,down}_exps [n_expert, rows, cols] of one block type, the router
    as ffn_gate_inp (Qwen2-MoE's shared expert as *_shexp, its gate ffn_gate_inp_shexp; Qwen3's q/k norms),
    the expert metadata as convert_hf_to_gguf.py writes it; the gguf package's reader decodes each expert to
    qflow's dequantized weight, and qflow's GGUF import (one tensor per expert again) gives the logits of
    qflow's model."""
    import gguf

    from qflow.export.gguf_writer import export_gguf, read_back
    from qflow.models.gguf_import import convert_gguf
    from qflow.models.loading import load_model

    base, fp = _folder(tmp_path, family)
    ckpt = _run(tmp_path, "rtn", base, scheme=scheme)
    report = export_gguf(ckpt, tmp_path / "m.gguf")
    assert report["n_requantized_tensors"] == 0 and report["n_approx_tensors"] == 0, report["types"]
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[family]
    assert reader.fields["general.architecture"].contents() == arch
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields[f"{arch}.expert_count"].contents() == N_EXPERTS
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    width = 32   # every tiny family's expert width (Mixtral's intermediate_size, Qwen's moe_intermediate_size)
    if family != "mixtral":
        assert reader.fields[f"{arch}.expert_feed_forward_length"].contents() == width
    if family == "qwen2_moe":
        assert reader.fields[f"{arch}.expert_shared_feed_forward_length"].contents() == 64
        shexp = tensors["blk.0.ffn_down_shexp.weight"]
        assert shexp.tensor_type.name in ("Q4_0", "Q5_0") and [int(d) for d in shexp.shape] == [64, 64]
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"   # the shared gate: float
    assert ("blk.0.attn_q_norm.weight" in tensors) == (family == "qwen3_moe")
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert [int(d) for d in down.shape] == [width, 64, N_EXPERTS]   # GGUF order: cols, rows, experts
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"   # the router stays float
    got = gguf.quants.dequantize(down.data, down.tensor_type).reshape(N_EXPERTS, 64, width)
    for e in range(N_EXPERTS):
        assert np.array_equal(got[e], ckpt.dequantized(f"model.layers.1.mlp.experts.{e}.down_proj").float().numpy())
    assert read_back(tmp_path / "m.gguf", ckpt, report)["roundtrip_max_abs_diff"] == 0

    (tmp_path / "imported").mkdir()
    convert_gguf(tmp_path / "m.gguf", tmp_path / "imported", source="gguf:m.gguf")
    imported, _ = load_model(tmp_path / "imported", dtype="float32")
    assert imported.config.model_type == family
    ids = calib_ids(2, 16, vocab=VOCAB)
    ref = _logits(apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant"), ids)
    assert _rel(_logits(imported, ids), ref) <= 1e-5


def test_gguf_refuses_moe_variants_llama_cpp_routes_otherwise(tmp_path):
    """llama.cpp fixes norm_topk_prob per architecture (false for qwen2moe, true for qwen3moe): a Qwen3-MoE with
    it off is refused by the stage's check, before any file is written."""
    import json

    from qflow.artifacts import QuantizedCheckpoint
    from stages.export_gguf import ExportGGUF

    base, _ = _folder(tmp_path, "qwen3_moe")
    ckpt = _run(tmp_path, "rtn", base)
    ref = {"model": QuantizedCheckpoint(ckpt.path, base_model=str(base), method="rtn")}
    cfg = ExportGGUF.Config(path=str(tmp_path / "out" / "m.gguf"))
    assert ExportGGUF().check(cfg, ref) == []
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"norm_topk_prob": False}))
    problems = ExportGGUF().check(cfg, ref)
    assert any("norm_topk_prob=False" in p and "qwen3moe" in p and "compressed-tensors" in p for p in problems)
    assert not (tmp_path / "out").exists()


def test_gguf_experts_of_mixed_types_share_one_block_type(tmp_path):
    """Experts whose codes would each pick another type (Q4_0 for one, Q5_0 for another) are written in one
    type that holds them all exactly."""
    from qflow.export.gguf_writer import plan_experts
    from qflow.export.mapping import load_ir_layer
    from qflow.quant import dispatch
    from qflow.quant.ir import CheckpointWriter
    from qflow.quant.spec import QuantSpec

    gen = torch.Generator().manual_seed(0)
    writer = CheckpointWriter(tmp_path / "ir", base_model=str(tmp_path), method="rtn")
    for e, spec in enumerate([QuantSpec(bits=4, group_size=32, scheme="sym_f"), QuantSpec(bits=4, group_size=32)]):
        w = torch.randn(16, 64, generator=gen)
        scale, zero = dispatch.compute_params(w, spec)
        writer.add_quantized(f"e{e}", spec, dispatch.quantize(w, scale, zero, spec), scale, zero)
    ckpt = writer.close()
    layers = [load_ir_layer(ckpt, f"e{e}") for e in range(2)]
    plan = plan_experts(layers, "blk.0.ffn_down_exps.weight")
    assert plan.status == "exact" and plan.qtype in ("Q5_0", "Q8_0") and plan.data.shape[0] == 2
