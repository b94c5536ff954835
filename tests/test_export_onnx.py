"""export.onnx: MatMulNBits packing, logits of the ONNX decoder vs qflow's model, KV cache, W8A8, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


# ---------------------------------------------------------------------------
# packing (METHODS.md §2.6)
# ---------------------------------------------------------------------------
def test_matmul_nbits_packing_low_nibble_first():
    from qflow.export.onnx_graph import pack_matmul_nbits

    codes = np.arange(16, dtype=np.uint8)[None]                 # one row, K = 16, one block
    b, s, zp = pack_matmul_nbits(codes, np.ones((1, 1)), None, 4, 16)
    assert b.shape == (1, 1, 8) and b.dtype == np.uint8
    assert list(b[0, 0]) == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert zp is None and s.dtype == np.float32 and s.shape == (1, 1)


def test_matmul_nbits_packing_blocks_zeros_padding():
    from qflow.export.onnx_graph import pack_matmul_nbits

    rng = np.random.default_rng(0)
    n, k, bs = 3, 40, 16                                         # k_blocks = 3, last block padded
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zero = rng.integers(0, 16, (n, 3)).astype(np.float32)
    b, s, zp = pack_matmul_nbits(codes, np.ones((n, 3), np.float32), zero, 4, bs)
    assert b.shape == (n, 3, 8)
    lo, hi = b & 0xF, b >> 4
    unpacked = np.stack([lo, hi], -1).reshape(n, 3 * bs)
    assert np.array_equal(unpacked[:, :k], codes) and not unpacked[:, k:].any()
    assert zp.shape == (n, 2)                                    # ceil(3 * 4 / 8)
    assert np.array_equal(zp[:, 0] & 0xF, zero[:, 0]) and np.array_equal(zp[:, 0] >> 4, zero[:, 1])
    assert np.array_equal(zp[:, 1] & 0xF, zero[:, 2]) and not (zp[:, 1] >> 4).any()   # unused nibble 0
    # 2 and 8 bits: same little-endian field order
    b2, _, _ = pack_matmul_nbits(np.array([[1, 2, 3, 0] * 4], np.uint8), np.ones((1, 1)), None, 2, 16)
    assert b2[0, 0, 0] == (1 | 2 << 2 | 3 << 4)
    b8, _, _ = pack_matmul_nbits(np.arange(16, dtype=np.uint8)[None] * 9, np.ones((1, 1)), None, 8, 16)
    assert list(b8[0, 0]) == list(range(0, 144, 9))


def test_unpack_internal_matches_qflow_packing():
    import torch

    from qflow.export.onnx_graph import unpack_internal
    from qflow.quant.packing import pack_reference

    rng = np.random.default_rng(1)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, (5, 70)).astype(np.uint8)
        packed = pack_reference(torch.from_numpy(codes), bits)
        assert np.array_equal(unpack_internal(packed.numpy(), bits, 70), codes)


# ---------------------------------------------------------------------------
# tiny checkpoints
# ---------------------------------------------------------------------------
def _write_ckpt(folder: Path, model_dir: Path, spec, *, g_idx_seed: int | None = None, fold: bool = False):
    """A checkpoint of every decoder linear; ``fold``: AWQ-like per-channel scales folded into the norms."""
    import torch

    from qflow.kernels import dispatch
    from qflow.quant.ir import CheckpointWriter
    from qflow.quant.weights import iter_linear_weights, linear_names, weight_files

    writer = CheckpointWriter(folder, base_model=str(model_dir), method="test")
    gen = torch.Generator().manual_seed(g_idx_seed or 0)
    fold_scales: dict[str, torch.Tensor] = {}
    if fold:
        from safetensors import safe_open

        files = weight_files(model_dir)
        for key in files:
            if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                with safe_open(str(files[key]), framework="pt") as h:
                    gamma = h.get_tensor(key).float()
                scale = torch.rand(gamma.shape[0], generator=gen) * 1.5 + 0.5
                fold_scales[key[: -len(".weight")]] = scale
                writer.add_float(key, gamma / scale)
    for name, w in iter_linear_weights(model_dir, linear_names(model_dir)):
        if fold:
            layer = name.rsplit(".", 2)[0]
            norm = ".input_layernorm" if ".self_attn." in name else ".post_attention_layernorm"
            if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                w = w * fold_scales[layer + norm]
        g_idx = None
        if g_idx_seed is not None:  # act-order: groups over a random column permutation (GPTQ static groups)
            perm = torch.randperm(w.shape[1], generator=gen)
            g_idx = torch.empty(w.shape[1], dtype=torch.int32)
            g_idx[perm] = torch.arange(w.shape[1], dtype=torch.int32) // spec.group_size
            wp = w[:, perm]
            scale, zero = dispatch.compute_params(wp, spec)
            codes_p = dispatch.quantize(wp, scale, zero, spec)
            codes = torch.empty_like(codes_p)
            codes[:, perm] = codes_p
        else:
            scale, zero = dispatch.compute_params(w, spec)
            codes = dispatch.quantize(w, scale, zero, spec)
        writer.add_quantized(name, spec, codes, scale, zero, g_idx)
    return writer.close()


@pytest.fixture(scope="module")
def rtn_ckpt(tiny_model_dir, tmp_path_factory):
    from qflow.quant.spec import QuantSpec

    return _write_ckpt(tmp_path_factory.mktemp("rtn-w4g32"), tiny_model_dir, QuantSpec(bits=4, group_size=32))


@pytest.fixture(scope="module")
def rtn_export(rtn_ckpt, tiny_model_dir, tmp_path_factory):
    from qflow.export.onnx_graph import export_quantized

    return export_quantized(tiny_model_dir, tmp_path_factory.mktemp("onnx-w4"), rtn_ckpt, accuracy_level=0,
                            other_level=4)


@pytest.fixture(scope="module")
def eval_ids():
    rng = np.random.default_rng(0)
    return rng.integers(0, 49152, (2, 48), dtype=np.int64)


@pytest.fixture(scope="module")
def rtn_reference(rtn_ckpt, eval_ids):
    from qflow.export.onnx_check import reference_logits

    return reference_logits(rtn_ckpt, eval_ids)


def _decoder(path, threads=1):
    from qflow.export.onnx_bench import OnnxDecoder, make_session

    return OnnxDecoder(make_session(path, threads))


# ---------------------------------------------------------------------------
# logits vs qflow's own quantized model
# ---------------------------------------------------------------------------
def test_export_files_and_graph(rtn_export):
    import onnx

    info = rtn_export
    assert info.model_path.name == "model.onnx" and info.data_path.name == "model.onnx.data"
    assert set(info.variants) == {0, 4} and info.variants[4].name == "model_acc4.onnx"
    assert info.linear_kinds == {"nbits": 14}
    files = sorted(p.name for p in info.model_path.parent.iterdir())
    assert files == ["model.onnx", "model.onnx.data", "model_acc4.onnx"]
    onnx.checker.check_model(str(info.model_path))
    graph = onnx.load(str(info.model_path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2 * 4                  # packed qkv, o, packed gate|up, down per layer
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") == 4
    head = next(n for n in graph.node if n.output[0] == "logits")
    assert head.op_type == "FusedMatMul" and head.input[1] == "model.embed_tokens.weight"   # tied: one copy
    nb = next(n for n in graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nb.attribute}
    assert attrs["block_size"] == 32 and attrs["bits"] == 4 and attrs["accuracy_level"] == 0
    acc4 = onnx.load(str(info.variants[4]), load_external_data=False).graph
    levels = {onnx.helper.get_attribute_value(a) for n in acc4.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and len(acc4.node) == len(graph.node)
    assert [i.name for i in graph.input][:2] == ["input_ids", "attention_mask"]
    assert "past_key_values.1.value" in [i.name for i in graph.input]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"}


def test_onnx_logits_match_qflow(rtn_export, rtn_reference, eval_ids):
    from qflow.export.onnx_check import roundtrip

    ref = rtn_reference
    res = roundtrip(_decoder(rtn_export.variants[0]), eval_ids, ref, kv_tokens=6)
    assert res["kl"] < 1e-3 and res["top1_agree"] > 0.99
    assert res["max_abs_diff"] < 1e-3                           # exact int4 weights, fp32 activations
    assert res["kv_max_abs_diff"] < 1e-4                        # prefill + 6 cached steps == full forward
    acc4 = roundtrip(_decoder(rtn_export.variants[4]), eval_ids, ref, kv_tokens=0)
    assert acc4["kl"] < 1e-2                                    # int8 activations: close, not exact


def test_kv_cache_numpy_and_shared_buffer(rtn_export, eval_ids):
    """Prefill then decode steps equal a full forward, with numpy presents fed back and with in-place buffers."""
    dec = _decoder(rtn_export.variants[0])
    row = eval_ids[:1]
    full, presents = dec.run(row)
    assert presents[0].shape == (1, 2, row.shape[1], 16)
    logits, past = dec.run(row[:, :40])
    steps = [logits]
    for t in range(40, row.shape[1]):
        logits, past = dec.run(row[:, t:t + 1], past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)
    dec.start(row.shape[1] + 4)
    shared = [dec.step(row[:, :20]), dec.step(row[:, 20:21]), dec.step(row[:, 21:22]), dec.step(row[:, 22:30])]
    np.testing.assert_allclose(np.concatenate(shared, axis=1), full[:, :30], atol=1e-4, rtol=0)  # chunk too
    tokens, prefill_s, steps_s = dec.greedy(row[:, :8], 4)
    assert len(tokens) == 5 and len(steps_s) == 4 and prefill_s > 0
    assert tokens[0] == int(full[0, 7].argmax())


def test_float_export_same_graph(tiny_model_dir, rtn_ckpt, rtn_reference, eval_ids, tmp_path):
    from qflow.export.onnx_bench import compare_logits
    from qflow.export.onnx_check import reference_logits
    from qflow.export.onnx_graph import build_onnx

    info = build_onnx(tiny_model_dir, tmp_path, ckpt=rtn_ckpt, mode="float")
    assert info.linear_kinds == {"float": 14}
    c = compare_logits(rtn_reference[0], _decoder(info.model_path).forward(eval_ids[:1])[0])
    assert c.max_abs < 1e-3 and c.top1 == 1.0
    # plain float model (no checkpoint) vs transformers
    info = build_onnx(tiny_model_dir, tmp_path / "base", mode="float")
    ref = reference_logits(None, eval_ids[:1], model_dir=tiny_model_dir)
    assert compare_logits(ref[0], _decoder(info.model_path).forward(eval_ids[:1])[0]).max_abs < 1e-3


def test_unfused_and_act_order(tiny_model_dir, eval_ids, tmp_path):
    """Separate q/k/v, gate/up nodes, MatMul head; act-order g_idx turned into static groups (column Gather)."""
    import onnx

    from qflow.export.onnx_check import reference_logits, roundtrip
    from qflow.export.onnx_graph import ExportSettings, build_onnx
    from qflow.quant.spec import QuantSpec

    ckpt = _write_ckpt(tmp_path / "ck", tiny_model_dir, QuantSpec(bits=4, group_size=16, symmetric=True), g_idx_seed=3)
    info = build_onnx(tiny_model_dir, tmp_path / "onnx", ckpt=ckpt,
                      settings=ExportSettings(fuse_qkv=False, fuse_gate_up=False, lm_head="matmul"))
    graph = onnx.load(str(info.model_path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 14 and "FusedMatMul" not in ops
    perms = [n for n in graph.node if n.op_type == "Gather" and n.name.endswith("/perm")]
    assert len(perms) == 14
    ref = reference_logits(ckpt, eval_ids[:1])
    res = roundtrip(_decoder(info.model_path), eval_ids[:1], ref, kv_tokens=0)
    assert res["max_abs_diff"] < 1e-3 and res["top1_agree"] == 1.0


def test_awq_like_checkpoint_float_deltas(tiny_model_dir, eval_ids, tmp_path):
    """ASYM-A codes (AWQ's scheme) + norms changed by the checkpoint (AWQ folds its scales into them)."""
    from qflow.export.onnx_check import reference_logits, roundtrip
    from qflow.export.onnx_graph import build_onnx
    from qflow.quant.spec import QuantSpec

    ckpt = _write_ckpt(tmp_path / "ck", tiny_model_dir, QuantSpec(bits=4, group_size=32, scheme="asym_a"), fold=True)
    assert any(k.endswith("input_layernorm.weight") for k in ckpt.floats)
    info = build_onnx(tiny_model_dir, tmp_path / "onnx", ckpt=ckpt)
    res = roundtrip(_decoder(info.model_path), eval_ids[:1], reference_logits(ckpt, eval_ids[:1]), kv_tokens=0)
    assert res["kl"] < 1e-6 and res["top1_agree"] == 1.0 and res["max_abs_diff"] < 1e-3


# ---------------------------------------------------------------------------
# SmoothQuant W8A8
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_w8a8_variant_runs_and_matches(tiny_model_dir, eval_ids, tmp_path, granularity):
    import onnx

    from qflow.export.onnx_check import reference_logits, roundtrip
    from qflow.export.onnx_graph import build_onnx
    from qflow.quant.spec import QuantSpec

    spec = QuantSpec(bits=8, group_size=-1 if granularity == "token" else 0, scheme="sym_r", act_bits=8,
                     act_granularity=granularity)
    ckpt = _write_ckpt(tmp_path / "ck", tiny_model_dir, spec)
    info = build_onnx(tiny_model_dir, tmp_path / "onnx", ckpt=ckpt)
    assert info.linear_kinds == {"w8a8": 14}
    ops = [n.op_type for n in onnx.load(str(info.model_path), load_external_data=False).graph.node]
    assert ops.count("MatMulInteger") == 8 and "MatMulNBits" not in ops
    ref = reference_logits(ckpt, eval_ids[:1])                  # QLinear with SYM-R fake quant
    # per-tensor dynamic scales depend on every token of the call, so only per-token W8A8 is cache-consistent
    kv = 4 if granularity == "token" else 0
    res = roundtrip(_decoder(info.model_path), eval_ids[:1], ref, kv_tokens=kv)
    # the same SYM-R rule as qflow; residual: fp32 summation order vs exact int32 accumulation, which can
    # flip an activation that sits on a rounding boundary by one code (a visible but isolated logit change)
    assert res["kl"] < 1e-5 and res["top1_agree"] > 0.99 and res["max_abs_diff"] < 0.1
    if kv:
        assert res["kv_max_abs_diff"] < 1e-4


# ---------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------
class _FakeCkpt:
    def __init__(self, spec, n=8, k=64, g_idx=None):
        import torch

        from qflow.quant.ir import LayerRecord, encode_layer

        self.spec = spec
        self.layers = {"lin": LayerRecord("lin", spec, n, k, "x", g_idx is not None)}
        g = spec.n_groups(k)
        codes = torch.randint(0, 1 << spec.bits, (n, k), dtype=torch.uint8)
        self.tensors = encode_layer(spec, codes, torch.ones(n, g), torch.full((n, g), 1.0), g_idx)

    def layer_tensors(self, name):
        return self.tensors


@pytest.mark.parametrize("kw, match", [
    ({"bits": 4, "group_size": 48, "pad_last_group": True}, "power of two"),
    ({"bits": 4, "group_size": 8}, "power of two"),
    ({"bits": 4, "group_size": -1}, "per-channel"),
    ({"bits": 3, "group_size": 32}, "3-bit"),
    ({"format": "nf4", "group_size": 64}, "lookup"),
    ({"bits": 4, "group_size": 32, "scheme": "asym_h", "zero_float": True}, "float zero"),
    ({"bits": 4, "group_size": 32, "act_bits": 8}, "W8A8"),
])
def test_refuses_what_matmulnbits_cannot_hold(kw, match):
    from qflow.export.onnx_graph import OnnxExportError, quantized_linear
    from qflow.quant.spec import QuantSpec

    with pytest.raises(OnnxExportError, match=match):
        quantized_linear(_FakeCkpt(QuantSpec(**kw)), "lin")


def test_refuses_unequal_act_order_groups():
    import torch

    from qflow.export.onnx_graph import OnnxExportError, quantized_linear
    from qflow.quant.spec import QuantSpec

    g_idx = torch.zeros(64, dtype=torch.int32)
    g_idx[:8] = 1                                               # group 0 has 56 columns, group 1 has 8
    with pytest.raises(OnnxExportError, match="act-order"):
        quantized_linear(_FakeCkpt(QuantSpec(bits=4, group_size=32), g_idx=g_idx), "lin")


def test_refuses_non_llama(tmp_path):
    from types import SimpleNamespace

    from qflow.export.onnx_graph import LlamaDims, OnnxExportError

    with pytest.raises(OnnxExportError, match="Llama"):
        LlamaDims.from_config(SimpleNamespace(model_type="gpt2"))


# ---------------------------------------------------------------------------
# the stage, run directly (no CLI / MLflow) with tiny timing knobs
# ---------------------------------------------------------------------------
def test_stage_export_onnx(rtn_ckpt, tiny_model_dir, tmp_path):
    import logging

    from qflow.artifacts import QuantizedCheckpoint
    from qflow.engine.context import StageContext
    from qflow.registry import get

    stage_cls = get("export.onnx")
    assert stage_cls is not None
    cfg = stage_cls.Config(data={"source": "zoo:lee-news", "seq_len": 32}, n_windows=2, kv_tokens=4,
                           prompt_len=16, gen_tokens=4, warmup=1, repeats=1, multi_threaded=False)
    ctx = StageContext(stage_id="export", uses="export.onnx", key=None, out_dir=tmp_path / "out",
                       scratch=tmp_path / "scratch", run_dir=tmp_path / "run", runs_root=tmp_path / "runs",
                       quiet=True)
    logging.getLogger("qflow").setLevel(logging.WARNING)
    model = QuantizedCheckpoint(rtn_ckpt.path, base_model=str(tiny_model_dir), method="test")
    out = stage_cls().run(ctx, cfg, model=model)["export"]
    files = {p.name for p in out.path.iterdir()}
    assert {"model.onnx", "model.onnx.data", "model_acc0.onnx", "export.json", "tokenizer.json",
            "config.json"} <= files and "fp32" not in files
    m = ctx.metrics
    assert m["roundtrip_kl"] < 1e-3 and m["roundtrip_top1_agree"] > 0.99
    assert "roundtrip_kl_acc4" in m and "roundtrip_top1_agree_acc4" in m
    assert m["roundtrip_kv_max_abs_diff"] < 1e-4
    for key in ("prefill_speedup_vs_fp32", "decode_speedup_vs_fp32", "prefill_ms_fp32", "decode_ms_acc4",
                "decode_ms_acc0", "prefill_speedup_vs_fp32_acc0"):
        assert m[key] > 0, key
    assert m["faster_accuracy_level"] in (0, 4)
    report = json.loads((out.path / "export.json").read_text())
    assert report["export"]["accuracy_variants"] == {"4": "model.onnx", "0": "model_acc0.onnx"}
    assert out.meta["format"] == "onnx"


def test_stage_module_is_light():
    import subprocess
    import sys

    code = ("import sys, stages.export_onnx; "
            "print([m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]", done.stderr


# ---------------------------------------------------------------------------
# acceptance on the bundled model (slow): KL + speed ratios
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_acceptance(bundled_model_dir, tmp_path):
    """RTN W4 g64 (same conversion as AWQ) on SmolLM2-135M: KL/top-1 at level 0, speed vs fp32."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import onnx_speed

    res = onnx_speed.run(bundled_model_dir, tmp_path, method="rtn", n_windows=2, repeats=3, multi_threaded=False)
    assert res["roundtrip_kl"] < 1e-3 and res["roundtrip_top1_agree"] > 0.99
    assert res["decode_speedup_vs_fp32"] >= 2.0
    assert res["prefill_speedup_vs_fp32"] >= 1.0
