"""export.safetensors: packing layouts (docs/METHODS.md §2.3-2.5), IR -> compressed-tensors / AWQ GEMM / GPTQ
folders, exactness, readers (qflow's and the compressed-tensors library's), the stage, atomic placement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qflow.export import layouts, mapping
from qflow.export.readers import decode_awq_gemm, decode_gptq, load_exported_model
from qflow.export.safetensors_ct import ExportError, export_hf_folder, plan_layers
from qflow.quant.ir import Checkpoint, CheckpointWriter
from qflow.quant.spec import QuantSpec

from .conftest import run_cli, write_recipe



# ---------------------------------------------------------------- helpers shared with the GGUF / inspect tests


def build_ir(out: Path, base: Path, spec: QuantSpec, *, act_order: bool = False, transform=None,
             float_delta: bool = False, method: str = "rtn") -> Checkpoint:
    """An IR of every decoder linear of ``base`` quantized RTN-style under ``spec``.

    ``act_order``: quantize columns in a random order and store ``g_idx`` (GPTQ act-order);
    ``transform(name, W)``: change a weight first; ``float_delta``: also store a changed
    norm (as AWQ's folding does).
    """
    from qflow.quant import dispatch
    from qflow.quant.weights import iter_linear_weights, linear_names

    writer = CheckpointWriter(out, base_model=str(base), method=method)
    gen = torch.Generator().manual_seed(1)
    for name, w in iter_linear_weights(base, linear_names(base)):
        if transform is not None:
            w = transform(name, w)
        if act_order:
            perm = torch.randperm(w.shape[1], generator=gen)
            scale, zero = dispatch.compute_params(w[:, perm], spec)
            codes_p = dispatch.quantize(w[:, perm], scale, zero, spec)
            inv = torch.argsort(perm)
            codes = codes_p[:, inv]
            g_idx = (inv // spec.group_size).to(torch.int32)
            writer.add_quantized(name, spec, codes, scale, zero, g_idx)
        else:
            scale, zero = dispatch.compute_params(w, spec)
            writer.add_quantized(name, spec, dispatch.quantize(w, scale, zero, spec), scale, zero)
    if float_delta:
        from safetensors import safe_open

        with safe_open(str(base / "model.safetensors"), framework="pt") as h:
            norm = h.get_tensor("model.layers.0.input_layernorm.weight")
        writer.add_float("model.layers.0.input_layernorm.weight", norm * 1.5)
    return writer.close()


_REF_LOGITS: dict[str, torch.Tensor] = {}
_IRS: dict[str, Checkpoint] = {}
IR_SPECS = {
    "asym4": (QuantSpec(bits=4, group_size=32), dict(float_delta=True)),
    "awq4": (QuantSpec(bits=4, group_size=64, scheme="asym_a"), dict(float_delta=True, method="awq")),
    "sym4": (QuantSpec(bits=4, group_size=32, symmetric=True), {}),
    "gptq_act": (QuantSpec(bits=4, group_size=32, symmetric=True), dict(act_order=True, method="gptq")),
    "asym3": (QuantSpec(bits=3, group_size=32), {}),
    "hqq": (QuantSpec(bits=4, group_size=32, scheme="asym_h", zero_float=True), dict(method="hqq")),
    "nf4": (QuantSpec(format="nf4", group_size=64), {}),
    "w8a8": (QuantSpec(bits=8, group_size=-1, scheme="sym_r", act_bits=8), dict(method="smoothquant")),
    "sym8": (QuantSpec(bits=8, group_size=32, scheme="sym_r"), {}),
    "g16": (QuantSpec(bits=4, group_size=16), {}),
    "zero0": (QuantSpec(bits=4, group_size=32), dict(transform=lambda n, w: w.abs() if "q_proj" in n else w)),
}


class IRs:
    """Tiny-model IRs built on first use and shared by every export/inspect test of the session."""

    def __init__(self, root: Path, base: Path):
        self.root, self.base = root, base

    def __getitem__(self, name: str) -> Checkpoint:
        key = f"{self.base}:{name}"
        if key not in _IRS:
            spec, kw = IR_SPECS[name]
            _IRS[key] = build_ir(self.root / name, self.base, spec, **kw)
        return _IRS[key]


@pytest.fixture()
def irs(tmp_path_factory, tiny_model_dir):
    root = Path(str(tmp_path_factory.getbasetemp())) / "export-irs"
    root.mkdir(exist_ok=True)
    return IRs(root, tiny_model_dir)


def random_ids(vocab: int = 2000) -> torch.Tensor:
    return torch.randint(0, min(vocab, 2000), (2, 24), generator=torch.Generator().manual_seed(0))


def logits_kl(ckpt: Checkpoint, model) -> tuple[float, float]:
    """(mean KL(qflow || model), max |logit diff|) on two random 24-token windows."""
    from qflow.export.verify import ReplayedLogits, compare_logits, reference_model

    key = str(ckpt.path)
    ids = random_ids(model.config.vocab_size)
    if key not in _REF_LOGITS:
        ref, _ = reference_model(ckpt)
        with torch.no_grad():
            _REF_LOGITS[key] = torch.stack([ref(input_ids=ids[i:i + 1]).logits[0] for i in range(ids.shape[0])])
    m = compare_logits(ReplayedLogits(_REF_LOGITS[key]), model, ids)
    return m["roundtrip_kl"], m["roundtrip_max_abs_diff"]


def assert_decodes_to_ir(folder: Path, ckpt: Checkpoint) -> None:
    from qflow.export.readers import read_float_state_dict

    state = read_float_state_dict(folder)
    for name in ckpt.layers:
        assert torch.equal(state[name + ".weight"], ckpt.dequantized(name)), name
    for name in ckpt.floats:
        assert torch.equal(state[name], ckpt.float_tensor(name).float()), name


# ---------------------------------------------------------------- docs/METHODS.md §2 packing tests


def test_awq_gemm_order():
    """§2.3: logical columns 0..7 holding 1..8 pack to 0x86427531 (and unpack back)."""
    word = layouts.pack_awq(np.arange(1, 9, dtype=np.uint8)[None])
    assert int(word[0, 0]) & 0xFFFFFFFF == 0x86427531
    assert layouts.unpack_awq(word).tolist() == [list(range(1, 9))]
    assert layouts.AWQ_REVERSE == tuple(layouts.AWQ_ORDER.index(j) for j in range(8))


def test_sequential_packing_and_gptq_sym_qzeros(irs):
    """§2.1 word 0x87654321; §2.4 GPTQ sym 4-bit qzeros are all 0x77777777 (z-1 = 7)."""
    assert int(layouts.pack_stream(np.arange(1, 9, dtype=np.uint8)[None], 4)[0, 0]) & 0xFFFFFFFF == 0x87654321
    layer = mapping.load_ir_layer(irs["sym4"], "model.layers.0.mlp.up_proj")
    m = mapping.to_gptq(layer)
    assert m.status == "exact"
    assert np.all(m.tensors["qzeros"].astype(np.int64) & 0xFFFFFFFF == 0x77777777)
    assert int(m.tensors["qzeros"][0, 0]) == 2004318071
    out, cols = layer.codes.shape
    assert m.tensors["qweight"].shape == (cols * 4 // 32, out)   # packed along the input rows
    assert m.tensors["scales"].dtype == np.float16 and m.tensors["scales"].shape == (cols // 32, out)
    assert m.tensors["g_idx"].tolist() == [j // 32 for j in range(cols)]
    # qweight[r, n] nibble j = code of input row 8r + j
    r, n, j = 1, 3, 5
    assert (int(m.tensors["qweight"][r, n]) >> (4 * j)) & 0xF == layer.codes[n, 8 * r + j]


def test_gptq_3bit_spill_layout():
    """§2.4 3-bit: 32 values in 3 words (AutoGPTQ pack): element i at bits [3i, 3i+3) of the 96-bit stream."""
    v = np.arange(32, dtype=np.uint8)[:, None] % 8
    words = layouts.pack_stream(v, 3, axis=0)[:, 0].astype(np.int64) & 0xFFFFFFFF
    stream = int(words[0]) | int(words[1]) << 32 | int(words[2]) << 64
    assert [(stream >> (3 * i)) & 7 for i in range(32)] == v[:, 0].tolist()
    assert layouts.unpack_stream(layouts.pack_stream(v, 3, axis=0), 3, 32, axis=0).tolist() == v.tolist()


def test_compressed_tensors_pack_quantized_layout(irs):
    """§2.5: signed codes + 2^(b-1) packed 8 per int32 along in; zero points packed along dim 0; weight_shape."""
    layer = mapping.load_ir_layer(irs["asym4"], "model.layers.0.self_attn.k_proj")
    m = mapping.to_compressed_tensors(layer, "float16")
    out, cols = layer.codes.shape
    t = m.tensors
    assert t["weight_packed"].dtype == np.int32 and t["weight_packed"].shape == (out, cols // 8)
    assert t["weight_scale"].shape == (out, cols // 32) and t["weight_scale"].dtype == np.float32
    assert t["weight_zero_point"].shape == (out // 8, cols // 32)
    assert t["weight_shape"].tolist() == [out, cols]
    signed = layer.codes.astype(np.int64) - 8                          # ct's signed q in [-8, 7] ...
    zp = np.rint(layer.zero).astype(np.int64) - 8                      # ... and signed zero point
    assert signed.min() >= -8 and signed.max() <= 7
    word = int(t["weight_packed"][2, 1]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == (signed[2, 8:16] + 8).tolist()
    zword = int(t["weight_zero_point"][0, 1]) & 0xFFFFFFFF
    assert [(zword >> (4 * i)) & 0xF for i in range(8)] == (zp[0:8, 1] + 8).tolist()
    # (q - zp) * s with signed values is qflow's (q - z) * s
    assert np.array_equal((signed - zp[:, np.arange(cols) // 32]) * layer.scale[:, np.arange(cols) // 32],
                          layer.dequantized())
    assert m.scheme["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                   "group_size": 32, "dynamic": False, "actorder": None}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_stream_matches_compressed_tensors_library(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, size=(16, 72)).astype(np.uint8)
    signed = torch.from_numpy((v.astype(np.int16) - (1 << (bits - 1))).astype(np.int8))
    assert np.array_equal(layouts.pack_stream(v, bits), pack_to_int32(signed, bits).numpy())
    assert np.array_equal(layouts.pack_stream(v, bits, axis=0), pack_to_int32(signed, bits, packed_dim=0).numpy())
    assert np.array_equal(layouts.unpack_stream(layouts.pack_stream(v, bits), bits, 72), v)


def test_layer_decoders_roundtrip(irs):
    layer = mapping.load_ir_layer(irs["awq4"], "model.layers.1.mlp.down_proj")
    awq = mapping.to_awq_gemm(layer)
    assert awq.tensors["qweight"].shape == (layer.in_features, layer.out_features // 8)
    assert np.array_equal(decode_awq_gemm(awq.tensors, 64), layer.dequantized())
    g = mapping.to_gptq(mapping.load_ir_layer(irs["gptq_act"], "model.layers.0.self_attn.o_proj"))
    assert g.scheme["desc_act"] is True
    assert np.array_equal(decode_gptq(g.tensors, 4), mapping.load_ir_layer(irs["gptq_act"],
                                                                            "model.layers.0.self_attn.o_proj").dequantized())


# ---------------------------------------------------------------- mapping status per spec


def test_which_specs_map_exactly(irs):
    cases = {  # ir -> {layout: expected status of every layer}
        "asym4": {"compressed-tensors": "exact", "awq-gemm": "exact", "gptq": "exact"},
        "awq4": {"compressed-tensors": "exact", "awq-gemm": "exact", "gptq": "exact"},
        "sym4": {"compressed-tensors": "exact", "awq-gemm": "exact", "gptq": "exact"},
        "gptq_act": {"compressed-tensors": "exact", "awq-gemm": "unsupported", "gptq": "exact"},
        "asym3": {"compressed-tensors": "exact", "awq-gemm": "unsupported", "gptq": "exact"},
        "hqq": {"compressed-tensors": "rounded", "awq-gemm": "rounded", "gptq": "rounded"},
        "nf4": {"compressed-tensors": "unsupported", "awq-gemm": "unsupported", "gptq": "unsupported"},
        "w8a8": {"compressed-tensors": "exact", "awq-gemm": "unsupported", "gptq": "unsupported"},
    }
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    for ir, layouts_ in cases.items():
        for layout, status in layouts_.items():
            got = {v["status"] for v in plan_layers(irs[ir], layout, names=names).values()}
            assert got == {status}, (ir, layout, got)


def test_hqq_float_zeros_are_rounded_and_reported(irs, tmp_path):
    rep = export_hf_folder(irs["hqq"], tmp_path / "hqq", layout="compressed-tensors")
    assert rep["n_rounded"] == len(irs["hqq"].layers) and rep["n_exact"] == 0
    assert any("float zeros (HQQ)" in n for n in rep["notes"])
    assert 20 < rep["min_sqnr_db"] < 200
    with pytest.raises(ExportError, match="on_inexact"):
        export_hf_folder(irs["hqq"], tmp_path / "hqq-err", on_inexact="error")


def test_unsupported_refused_or_kept_float(irs, tmp_path):
    with pytest.raises(ExportError, match="nf4.*on_unsupported: float"):
        export_hf_folder(irs["nf4"], tmp_path / "nf4")
    rep = export_hf_folder(irs["nf4"], tmp_path / "nf4-float", on_unsupported="float")
    assert rep["n_float"] == len(irs["nf4"].layers)
    cfg = json.loads((tmp_path / "nf4-float" / "config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in cfg["quantization_config"]["ignore"]
    assert_decodes_to_ir(tmp_path / "nf4-float", irs["nf4"])


def test_gptq_zero_point_zero(irs, tmp_path):
    """v1 stores z-1: zeros of 0 force gptq_v2 (auto) or are clamped to 1 with a note (gptq)."""
    rep = export_hf_folder(irs["zero0"], tmp_path / "v2", layout="gptq")
    assert rep["quantization_config"]["checkpoint_format"] == "gptq_v2" and rep["n_exact"] == len(irs["zero0"].layers)
    assert_decodes_to_ir(tmp_path / "v2", irs["zero0"])
    rep1 = export_hf_folder(irs["zero0"], tmp_path / "v1", layout="gptq", gptq_format="gptq")
    assert rep1["n_rounded"] >= 2 and any("clamped to 1" in n for n in rep1["notes"])


# ---------------------------------------------------------------- whole folders


@pytest.mark.parametrize("ir,layout,logits", [("asym4", "compressed-tensors", True), ("awq4", "awq-gemm", True),
                                              ("gptq_act", "gptq", True), ("w8a8", "compressed-tensors", True),
                                              ("sym4", "gptq", False), ("asym3", "compressed-tensors", False),
                                              ("asym3", "gptq", False), ("sym8", "compressed-tensors", False)])
def test_export_reloads_exactly(irs, tmp_path, ir, layout, logits):
    out = tmp_path / "export"
    rep = export_hf_folder(irs[ir], out, layout=layout, qflow_meta={"recipe_key": "k" * 64})
    assert rep["n_exact"] == len(irs[ir].layers)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == {"compressed-tensors": "compressed-tensors", "awq-gemm": "awq", "gptq": "gptq"}[layout]
    assert cfg["qflow"]["recipe_key"] == "k" * 64 and cfg["qflow"]["version"]
    assert set(cfg["qflow"]["layers"]) == set(irs[ir].layers)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        meta = h.metadata()
        assert meta["qflow_recipe_key"] == "k" * 64 and meta["format"] == "pt"
        assert set(json.loads(meta["qflow_layers"])) == set(irs[ir].layers)
    if layout == "compressed-tensors":
        assert q["format"] == ("int-quantized" if ir == "w8a8" else "pack-quantized")
        assert q["ignore"] == ["lm_head"]
        group = q["config_groups"]["group_0"]
        assert group["targets"] == ["Linear"]
        assert group["weights"]["num_bits"] == irs[ir].layers["model.layers.0.mlp.up_proj"].spec.bits
        if ir == "w8a8":
            assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                                  "strategy": "token"}
    assert_decodes_to_ir(out, irs[ir])
    if logits:
        model, _ = load_exported_model(out)
        kl, max_abs = logits_kl(irs[ir], model)
        assert kl == 0 and max_abs == 0


@pytest.mark.parametrize("ir", ["sym4", "asym4"])
def test_compressed_tensors_library_reads_export(irs, tmp_path, ir):
    """The reference library decodes the folder to the IR's weights; transformers loads the symmetric one."""
    from qflow.export.readers import ct_library_state_dict, load_with_compressed_tensors

    out = tmp_path / "ct"
    export_hf_folder(irs[ir], out)
    state = ct_library_state_dict(out)
    for name in irs[ir].layers:
        assert torch.equal(state[name + ".weight"], irs[ir].dequantized(name)), name
    model, _, how = load_with_compressed_tensors(out)
    if ir == "sym4":
        assert how == "transformers+compressed-tensors"
        kl, max_abs = logits_kl(irs[ir], model)
        assert kl < 1e-12 and max_abs == 0
    else:  # transformers + compressed-tensors 0.20 cannot load packed asymmetric zero points (upstream)
        assert how.startswith(("transformers", "compressed-tensors compressors"))


@pytest.mark.parametrize("ir", ["asym4", "sym4", "asym3"])
def test_compressed_tensors_compressor_writes_the_same_tensors(irs, ir):
    """The library's own compressor, fed the IR's float weight, scale and zero point, packs to our bytes."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    layer = mapping.load_ir_layer(irs[ir], "model.layers.1.self_attn.o_proj")
    ours = mapping.to_compressed_tensors(layer, "float32")
    scheme = QuantizationScheme(targets=["Linear"], weights=ours.scheme["weights"])
    half = 1 << (layer.spec.bits - 1)
    state = {"weight": torch.from_numpy(layer.dequantized()), "weight_scale": torch.from_numpy(layer.scale),
             "weight_zero_point": torch.from_numpy((np.rint(layer.zero) - half).astype(np.int8))}
    theirs = BaseCompressor.get_value_from_registry("pack-quantized").compress(state, scheme)
    assert set(theirs) == set(ours.tensors)
    for k, v in ours.tensors.items():
        assert np.array_equal(theirs[k].numpy(), v), k


def test_fp16_export_is_close(irs, tmp_path):
    out = tmp_path / "fp16"
    rep = export_hf_folder(irs["awq4"], out, dtype="float16")
    assert rep["dtype"] == "float16" and rep["n_exact"] == len(irs["awq4"].layers)  # fp16 scales are exact
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert h.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.float16
        assert h.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    model, _ = load_exported_model(out)
    kl, _ = logits_kl(irs["awq4"], model)
    assert 0 < kl < 1e-4


def test_mixed_precision_gets_one_group_per_scheme(irs, tmp_path, tiny_model_dir):
    from qflow.quant import dispatch
    from qflow.quant.weights import iter_linear_weights, linear_names

    writer = CheckpointWriter(tmp_path / "mixed", base_model=str(tiny_model_dir), method="mixed")
    for name, w in iter_linear_weights(tiny_model_dir, linear_names(tiny_model_dir)):
        spec = QuantSpec(bits=8 if "down_proj" in name else 4, group_size=32, symmetric="down_proj" in name)
        s, z = dispatch.compute_params(w, spec)
        writer.add_quantized(name, spec, dispatch.quantize(w, s, z, spec), s, z)
    ckpt = writer.close()
    rep = export_hf_folder(ckpt, tmp_path / "out")
    groups = rep["quantization_config"]["config_groups"]
    assert len(groups) == 2 and all(g["targets"] != ["Linear"] for g in groups.values())
    assert_decodes_to_ir(tmp_path / "out", ckpt)
    with pytest.raises(ExportError, match="one bits/group_size"):
        export_hf_folder(ckpt, tmp_path / "gptq", layout="gptq")


# ---------------------------------------------------------------- the stage


def make_ctx(tmp_path: Path, stage_id: str = "export", key: str | None = "f" * 64):
    from qflow.engine.context import StageContext

    return StageContext(stage_id=stage_id, uses="x", key=key, out_dir=tmp_path / "out", scratch=tmp_path / "scratch",
                        run_dir=tmp_path / "run", memo_dir=tmp_path / "runs" / "cache", quiet=True)


def test_verify_setup_is_shared_by_the_export_stages(irs, tmp_path):
    """One round-trip setup (qflow's model, tokenizer, windows) and one fingerprint for both exporters."""
    from qflow.export.verify import ReplayedLogits, compare_logits, verify_fingerprint_sources, verify_setup
    from qflow.specs import DataSpec
    from stages.export_gguf import ExportGGUF
    from stages.export_safetensors import ExportSafetensors

    data = DataSpec(source="zoo:lee-news", seq_len=32)
    ref, tok, ids = verify_setup(irs["sym4"], data, 2, tmp_path / "cache")
    assert tuple(ids.shape) == (2, 32) and int(ids.max()) < len(tok)
    with torch.no_grad():
        logits = torch.stack([ref(input_ids=ids[i:i + 1]).logits[0] for i in range(2)])
    same = compare_logits(ref, ReplayedLogits(logits.numpy()), ids)
    assert same["roundtrip_kl"] == 0 and same["roundtrip_top1_agree"] == 1 and same["roundtrip_max_abs_diff"] == 0
    for stage in (ExportSafetensors, ExportGGUF):
        cfg = stage.Config(verify_data=data, verify_windows=2)
        assert stage.fingerprint_sources(cfg, tmp_path / "cache") == verify_fingerprint_sources(data, 2,
                                                                                               tmp_path / "cache")
        assert stage.fingerprint_sources(stage.Config(verify_windows=0), tmp_path / "cache") == {}
    assert set(verify_fingerprint_sources(data, 2, tmp_path / "cache")) == {"verify_data"}


def test_stage_writes_verifies_and_places(irs, tmp_path):
    from qflow.artifacts import QuantizedCheckpoint
    from qflow.export.atomic import place
    from qflow.specs import DataSpec
    from stages.export_safetensors import ExportSafetensors

    ckpt = irs["awq4"]
    cfg = ExportSafetensors.Config(verify_data=DataSpec(source="zoo:lee-news", seq_len=32), verify_windows=2,
                                   path=str(tmp_path / "placed" / "llama-awq"))
    ctx = make_ctx(tmp_path)
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "old.txt").write_text("previous export")
    place(tmp_path / "prev", tmp_path / "placed" / "llama-awq")      # a previous qflow export: replaced
    out = ExportSafetensors().run(ctx, cfg, model=QuantizedCheckpoint(ckpt.path, base_model=ckpt.base_model))
    exp = out["export"]
    assert exp.meta["layout"] == "compressed-tensors" and exp.meta["recipe_key"] == "f" * 64
    assert ctx.metrics["roundtrip_kl"] == 0 and ctx.metrics["roundtrip_top1_agree"] == 1
    assert ctx.metrics["roundtrip_max_abs_diff"] == 0 and ctx.metrics["n_exact_layers"] == len(ckpt.layers)
    placed = tmp_path / "placed" / "llama-awq"
    assert (placed / "config.json").is_file() and not (placed / "old.txt").exists()
    assert not [p for p in placed.parent.iterdir() if p.name.startswith(".qflow-")]
    cfg_json = json.loads((exp.path / "config.json").read_text())
    assert cfg_json["qflow"]["recipe_key"] == "f" * 64


def test_atomic_place_failure_leaves_old_export(tmp_path, monkeypatch):
    import shutil

    from qflow.export.atomic import place

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"new")
    old = tmp_path / "old"
    old.mkdir()
    (old / "a.bin").write_bytes(b"old")
    target = place(old, tmp_path / "dst")            # a previous qflow export

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copy2", boom)
    with pytest.raises(OSError, match="disk full"):
        place(src, target)
    assert (target / "a.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".qflow")]


# ---------------------------------------------------------------- the bundled model, through the CLI


@pytest.mark.slow
def test_cli_bundled_model_safetensors_export(tmp_path, runs_dir):
    recipe = write_recipe(tmp_path, """
name: export-st
model: {source: "zoo:smollm2-135m"}
stages:
  quantize: {uses: quantize.rtn, with: {bits: 4, group_size: 64, scheme: asym_a}}
  export:
    uses: export.safetensors
    needs: [quantize]
    with: {verify_data: {source: "zoo:lee-news", seq_len: 256}, verify_windows: 2}
""")
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    m = out["metrics"]
    assert m["export/n_exact_layers"] == 210 and m["export/n_rounded_layers"] == 0
    assert m["export/roundtrip_kl"] < 1e-4 and m["export/roundtrip_top1_agree"] > 0.999
    folder = next((runs_dir / "cache").rglob("export/config.json")).parent
    insp = run_cli("inspect", str(folder), "--json", check=True)
    info = json.loads(insp.stdout)
    assert info["method"] == "compressed-tensors" and info["bits"] == 4 and info["group_size"] == 64
