"""export.onnx: MatMulNBits packing, logits of the ONNX decoder vs qflow's model, KV cache, W8A8, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


# ---------------------------------------------------------------------------
# packing (docs/METHODS.md §2.6)
# ---------------------------------------------------------------------------
def test_matmul_nbits_packing_low_nibble_first():
    from qflow.export.onnx_weights import pack_matmul_nbits

    codes = np.arange(16, dtype=np.uint8)[None]                 # one row, K = 16, one block
    b, s, zp = pack_matmul_nbits(codes, np.ones((1, 1)), None, 4, 16)
    assert b.shape == (1, 1, 8) and b.dtype == np.uint8
    assert list(b[0, 0]) == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert zp is None and s.dtype == np.float32 and s.shape == (1, 1)


def test_matmul_nbits_packing_blocks_zeros_padding():
    from qflow.export.onnx_weights import pack_matmul_nbits

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


def test_one_unpack_of_qflows_packing():
    """The exporters read qflow's internal packing with the quant core's unpack, not copies of it:
    the ONNX weights take their codes from it, and the dense stream (the same layout for 2/4/8 bits)
    hands those widths to it, spare high bits and padding words included."""
    import torch

    import qflow.export.onnx_graph as onnx_graph
    import qflow.export.onnx_weights as onnx_weights
    from qflow.export import layouts
    from qflow.quant.packing import pack_reference, unpack_reference

    assert not hasattr(onnx_graph, "unpack_internal") and not hasattr(onnx_weights, "unpack_internal")
    rng = np.random.default_rng(1)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, (5, 70)).astype(np.uint8)
        packed = pack_reference(torch.from_numpy(codes), bits)
        assert np.array_equal(layouts.unpack_stream(packed.numpy(), bits, 70), codes)
        words = rng.integers(-2**31, 2**31, (3, 4), dtype=np.int64).astype(np.int32)   # any bits set
        n = 4 * (32 // bits) - 1
        expected = unpack_reference(torch.from_numpy(words), bits, n).numpy()
        assert np.array_equal(layouts.unpack_stream(words, bits, n), expected)
        assert np.array_equal(layouts.unpack_stream(words.T, bits, n, axis=0), expected.T)


# ---------------------------------------------------------------------------
# tiny checkpoints
# ---------------------------------------------------------------------------
def _write_ckpt(folder: Path, model_dir: Path, spec, *, g_idx_seed: int | None = None, fold: bool = False):
    """A checkpoint of every decoder linear; ``fold``: AWQ-like per-channel scales folded into the norms."""
    import torch

    from qflow.quant import dispatch
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
def _qflow_codes(x: np.ndarray, granularity: str) -> tuple[np.ndarray, np.ndarray]:
    """(int codes, fp32 scale) of qflow's own SYM-R activation rule (fake_quant_activation) on ``x``."""
    import torch

    from qflow.quant.qlinear import fake_quant_activation

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    amax = xt.abs().amax(dim=-1, keepdim=True) if granularity == "token" else xt.abs().amax()
    scale = amax.clamp(min=1e-5) / 127.0
    fq = fake_quant_activation(xt, 8, granularity)
    return torch.round(fq / scale).to(torch.int64).numpy(), scale.numpy()


def _w8a8_exact_output(codes: np.ndarray, scale: np.ndarray, w_uint8: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """The W8A8 linear in exact integers (int64), rescaled in fp32 as the graph does: (acc * s_a) * s_w."""
    acc = codes.astype(np.int64) @ (w_uint8.astype(np.int64) - 128)
    assert np.abs(acc).max() < 2**24                           # acc is exact in fp32 too
    return (acc.astype(np.float32) * scale.astype(np.float32)) * w_scale.astype(np.float32)


def _assert_fp32_rescale_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    # onnxruntime may fuse the two rescales (MatMulIntegerToFloat: acc * (s_a * s_w)): 2 roundings apart
    np.testing.assert_allclose(actual, expected, rtol=4 * 2.0**-24, atol=1e-30)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_w8a8_linear_exact_where_u8s8_saturates(tmp_path, granularity, threads):
    """One exported W8A8 linear on inputs that saturate onnxruntime's AVX2 u8s8 kernel (vpmaddubsw int16
    pair sums, CPUs without VNNI): the codes are qflow's and the integer matmul is exact on any x86 CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qflow.export.onnx_graph import OPSET
    from qflow.export.onnx_nodes import ExportSettings, GraphWriter, linear_nodes
    from qflow.export.onnx_weights import LinearWeights

    rng = np.random.default_rng(7)
    m, k, n = 16, 256, 48
    w_int8 = rng.choice(np.array([-127, 127], np.int8), (k // 2, n)).repeat(2, axis=0)   # equal-sign K pairs
    w_int8[:, : n // 2] = rng.integers(-127, 128, (k, n // 2))                           # and ordinary columns
    w_scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    # activations at the top of the range with the sign of column 0's weights: every pair of column 0
    # is (q+128)*127 * 2 = 64770 > 32767 under u8s8; fresh random rows besides
    x = (np.sign(w_int8[:, 0])[None] * rng.uniform(0.9, 1.0, (m, k)) * rng.uniform(0.5, 4.0, (m, 1)))
    x[m // 2:] = rng.standard_normal((m - m // 2, k))
    x = x.astype(np.float32)
    w = LinearWeights("w8a8", n, k, w_int8=w_int8, scales=w_scale, act_granularity=granularity)
    g = GraphWriter(tmp_path / "lin.onnx.data")
    y = linear_nodes(g, "x", w, "lin", ExportSettings())
    g.close()
    graph = helper.make_graph(g.nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [m, n]),
                               helper.make_tensor_value_info("lin/act_uint8/out0", TensorProto.UINT8, [m, k])],
                              initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.save_model(model, str(tmp_path / "lin.onnx"))
    mm = next(nd for nd in model.graph.node if nd.op_type == "MatMulInteger")
    weight = next(t for t in model.graph.initializer if t.name == mm.input[1])
    assert weight.data_type == TensorProto.UINT8 and len(mm.input) == 4        # u8u8, both zero points

    codes, scale = _qflow_codes(x, granularity)
    pairs = (codes[:, 0::2] + 128) * w_int8[0::2, 0] + (codes[:, 1::2] + 128) * w_int8[1::2, 0]
    assert np.abs(pairs).max() > 32767                         # the input does saturate vpmaddubsw
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(tmp_path / "lin.onnx"), so, providers=["CPUExecutionProvider"])
    out, q8 = sess.run(None, {"x": x})
    assert np.array_equal(q8.astype(np.int64) - 128, codes)   # qflow's codes, every one
    w_uint8 = (w_int8.astype(np.int16) + 128).astype(np.uint8)
    _assert_fp32_rescale_equal(out, _w8a8_exact_output(codes, scale, w_uint8, w_scale))


def test_w8a8_refuses_int32_overflow_width(tmp_path):
    from qflow.export.onnx_nodes import W8A8_MAX_K, ExportSettings, GraphWriter, linear_nodes
    from qflow.export.onnx_weights import LinearWeights, OnnxExportError

    k = W8A8_MAX_K + 1
    w = LinearWeights("w8a8", 1, k, w_int8=np.ones((k, 1), np.int8), scales=np.ones(1, np.float32))
    g = GraphWriter(tmp_path / "x.data")
    try:
        with pytest.raises(OnnxExportError, match="exceeds"):
            linear_nodes(g, "x", w, "lin", ExportSettings())
    finally:
        g.close()


_W8A8_NODES = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "gate_up", "up_proj": "gate_up"}


@pytest.fixture(scope="module", params=["token", "tensor"])
def w8a8_case(request, tiny_model_dir, eval_ids, tmp_path_factory):
    """A W8A8 export with its per-linear inputs/codes/outputs exposed, and qflow's reference with the inputs
    of every QLinear captured (forward hooks on the real model)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from qflow.export.onnx_graph import build_onnx
    from qflow.models.quantized import load_quantized_model
    from qflow.quant.qlinear import QLinear
    from qflow.quant.spec import QuantSpec

    granularity = request.param
    tmp = tmp_path_factory.mktemp(f"w8a8-{granularity}")
    spec = QuantSpec(bits=8, group_size=-1 if granularity == "token" else 0, scheme="sym_r", act_bits=8,
                     act_granularity=granularity)
    ckpt = _write_ckpt(tmp / "ck", tiny_model_dir, spec)
    info = build_onnx(tiny_model_dir, tmp / "onnx", ckpt=ckpt)
    model = onnx.load(str(info.model_path))
    prefixes = [nd.name[: -len("/act_abs")] for nd in model.graph.node if nd.name.endswith("/act_abs")]
    inputs = {nd.name[: -len("/act_abs")]: nd.input[0] for nd in model.graph.node if nd.name.endswith("/act_abs")}
    inits = {t.name: t for t in model.graph.initializer}
    weights = {p: (numpy_helper.to_array(inits[f"{p}.weight_uint8"]), numpy_helper.to_array(inits[f"{p}.weight_scale"]))
               for p in prefixes}
    probe = onnx.load(str(info.model_path), load_external_data=False)
    for p in prefixes:
        probe.graph.output.extend([helper.make_tensor_value_info(inputs[p], TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info(f"{p}/act_uint8/out0", TensorProto.UINT8, None),
                                   helper.make_tensor_value_info(f"{p}/w_rescale/out0", TensorProto.FLOAT, None)])
    probe_path = info.model_path.with_name("probe.onnx")          # beside model.onnx.data
    onnx.save_model(probe, str(probe_path))

    ref_model, _ = load_quantized_model(ckpt, dtype=torch.float32, mode="qlinear", base_dir=str(tiny_model_dir))
    captured: dict[str, np.ndarray] = {}
    for name, module in ref_model.named_modules():
        if isinstance(module, QLinear):
            layer, _, proj = name.rsplit(".", 2)
            node = f"{layer}.{_W8A8_NODES[proj]}" if proj in _W8A8_NODES else name
            module.register_forward_hook(lambda mod, args, out, node=node: captured.__setitem__(
                node, args[0][0].detach().float().numpy().copy()))
    with torch.no_grad():
        ref_logits = ref_model(torch.as_tensor(eval_ids[:1])).logits[0].float().numpy()
    assert sorted(captured) == sorted(prefixes)
    return {"granularity": granularity, "info": info, "probe": probe_path, "prefixes": prefixes,
            "inputs": inputs, "weights": weights, "ref_inputs": captured, "ref_logits": ref_logits}


@pytest.mark.parametrize("threads", [1, 2])
def test_w8a8_variant_runs_and_matches(w8a8_case, eval_ids, threads):
    """The W8A8 graph against qflow's QLinear model, with bounds that follow from the arithmetic.

    1. every graph linear quantizes its own input exactly as qflow does (0 differing codes) and its
       integer matmul is exact (output == exact int64 product, rescaled in fp32);
    2. the graph's and qflow's forwards differ in fp32 summation order only, so their inputs to a
       linear agree to float rounding, and a code can differ only where x/s sits on a rounding tie
       (x.5): the first differing codes must be such ties, each one code apart;
    3. logits at positions no differing code can reach (per-token: earlier positions, causal; per-tensor:
       all, when no code differs) agree within the fp32 bound of the float export (1e-3).
    """
    import onnx

    from qflow.export.onnx_bench import OnnxDecoder, compare_logits, make_session
    from qflow.export.onnx_check import roundtrip

    case, granularity = w8a8_case, w8a8_case["granularity"]
    info = case["info"]
    ops = [n.op_type for n in onnx.load(str(info.model_path), load_external_data=False).graph.node]
    assert info.linear_kinds == {"w8a8": 14} and ops.count("MatMulInteger") == 8 and "MatMulNBits" not in ops
    assert info.to_json()["w8a8_matmul"]["path"] == "u8u8"

    dec = OnnxDecoder(make_session(case["probe"], threads))
    names = [o.name for o in dec.session.get_outputs()]
    seq = eval_ids.shape[1]
    feeds = {"input_ids": eval_ids[:1], "attention_mask": np.ones((1, seq), np.int64)}
    for i in range(dec.n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, dec.n_kv_heads, 0, dec.head_dim), np.float32)
    got = dict(zip(names, dec.session.run(None, feeds)))
    logits = got["logits"][0]

    first_flip = (seq, None)       # (position, node) of the earliest differing code, in execution order
    n_codes = n_diff = 0
    diffs = {}
    for p in case["prefixes"]:                                   # graph order == execution order
        x = got[case["inputs"][p]].reshape(seq, -1)
        codes = got[f"{p}/act_uint8/out0"].reshape(seq, -1).astype(np.int64) - 128
        own, scale = _qflow_codes(x, granularity)
        assert np.array_equal(codes, own), p                     # 1. qflow's rule on the graph's input
        w_uint8, w_scale = case["weights"][p]
        _assert_fp32_rescale_equal(got[f"{p}/w_rescale/out0"].reshape(seq, -1),
                                   _w8a8_exact_output(codes, scale, w_uint8, w_scale))
        ref_codes, _ = _qflow_codes(case["ref_inputs"][p], granularity)
        diff = ref_codes != codes
        n_codes, n_diff = n_codes + diff.size, n_diff + int(diff.sum())
        diffs[p] = diff
        rows = np.flatnonzero(diff.any(axis=1))
        # per-token: codes at a position depend on earlier positions only; per-tensor: on all of them
        if rows.size and (rows[0] < first_flip[0] if granularity == "token" else first_flip[1] is None):
            first_flip = (int(rows[0]), p)
    if first_flip[1] is not None:                                # 2. the first differing codes are ties
        pos, p = first_flip
        x_ref = case["ref_inputs"][p]
        _, s_ref = _qflow_codes(x_ref, granularity)
        ratio = x_ref / s_ref
        rows = slice(None) if granularity == "tensor" else slice(pos, pos + 1)
        at = diffs[p][rows]
        x_graph = got[case["inputs"][p]].reshape(seq, -1)
        assert np.abs(x_graph[rows] - x_ref[rows]).max() <= 1e-4 * np.abs(x_ref[rows]).max()   # float-close
        frac = np.abs(ratio[rows][at]) % 1.0
        assert np.all(np.abs(frac - 0.5) < 1e-3), frac
    clean = first_flip[0] if granularity == "token" else (seq if first_flip[1] is None else 0)
    print(f"W8A8 {granularity}, {threads} threads: {n_diff}/{n_codes} activation codes differ "
          f"({n_diff / n_codes:.2e}); first at position {first_flip[0]} ({first_flip[1]}); "
          f"{clean}/{seq} positions unreachable by them")
    if clean:                                                    # 3. float-export bound where codes agree
        assert compare_logits(case["ref_logits"][:clean], logits[:clean]).max_abs < 1e-3
    if granularity == "token":  # per-tensor scales depend on every token of the call: not cache-consistent
        res = roundtrip(OnnxDecoder(make_session(info.model_path, threads)), eval_ids[:1], [case["ref_logits"]],
                        kv_tokens=4)
        assert res["kv_max_abs_diff"] < 1e-4                     # prefill + cached steps == full forward


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
    from qflow.export.onnx_weights import OnnxExportError, quantized_linear
    from qflow.quant.spec import QuantSpec

    with pytest.raises(OnnxExportError, match=match):
        quantized_linear(_FakeCkpt(QuantSpec(**kw)), "lin")


def test_refuses_unequal_act_order_groups():
    import torch

    from qflow.export.onnx_weights import OnnxExportError, quantized_linear
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
                       scratch=tmp_path / "scratch", run_dir=tmp_path / "run", memo_dir=tmp_path / "runs" / "cache",
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
# acceptance on the bundled model (slow): KL, and that the speed ratios are measured
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_acceptance(bundled_model_dir, tmp_path):
    """RTN W4 g64 (same conversion as AWQ) on SmolLM2-135M: KL/top-1 at level 0; speed vs fp32 is measured.

    The speed targets (decode >= 2x fp32; prefill at parity, onnxruntime's int4 GEMM being no faster
    than its fp32 matmul here) are benchmark figures (`python benchmarks/onnx_speed.py`, RESULTS.md),
    not assertions: a timed ratio flips on a loaded machine (prefill 0.96x seen with the slow suite
    beside another test run)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import onnx_speed

    res = onnx_speed.run(bundled_model_dir, tmp_path, method="rtn", n_windows=2, repeats=3, multi_threaded=False)
    assert res["roundtrip_kl"] < 1e-3 and res["roundtrip_top1_agree"] > 0.99
    assert res["decode_speedup_vs_fp32"] > 0 and res["prefill_speedup_vs_fp32"] > 0
