"""Llama decoder as an ONNX graph with an explicit KV cache, written node by node.

The graph is the one onnxruntime's own LLM builder emits for CPU, fused where
onnxruntime has fused kernels:

* token embedding ``Gather``; RMSNorm as plain ops for the first norm (onnxruntime
  fuses them into ``SimplifiedLayerNormalization``; the graph stays checker-clean) and
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (residual add + norm) after that;
* attention = one packed QKV projection + ``com.microsoft.GroupQueryAttention``
  (rotary inside, GQA heads, BNSH KV cache ``past_key_values.N.key/value`` in,
  ``present.N.key/value`` out) + ``o_proj``;
* MLP = one packed gate/up projection, ``Split``, ``x*Sigmoid(x)*up``, ``down_proj``;
* ``lm_head`` = float ``com.microsoft.FusedMatMul(transB=1)`` over the ``[vocab, hidden]``
  embedding (tied: the same initializer as the token embedding), or a plain ``MatMul``
  over a transposed copy (``ExportSettings.lm_head="matmul"``).

Every linear is one of three kinds:

* ``float``  -- ``MatMul`` with fp32 ``[K, N]`` weights (float export, or layers
  the checkpoint leaves float);
* ``nbits``  -- ``com.microsoft.MatMulNBits`` carrying qflow's own codes, scales and
  zero points (METHODS.md §2.6), bit for bit: no re-quantization by onnxruntime;
* ``w8a8``   -- SmoothQuant W8A8: per-token dynamic SYM-R int8 activations computed
  with plain ops (``ReduceMax(Abs)``, ``Div``, ``Round``, ``Clip``, ``Cast``; carried
  as uint8 with zero point 128), int8 per-channel weights, ``MatMulInteger`` and a
  float rescale. The codes are exactly :func:`qflow.quant.qlinear.fake_quant_activation`'s
  and the integer matmul is exact on every x86 CPU (see :data:`W8A8_MATMUL`); the only
  residual difference to qflow is fp32 summation order (exact int32 accumulation here).

Inputs: ``input_ids`` int64 ``[batch, seq]``, ``attention_mask`` int64
``[batch, past+seq]`` (all ones for batch-1 decoding), and per layer
``past_key_values.N.key/value`` fp32 ``[batch, kv_heads, past, head_dim]``.
Outputs: ``logits`` fp32 ``[batch, seq, vocab]`` and ``present.N.key/value``.

Weights go to one external-data file beside the model (``model.onnx.data``),
written tensor by tensor, so the in-memory graph stays small.

Example::

    info = build_onnx(model_dir, out_dir, ckpt=Checkpoint(ir), mode="quantized")
    sess = onnxruntime.InferenceSession(str(info.model_path))
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import QflowError

OPSET = 21
MS_DOMAIN = "com.microsoft"
DATA_SUFFIX = ".data"
ALIGN = 4096  # external tensors start on page boundaries (onnxruntime can map them)

# How a W8A8 MatMulInteger holds its operands. onnxruntime's x86 u8s8 kernel (uint8 activations x
# int8 weights) is exact only where the CPU has AVX-VNNI / AVX512-VNNI (vpdpbusd sums four u8*s8
# products in int32). Without VNNI it uses vpmaddubsw, which SATURATES a[2j]*w[2j] + a[2j+1]*w[2j+1]
# to int16: with activations carried as code+128 (up to 255) and weights near +-127 a pair reaches
# 64770 > 32767. Replaying that arithmetic in qflow's reference reproduced the failure seen on an
# AVX2-only CPU to three digits (KL 0.00183 per-token, 2.13e-5 per-tensor; 0.26% of the pairs
# saturate per-token, where every row reaches code 127). u8u8 (weights as w+128, zero point 128)
# goes through vpmaddwd on 16-bit values and is exact on every x86 ISA -- onnxruntime's own
# Avx2WeightS8ToU8Transformer makes the same trade. Cost, measured side by side on an AVX512-VNNI
# CPU (1 thread, K=576, N=1536): 1.1x the u8s8 time for one token, 2.4x for 512 tokens; s8s8 would
# be exact too but runs a portable kernel (19-52x). "u8s8" stays available for VNNI-only fleets.
W8A8_MATMUL = {
    "u8u8": "MatMulInteger uint8 activations (zero point 128) x uint8 weights (w+128, zero point 128): "
            "no intermediate saturation, exact int32 result on every x86 CPU",
    "u8s8": "MatMulInteger uint8 activations (zero point 128) x int8 weights: exact only on CPUs with "
            "AVX-VNNI or AVX512-VNNI; the AVX2 kernel (vpmaddubsw) saturates int16 pair sums",
}
# u8u8: every partial sum of K unsigned 8-bit products fits int32 (K * 255 * 255 < 2**31)
W8A8_MAX_K = (2**31 - 1) // (255 * 255)


class OnnxExportError(QflowError):
    """The model or checkpoint cannot be expressed in the ONNX graph."""


# ---------------------------------------------------------------------------
# model geometry
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaDims:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    tied: bool
    max_positions: int

    @classmethod
    def from_config(cls, config: Any) -> "LlamaDims":
        model_type = getattr(config, "model_type", None)
        if model_type != "llama":
            raise OnnxExportError(f"the ONNX exporter handles Llama decoders; this model is '{model_type}'",
                                  fix="export a Llama-architecture model, or use export.safetensors")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise OnnxExportError("Llama with linear biases (attention_bias/mlp_bias) is not supported by the ONNX exporter")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise OnnxExportError(f"hidden_act {config.hidden_act} is not supported (silu only)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(n_layers=config.num_hidden_layers, hidden=config.hidden_size, n_heads=heads,
                   n_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=config.intermediate_size, vocab=config.vocab_size, rms_eps=float(config.rms_norm_eps),
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   max_positions=int(config.max_position_embeddings))


def rotary_caches(config: Any, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) fp32 ``[max_positions, head_dim/2]`` from transformers' own rotary module.

    Using the model's ``LlamaRotaryEmbedding`` keeps every rope variant (theta,
    llama3 / linear / dynamic-free scaling, attention_scaling) identical to the
    reference forward.
    """
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(config=config)
    pos = torch.arange(max_positions, dtype=torch.long)[None]
    dummy = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rope(dummy, pos)
    half = cos.shape[-1] // 2
    if not torch.equal(cos[0, :, :half], cos[0, :, half:]):
        raise OnnxExportError("rotary embedding halves differ: only rotate_half (non-interleaved) rope is supported")
    return cos[0, :, :half].float().numpy().copy(), sin[0, :, :half].float().numpy().copy()


# ---------------------------------------------------------------------------
# MatMulNBits packing (METHODS.md §2.6)
# ---------------------------------------------------------------------------
NBITS_SUPPORTED = (2, 4, 8)


def _pack_fields(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 ``values`` (each < 2**bits) little-endian: element 0 in the low bits."""
    per = 8 // bits
    n = values.shape[-1]
    pad = (-n) % per
    if pad:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (pad,), np.uint8)], axis=-1)
    v = values.reshape(values.shape[:-1] + (-1, per)).astype(np.uint8)
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per):
        out |= (v[..., i] << (bits * i)).astype(np.uint8)
    return out


def pack_matmul_nbits(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int,
                      block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 ``[N, k_blocks, blob]``, scales fp32 ``[N, k_blocks]``, packed zero points or None).

    ``codes`` uint8 ``[N, K]`` (PyTorch weight order), ``scale``/``zero`` ``[N, k_blocks]``;
    ``zero=None`` means the implied ``2^(bits-1)``. The last block is padded with code 0
    (onnxruntime ignores columns past K). Zero points are packed ``[N, ceil(k_blocks*bits/8)]``
    with the same field order, unused trailing fields 0.

    >>> pack_matmul_nbits(np.arange(16, dtype=np.uint8)[None], np.ones((1, 1)), None, 4, 16)[0][0, 0, :4]
    array([16, 50, 84, 118], dtype=uint8)
    """
    if bits not in NBITS_SUPPORTED:
        raise OnnxExportError(f"MatMulNBits supports bits {NBITS_SUPPORTED} here; got {bits}")
    codes = np.asarray(codes, dtype=np.uint8)
    n, k = codes.shape
    k_blocks = math.ceil(k / block_size)
    if int(codes.max(initial=0)) >= (1 << bits):
        raise OnnxExportError(f"codes exceed {bits} bits")
    pad = k_blocks * block_size - k
    if pad:
        codes = np.concatenate([codes, np.zeros((n, pad), np.uint8)], axis=1)
    b = _pack_fields(codes.reshape(n, k_blocks, block_size), bits)
    scale = np.ascontiguousarray(np.asarray(scale, dtype=np.float32).reshape(n, k_blocks))
    zp = None
    if zero is not None:
        z = np.asarray(zero, dtype=np.float32).reshape(n, k_blocks)
        zr = np.rint(z)
        if not np.array_equal(zr, z) or zr.min(initial=0) < 0 or zr.max(initial=0) >= (1 << bits):
            raise OnnxExportError("MatMulNBits needs integer zero points in the code range "
                                  "(float zero points, e.g. HQQ's, have no exact MatMulNBits form)")
        zp = _pack_fields(zr.astype(np.uint8), bits)
    return np.ascontiguousarray(b), scale, zp


# ---------------------------------------------------------------------------
# weights of one linear, as the graph will hold them
# ---------------------------------------------------------------------------
@dataclass
class LinearWeights:
    """One (possibly packed q|k|v or gate|up) linear in graph-ready form."""

    kind: Literal["float", "nbits", "w8a8"]
    n: int
    k: int
    float_t: np.ndarray | None = None     # float: [K, N]
    b: np.ndarray | None = None           # nbits: [N, k_blocks, blob]
    scales: np.ndarray | None = None      # nbits: [N, k_blocks]; w8a8: [N]
    zero_points: np.ndarray | None = None
    bits: int = 0
    block_size: int = 0
    w_int8: np.ndarray | None = None      # w8a8: int8 [K, N]
    act_granularity: str = "token"
    perm: np.ndarray | None = None        # act-order: input columns gathered before the matmul


def unpack_internal(qweight: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """qflow's internal int32 packing (METHODS.md §2.1, ``32 // bits`` codes per word from the LSB) -> uint8 codes."""
    per = 32 // bits
    words = np.ascontiguousarray(qweight).view(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :in_features].astype(np.uint8)


def _static_group_perm(g_idx: np.ndarray, group: int, name: str) -> np.ndarray | None:
    """Column order that makes act-order groups contiguous, or None when g_idx is already i // group."""
    g_idx = np.asarray(g_idx, dtype=np.int64)
    k = g_idx.shape[0]
    if np.array_equal(g_idx, np.arange(k) // group):
        return None
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], np.arange(k) // group):
        raise OnnxExportError(f"{name}: g_idx does not assign exactly {group} columns per group, so its "
                              "act-order cannot be made static for MatMulNBits",
                              fix="quantize with act-order off (or static_groups) for ONNX export")
    return perm


def quantized_linear(ckpt: Any, name: str) -> LinearWeights:
    """A checkpoint layer as MatMulNBits (weight-only) or W8A8 (activation bits) weights."""
    from qflow.quant.ir import decode_params

    rec = ckpt.layers[name]
    spec = rec.spec
    t = ckpt.layer_tensors(name)
    n, k = rec.out_features, rec.in_features
    codes = unpack_internal(t["qweight"].numpy(), spec.bits, k)
    scale, zero = (x.numpy() for x in decode_params(spec, t))
    if spec.format != "int":
        raise OnnxExportError(f"{name}: format {spec.format} is a lookup table; MatMulNBits holds integer codes only",
                              fix="quantize with format: int for ONNX export")
    if spec.act_bits:
        if spec.act_bits != 8 or spec.bits != 8 or not spec.symmetric or spec.group_size > 0:
            raise OnnxExportError(f"{name}: activation quantization exports as W8A8 (8-bit symmetric per-channel "
                                  f"or per-tensor weights, 8-bit activations); got {spec}")
        if "g_idx" in t:
            raise OnnxExportError(f"{name}: g_idx with activation quantization is not supported")
        z = np.rint(zero).astype(np.int16)
        w = codes.astype(np.int16) - (z.reshape(n, 1) if z.size == n else z.reshape(-1)[0])
        if w.min() < -128 or w.max() > 127:
            raise OnnxExportError(f"{name}: weight codes minus zero leave int8")
        s = scale.reshape(-1).astype(np.float32)
        s = np.full(n, s[0], np.float32) if s.size == 1 else s.reshape(n)
        return LinearWeights("w8a8", n, k, w_int8=np.ascontiguousarray(w.astype(np.int8).T), scales=s,
                             act_granularity=spec.act_granularity)
    g = spec.group_size
    if g <= 0:
        raise OnnxExportError(f"{name}: group_size {g} (per-channel/per-tensor) has no MatMulNBits block size",
                              fix="use a power-of-two group size >= 16 (e.g. 32, 64, 128)")
    if g < 16 or g & (g - 1):
        raise OnnxExportError(f"{name}: MatMulNBits block_size must be a power of two >= 16; group_size is {g}",
                              fix="quantize with group_size 16, 32, 64, 128 or 256")
    if spec.bits not in NBITS_SUPPORTED:
        raise OnnxExportError(f"{name}: {spec.bits}-bit weights have no onnxruntime MatMulNBits kernel "
                              f"(supported: {NBITS_SUPPORTED})")
    perm = None
    if "g_idx" in t:
        perm = _static_group_perm(t["g_idx"].numpy(), g, name)
        if perm is not None:
            codes = codes[:, perm]
    zp_src = zero if spec.has_zero else None
    if spec.zero_float:
        raise OnnxExportError(f"{name}: float zero points (HQQ) have no exact MatMulNBits form")
    b, s, zp = pack_matmul_nbits(codes, scale, zp_src, spec.bits, g)
    return LinearWeights("nbits", n, k, b=b, scales=s, zero_points=zp, bits=spec.bits, block_size=g,
                         perm=perm)


def float_linear(w: np.ndarray) -> LinearWeights:
    w = np.asarray(w, dtype=np.float32)
    return LinearWeights("float", w.shape[0], w.shape[1], float_t=np.ascontiguousarray(w.T))


def _concat(parts: list[LinearWeights], names: list[str]) -> LinearWeights | None:
    """Pack linears sharing one input along N (q|k|v, gate|up); None when they cannot share a node."""
    first = parts[0]
    if any(p.kind != first.kind or p.k != first.k for p in parts):
        return None
    n = sum(p.n for p in parts)
    if first.kind == "float":
        return LinearWeights("float", n, first.k, float_t=np.concatenate([p.float_t for p in parts], axis=1))
    if first.kind == "w8a8":
        if any(p.act_granularity != first.act_granularity for p in parts):
            return None
        return LinearWeights("w8a8", n, first.k, w_int8=np.concatenate([p.w_int8 for p in parts], axis=1),
                             scales=np.concatenate([p.scales for p in parts]), act_granularity=first.act_granularity)
    if any(p.bits != first.bits or p.block_size != first.block_size for p in parts):
        return None
    perms = [p.perm for p in parts]
    if any((q is None) != (perms[0] is None) or (q is not None and not np.array_equal(q, perms[0])) for q in perms):
        return None
    zps = [p.zero_points for p in parts]
    if any(z is not None for z in zps):
        k_blocks = first.scales.shape[1]
        mid = 1 << (first.bits - 1)
        zps = [z if z is not None else _pack_fields(np.full((p.n, k_blocks), mid, np.uint8), first.bits)
               for z, p in zip(zps, parts)]
        zp = np.concatenate(zps, axis=0)
    else:
        zp = None
    return LinearWeights("nbits", n, first.k, b=np.concatenate([p.b for p in parts], axis=0),
                         scales=np.concatenate([p.scales for p in parts], axis=0), zero_points=zp,
                         bits=first.bits, block_size=first.block_size, perm=perms[0])


# ---------------------------------------------------------------------------
# graph writer
# ---------------------------------------------------------------------------
class _Graph:
    """Nodes + initializers; tensors above 1 KiB go to one external-data file as they are added."""

    def __init__(self, data_path: Path):
        self.nodes: list = []
        self.inits: list = []
        self.data_path = data_path
        self._f = open(data_path, "wb")
        self._offset = 0
        self._names: set[str] = set()
        self._counter = 0

    def close(self) -> None:
        self._f.close()

    def uniq(self, base: str) -> str:
        self._counter += 1
        return f"{base}_{self._counter}"

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto, helper

        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        arr = np.ascontiguousarray(array)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        raw = arr.tobytes()
        if len(raw) <= 1024:
            t.raw_data = raw
        else:
            pad = (-self._offset) % ALIGN
            if pad:
                self._f.write(b"\0" * pad)
                self._offset += pad
            self._f.write(raw)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.data_path.name), ("offset", str(self._offset)),
                               ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            self._offset += len(raw)
        self.inits.append(t)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        return self.init(self.uniq(base), np.asarray(array))

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, *, domain: str = "",
             name: str | None = None, **attrs: Any) -> list[str]:
        from onnx import helper

        node_name = name or self.uniq(op)
        if isinstance(outputs, int):
            outputs = [f"{node_name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        return outputs

    def one(self, op: str, inputs: list[str], **kw: Any) -> str:
        return self.node(op, inputs, 1, **kw)[0]


@dataclass
class ExportSettings:
    accuracy_level: int = 0          # MatMulNBits: 0 = float activations (exact weights), 4 = int8 activations
    fuse_qkv: bool = True
    fuse_gate_up: bool = True
    # fused_transposed: com.microsoft.FusedMatMul(transB=1) reads the [vocab, hidden] embedding itself
    # (tied heads share one initializer: 113 MB less for SmolLM2, same speed as MatMul measured on CPU);
    # matmul: plain MatMul over a transposed copy
    lm_head: Literal["matmul", "fused_transposed"] = "fused_transposed"
    # W8A8 integer matmul operands (W8A8_MATMUL): u8u8 is exact on every x86 CPU
    w8a8_matmul: Literal["u8u8", "u8s8"] = "u8u8"


def _linear(g: _Graph, x: str, w: LinearWeights, prefix: str, settings: ExportSettings) -> str:
    if w.perm is not None:
        x = g.one("Gather", [x, g.init(f"{prefix}.perm", w.perm.astype(np.int64))], axis=-1, name=f"{prefix}/perm")
    if w.kind == "float":
        return g.one("MatMul", [x, g.init(f"{prefix}.weight", w.float_t)], name=f"{prefix}/MatMul")
    if w.kind == "nbits":
        ins = [x, g.init(f"{prefix}.qweight", w.b), g.init(f"{prefix}.scales", w.scales)]
        if w.zero_points is not None:
            ins.append(g.init(f"{prefix}.qzeros", w.zero_points))
        return g.one("MatMulNBits", ins, domain=MS_DOMAIN, name=f"{prefix}/MatMulNBits", K=w.k, N=w.n,
                     bits=w.bits, block_size=w.block_size, accuracy_level=settings.accuracy_level)
    # w8a8: per-token (or per-tensor) dynamic SYM-R int8 activations, exactly qflow's fake_quant_activation
    qmax = np.float32(127.0)
    absx = g.one("Abs", [x], name=f"{prefix}/act_abs")
    if w.act_granularity == "token":
        amax = g.one("ReduceMax", [absx, g.const("axes", np.array([-1], np.int64))], keepdims=1,
                     name=f"{prefix}/act_amax")
    else:
        amax = g.one("ReduceMax", [absx], keepdims=0, name=f"{prefix}/act_amax")
    amax = g.one("Max", [amax, g.const("eps", np.array(1e-5, np.float32))], name=f"{prefix}/act_clamp")
    s_a = g.one("Div", [amax, g.const("qmax", np.array(qmax))], name=f"{prefix}/act_scale")
    q = g.one("Round", [g.one("Div", [x, s_a], name=f"{prefix}/act_div")], name=f"{prefix}/act_round")
    # codes clamp(round(x/s), -127, 127) carried as uint8 with zero point 128: onnxruntime's x86
    # MatMulInteger kernels take uint8 activations (s8s8 runs a portable kernel, 19-52x slower)
    q = g.one("Add", [q, g.const("offset", np.array(128.0, np.float32))], name=f"{prefix}/act_offset")
    q = g.one("Clip", [q, g.const("lo", np.array(128.0 - qmax, np.float32)),
                       g.const("hi", np.array(128.0 + qmax, np.float32))], name=f"{prefix}/act_clip")
    from onnx import TensorProto

    q8 = g.one("Cast", [q], to=TensorProto.UINT8, name=f"{prefix}/act_uint8")
    act_zero = g.const("act_zero", np.array(128, np.uint8))
    if settings.w8a8_matmul == "u8u8":
        if w.k > W8A8_MAX_K:
            raise OnnxExportError(f"{prefix}: W8A8 input width {w.k} exceeds {W8A8_MAX_K}, where the exact u8u8 "
                                  "MatMulInteger's int32 partial sums could overflow",
                                  fix="export this model with weight-only quantization (MatMulNBits)")
        w_u8 = (w.w_int8.astype(np.int16) + 128).astype(np.uint8)    # see W8A8_MATMUL
        acc = g.one("MatMulInteger", [q8, g.init(f"{prefix}.weight_uint8", w_u8), act_zero,
                                      g.const("w_zero", np.array(128, np.uint8))], name=f"{prefix}/MatMulInteger")
    else:
        acc = g.one("MatMulInteger", [q8, g.init(f"{prefix}.weight_int8", w.w_int8), act_zero],
                    name=f"{prefix}/MatMulInteger")
    y = g.one("Cast", [acc], to=TensorProto.FLOAT, name=f"{prefix}/acc_float")
    y = g.one("Mul", [y, s_a], name=f"{prefix}/act_rescale")
    return g.one("Mul", [y, g.init(f"{prefix}.weight_scale", w.scales)], name=f"{prefix}/w_rescale")


@dataclass
class ExportInfo:
    model_path: Path
    data_path: Path
    mode: str
    dims: dict
    linear_kinds: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    variants: dict[int, Path] = field(default_factory=dict)   # accuracy level -> graph file (same data file)

    def to_json(self) -> dict:
        out = {"model": self.model_path.name, "data": self.data_path.name, "mode": self.mode, "dims": self.dims,
               "linear_kinds": self.linear_kinds, "settings": self.settings,
               "accuracy_variants": {str(k): v.name for k, v in self.variants.items()}}
        if self.linear_kinds.get("w8a8"):
            path = self.settings.get("w8a8_matmul", "u8u8")
            out["w8a8_matmul"] = {"path": path, "why": W8A8_MATMUL[path]}
        return out


LINEARS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


class _FloatSource:
    """Float tensors of the base folder, with the checkpoint's float deltas (AWQ-folded norms) on top."""

    def __init__(self, model_dir: Path, ckpt: Any | None):
        from qflow.quant.weights import weight_files

        self.files = weight_files(model_dir)
        self.delta = dict(ckpt.floats) if ckpt is not None else {}
        self.ckpt = ckpt

    def has(self, key: str) -> bool:
        return key in self.files or key in self.delta

    def get(self, key: str) -> np.ndarray:
        if key in self.delta:
            return self.ckpt.float_tensor(key).float().numpy()
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as h:
            return h.get_tensor(key).float().numpy()


def build_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, ckpt: Any | None = None,
               mode: Literal["quantized", "float"] = "quantized", settings: ExportSettings | None = None,
               filename: str = "model.onnx", max_positions: int | None = None) -> ExportInfo:
    """Write ``out_dir/filename`` (+ ``filename.data``): the decoder with a KV cache.

    ``mode="quantized"`` turns each checkpoint layer into MatMulNBits / W8A8 nodes;
    ``mode="float"`` writes the same graph with fp32 ``MatMul`` weights (the checkpoint's
    dequantized weights when ``ckpt`` is given, else the base model's).
    """
    import onnx
    from onnx import TensorProto, helper
    from transformers import AutoConfig

    settings = settings or ExportSettings()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "quantized" and ckpt is None:
        raise OnnxExportError("a quantized export needs a checkpoint")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    dims = LlamaDims.from_config(config)
    max_pos = int(max_positions or dims.max_positions)
    src = _FloatSource(model_dir, ckpt)
    layers = ckpt.layers if ckpt is not None else {}
    unknown = [n for n in layers if not any(n == f"model.layers.{i}.{s}" for i in range(dims.n_layers)
                                            for group in LINEARS.values() for s in group)]
    if unknown:
        raise OnnxExportError(f"checkpoint quantizes layers outside the decoder linears: {unknown[:3]}")

    model_path = out_dir / filename
    data_path = out_dir / (filename + DATA_SUFFIX)
    g = _Graph(data_path)
    kinds: dict[str, int] = {}

    def weights_of(name: str) -> LinearWeights:
        if name in layers and mode == "quantized":
            w = quantized_linear(ckpt, name)
        elif name in layers:
            w = float_linear(ckpt.dequantized(name).numpy())
        else:
            w = float_linear(src.get(name + ".weight"))
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
        return w

    def linear_group(x: str, i: int, group: str, fuse: bool) -> list[str]:
        names = [f"model.layers.{i}.{s}" for s in LINEARS[group]]
        parts = [weights_of(n) for n in names]
        if fuse and len(parts) > 1:
            packed = _concat(parts, names)
            if packed is not None:
                return [_linear(g, x, packed, f"model.layers.{i}.{group}", settings)]
        return [_linear(g, x, w, n, settings) for w, n in zip(parts, names)]

    try:
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", dims.vocab])]
        kv_shape = ["batch_size", dims.n_kv_heads, "past_sequence_length", dims.head_dim]
        present_shape = ["batch_size", dims.n_kv_heads, "total_sequence_length", dims.head_dim]
        for i in range(dims.n_layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32, kv_shape))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32, present_shape))

        # attention bookkeeping shared by every layer: seqlens_k = sum(mask) - 1, total = mask width
        mask_sum = g.one("ReduceSum", ["attention_mask", g.const("axes", np.array([1], np.int64))], keepdims=0,
                         name="attn_mask/sum")
        seqlens = g.one("Cast", [g.one("Sub", [mask_sum, g.const("one", np.array(1, np.int64))],
                                       name="attn_mask/sub")], to=TensorProto.INT32, name="attn_mask/seqlens_k")
        total = g.one("Cast", [g.one("Gather", [g.one("Shape", ["attention_mask"], name="attn_mask/shape"),
                                                g.const("idx", np.array(1, np.int64))], axis=0,
                                     name="attn_mask/total_i64")], to=TensorProto.INT32, name="attn_mask/total")
        cos, sin = rotary_caches(config, max_pos)
        g.init("rotary.cos_cache", cos)
        g.init("rotary.sin_cache", sin)

        embed = g.init("model.embed_tokens.weight", src.get("model.embed_tokens.weight"))
        h = g.one("Gather", [embed, "input_ids"], axis=0, name="model.embed_tokens/Gather")
        residual = h
        pending = None   # output of the previous block, to be added to the residual in the next norm

        def norm(weight_key: str, name: str) -> str:
            nonlocal residual, pending
            gamma = g.init(weight_key, src.get(weight_key))
            if pending is None:
                # plain ONNX ops (checker-clean); onnxruntime fuses them into SimplifiedLayerNormalization
                sq = g.one("Pow", [residual, g.const("two", np.array(2.0, np.float32))], name=f"{name}/Pow")
                var = g.one("ReduceMean", [sq, g.const("axes", np.array([-1], np.int64))], keepdims=1,
                            name=f"{name}/ReduceMean")
                var = g.one("Add", [var, g.const("eps", np.array(dims.rms_eps, np.float32))], name=f"{name}/Add")
                normed = g.one("Div", [residual, g.one("Sqrt", [var], name=f"{name}/Sqrt")], name=f"{name}/Div")
                return g.one("Mul", [normed, gamma], name=f"{name}/Mul")
            out, _, _, summed = g.node("SkipSimplifiedLayerNormalization", [pending, residual, gamma],
                                       [f"{name}/out", "", "", f"{name}/residual"], domain=MS_DOMAIN,
                                       epsilon=dims.rms_eps, name=name)
            residual, pending = summed, None
            return out

        # SkipSimplifiedLayerNormalization's unused optional outputs are empty names
        for i in range(dims.n_layers):
            p = f"model.layers.{i}"
            x = norm(f"{p}.input_layernorm.weight", f"{p}/input_layernorm")
            qkv = linear_group(x, i, "attn", settings.fuse_qkv)
            q, k, v = (qkv[0], "", "") if len(qkv) == 1 else qkv
            attn = g.node("GroupQueryAttention",
                          [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
                           "rotary.cos_cache", "rotary.sin_cache"],
                          [f"{p}/attn/out", f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
                          name=f"{p}/attn/GroupQueryAttention", num_heads=dims.n_heads, kv_num_heads=dims.n_kv_heads,
                          scale=1.0 / math.sqrt(dims.head_dim), do_rotary=1, rotary_interleaved=0)[0]
            pending = linear_group(attn, i, "o", False)[0]
            x = norm(f"{p}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm")
            gu = linear_group(x, i, "gate_up", settings.fuse_gate_up)
            if len(gu) == 1:
                gate, up = g.node("Split", [gu[0], g.const("split", np.array([dims.intermediate] * 2, np.int64))], 2,
                                  axis=-1, name=f"{p}/mlp/Split")
            else:
                gate, up = gu
            act = g.one("Mul", [gate, g.one("Sigmoid", [gate], name=f"{p}/mlp/sigmoid")], name=f"{p}/mlp/silu")
            act = g.one("Mul", [act, up], name=f"{p}/mlp/act_mul")
            pending = linear_group(act, i, "down", False)[0]
        x = norm("model.norm.weight", "model/norm")
        if dims.tied or not src.has("lm_head.weight"):
            head = None
        else:
            head = src.get("lm_head.weight")
        if settings.lm_head == "fused_transposed":
            w_name = embed if head is None else g.init("lm_head.weight", head)
            g.node("FusedMatMul", [x, w_name], ["logits"], domain=MS_DOMAIN, transB=1, name="lm_head/FusedMatMul")
        else:
            w = head if head is not None else src.get("model.embed_tokens.weight")
            g.node("MatMul", [x, g.init("lm_head.weight_t", np.ascontiguousarray(w.T))], ["logits"],
                   name="lm_head/MatMul")
    finally:
        g.close()

    graph = helper.make_graph(g.nodes, "qflow_llama_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="qflow", ir_version=10)
    meta = {"qflow.mode": mode, "qflow.dims": json.dumps(asdict(dims)), "qflow.settings": json.dumps(asdict(settings))}
    if ckpt is not None:
        meta["qflow.method"] = str(getattr(ckpt, "method", ""))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = model_path.with_suffix(".onnx.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, model_path)
    return ExportInfo(model_path=model_path, data_path=data_path, mode=mode, dims=asdict(dims), linear_kinds=kinds,
                      settings=asdict(settings))


def write_accuracy_variant(model_path: str | os.PathLike, new_path: str | os.PathLike, accuracy_level: int) -> Path:
    """Copy of a written graph whose MatMulNBits nodes use ``accuracy_level``; it shares the same data file.

    The two graphs differ only in that attribute, so both sit beside one ``.data`` file.
    """
    import onnx
    from onnx import helper

    model_path, new_path = Path(model_path), Path(new_path)
    if new_path.parent.resolve() != model_path.parent.resolve():
        raise ValueError("an accuracy variant must sit beside the model (it shares its external data file)")
    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", int(accuracy_level))])
    settings = next((p for p in model.metadata_props if p.key == "qflow.settings"), None)
    if settings is not None:
        data = json.loads(settings.value)
        data["accuracy_level"] = int(accuracy_level)
        settings.value = json.dumps(data)
    tmp = new_path.with_suffix(".onnx.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, new_path)
    return new_path


def has_nbits(model_path: str | os.PathLike) -> bool:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(n.op_type == "MatMulNBits" for n in model.graph.node)


def export_quantized(model_dir: str | os.PathLike, out_dir: str | os.PathLike, ckpt: Any, *, accuracy_level: int = 4,
                     other_level: int | None = 0, settings: ExportSettings | None = None,
                     max_positions: int | None = None) -> ExportInfo:
    """The quantized graph at ``accuracy_level`` (``model.onnx``) and, when it has MatMulNBits
    nodes, the same graph at ``other_level`` (``model_acc{other}.onnx``, same data file).

    ``info.variants`` maps accuracy level -> graph file; a graph without MatMulNBits
    (W8A8) maps every requested level to ``model.onnx``.
    """
    base = settings or ExportSettings()
    s = ExportSettings(**{**asdict(base), "accuracy_level": int(accuracy_level)})
    info = build_onnx(model_dir, out_dir, ckpt=ckpt, mode="quantized", settings=s, max_positions=max_positions)
    paths = {int(accuracy_level): info.model_path}
    if other_level is not None and int(other_level) != int(accuracy_level):
        if info.linear_kinds.get("nbits"):
            paths[int(other_level)] = write_accuracy_variant(
                info.model_path, info.model_path.with_name(f"model_acc{int(other_level)}.onnx"), int(other_level))
        else:
            paths[int(other_level)] = info.model_path
    info.variants = paths
    return info
