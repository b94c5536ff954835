"""ONNX nodes and initializers: the graph writer and the nodes of one linear.

:class:`GraphWriter` collects nodes and initializers and streams every tensor above
1 KiB to one external-data file as it is added, so the in-memory graph stays small.
:func:`linear_nodes` turns one :class:`~qflow.export.onnx_weights.LinearWeights`
into nodes. A linear is one of three kinds:

* ``float``  -- ``MatMul`` with fp32 ``[K, N]`` weights (float export, or layers
  the checkpoint leaves float);
* ``nbits``  -- ``com.microsoft.MatMulNBits`` carrying qflow's own codes, scales and
  zero points (docs/METHODS.md §2.6), bit for bit: no re-quantization by onnxruntime;
* ``w8a8``   -- SmoothQuant W8A8: per-token dynamic SYM-R int8 activations computed
  with plain ops (``ReduceMax(Abs)``, ``Div``, ``Round``, ``Clip``, ``Cast``; carried
  as uint8 with zero point 128), int8 per-channel weights, ``MatMulInteger`` and a
  float rescale. The codes are exactly :func:`qflow.quant.qlinear.fake_quant_activation`'s
  and the integer matmul is exact on every x86 CPU (see :data:`W8A8_MATMUL`); the only
  residual difference to qflow is fp32 summation order (exact int32 accumulation here).

The Llama decoder built from these is :mod:`qflow.export.onnx_graph`.

Example::

    g = GraphWriter(out / "model.onnx.data")
    y = linear_nodes(g, "x", float_linear(w), "model.layers.0.mlp.down_proj", ExportSettings())
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .onnx_weights import LinearWeights, OnnxExportError

MS_DOMAIN = "com.microsoft"
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


class GraphWriter:
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


def linear_nodes(g: GraphWriter, x: str, w: LinearWeights, prefix: str, settings: ExportSettings) -> str:
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
