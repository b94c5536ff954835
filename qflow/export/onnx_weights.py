"""Weights of the ONNX decoder: each linear of a checkpoint or base model in graph-ready form.

* :func:`quantized_linear` -- a checkpoint layer as ``com.microsoft.MatMulNBits`` blobs
  (qflow's codes, scales and zero points packed exactly, docs/METHODS.md §2.6) or as W8A8
  int8 weights with per-channel scales (SmoothQuant layers);
* :func:`float_linear` -- fp32 ``[K, N]`` for ``MatMul``;
* :func:`concat_linears` -- q|k|v or gate|up packed along N, when they can share one node;
* :class:`FloatSource` -- float tensors of the base folder with the checkpoint's float
  deltas (AWQ-folded norms) on top.

The graph that uses them is built in :mod:`qflow.export.onnx_graph`.

Example::

    w = quantized_linear(Checkpoint(ir_dir), "model.layers.0.mlp.down_proj")
    w.kind, w.b.shape          # "nbits", (N, k_blocks, block_size * bits // 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import QflowError


class OnnxExportError(QflowError):
    """The model or checkpoint cannot be expressed in the ONNX graph."""


# ---------------------------------------------------------------------------
# MatMulNBits packing (docs/METHODS.md §2.6)
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
    from qflow.quant.packing import unpack_reference

    rec = ckpt.layers[name]
    spec = rec.spec
    t = ckpt.layer_tensors(name)
    n, k = rec.out_features, rec.in_features
    codes = unpack_reference(t["qweight"], spec.bits, k).numpy()
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


def concat_linears(parts: list[LinearWeights], names: list[str]) -> LinearWeights | None:
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


class FloatSource:
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
