"""Map one IR layer onto an exported layout: tensors plus how faithful the mapping is.

qflow's IR stores unsigned codes ``q`` with a scale ``s`` and zero ``z`` per group,
``w = s * (q - z)`` (symmetric specs: ``z = 2^(b-1)``). Each function here turns
one layer into a layout's tensors and says which of three things happened:

``exact``    the layout holds the IR's numbers: decoding it in fp32 gives the IR's
             dequantized weight bit for bit (checked by the exporter).
``rounded``  the layout holds the IR's codes but not all of its parameters: HQQ's
             fractional zero points rounded to integers, scales not representable in
             the layout's scale dtype, GPTQ v1 zero points clamped to >= 1. The extra
             error is reported (SQNR of the export vs the IR dequant).
``float``    the layout cannot hold the layer at all (nf4/fp4, bit widths or group
             shapes it lacks); with ``on_unsupported: float`` the dequantized weight is
             written as a plain float Linear and listed as unquantized.

What maps exactly (int format):

=====================  ======================================  ==========================
layout                 exact for                               not representable
=====================  ======================================  ==========================
compressed-tensors     2-8 bits; group (in % G == 0), channel,  nf4/fp4, partial last
                       tensor; sym_f/sym_r/asym_z/asym_a;       group; float zeros
                       act-order g_idx (``weight_g_idx``);      (rounded); scales not
                       W8A8 (``int-quantized`` + dynamic        representable in the
                       per-token activations)                   model dtype (rounded)
AutoAWQ GEMM           4 bits, group G, out % 8 == 0            other bits, channel/tensor,
                                                                g_idx; non-fp16 scales
GPTQ v1 (``gptq``)     2/3/4/8 bits, group/channel/tensor,      zero point 0 (v1 stores
                       g_idx                                    z-1): use v2 or clamp
=====================  ======================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import layouts


class Unsupported(Exception):
    """The layout cannot represent this layer (the message says why)."""


class Inexact(Exception):
    """The layout can hold the layer only approximately and the caller asked for an error."""


@dataclass
class IRLayer:
    """One quantized linear as numpy arrays (from ``Checkpoint.params``)."""

    name: str
    spec: Any                       # QuantSpec
    codes: np.ndarray               # uint8 [out, in]
    scale: np.ndarray               # float32 [out, n_groups] ([1, 1] per tensor)
    zero: np.ndarray                # float32, same shape
    g_idx: np.ndarray | None        # int32 [in] or None

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def group(self) -> int:
        return self.spec.effective_group(self.in_features) if self.spec.group_size != 0 else self.in_features

    def column_groups(self) -> np.ndarray:
        """Group index of every input column, ``[in]`` int64."""
        if self.g_idx is not None:
            return self.g_idx.astype(np.int64)
        if self.spec.group_size == 0:
            return np.zeros(self.in_features, np.int64)
        return np.arange(self.in_features) // self.group

    def per_channel_params(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero) as ``[out, n_groups]`` with per-tensor params broadcast over rows."""
        s, z = self.scale, self.zero
        if self.spec.group_size == 0:
            s = np.broadcast_to(s.reshape(1, 1), (self.out_features, 1))
            z = np.broadcast_to(z.reshape(1, 1), (self.out_features, 1))
        return np.ascontiguousarray(s, np.float32), np.ascontiguousarray(z, np.float32)

    def dequantized(self) -> np.ndarray:
        """fp32 ``[out, in]``: ``(q - z) * s`` exactly as qflow computes it."""
        s, z = self.per_channel_params()
        g = self.column_groups()
        if self.spec.format != "int":
            from qflow.quant.affine import FP4_TABLE, NF4_TABLE

            table = np.asarray(NF4_TABLE if self.spec.format == "nf4" else FP4_TABLE, np.float32)
            return table[self.codes.astype(np.int64)] * s[:, g]
        return (self.codes.astype(np.float32) - z[:, g]) * s[:, g]


def base_tensors(ckpt) -> Iterator[tuple[str, str | None, Any]]:
    """Every tensor of the base model, file by file in the base's order: ``(key, layer, handle)``.

    ``layer`` is the IR layer whose weight ``key`` is (None for every other tensor);
    ``handle`` is the open safetensors file (for :func:`float_tensor` or a shape).
    """
    from safetensors import safe_open

    from qflow.quant.weights import weight_files

    files = weight_files(Path(ckpt.base_model))
    for f in dict.fromkeys(files.values()):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                yield key, (module if module in ckpt.layers else None), h


def float_tensor(ckpt, key: str, handle):
    """A tensor the IR does not quantize: its float delta (e.g. an AWQ-folded norm), else the base model's."""
    return ckpt.float_tensor(key) if key in ckpt.floats else handle.get_tensor(key)


def load_ir_layer(ckpt, name: str) -> IRLayer:
    codes, scale, zero = ckpt.params(name)
    t = ckpt.layer_tensors(name)
    g_idx = t["g_idx"].numpy().astype(np.int32) if "g_idx" in t else None
    return IRLayer(name, ckpt.layers[name].spec, codes.numpy(), scale.float().numpy(), zero.float().numpy(), g_idx)


@dataclass
class Mapped:
    status: str                                 # exact | rounded | float
    tensors: dict[str, np.ndarray]              # suffix -> array ("weight" for float)
    scheme: dict[str, Any] | None = None        # layout-level description (config group key)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- helpers

_NP_DTYPES = {"float16": np.float16, "float32": np.float32}


def cast_scale(scale: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    """``scale`` stored as ``dtype`` (float16/bfloat16/float32) and whether that is exact.

    bfloat16 is returned as float32 values already rounded to bf16 (the caller
    converts through torch); the flag compares the rounded values with the IR's.
    """
    if dtype == "bfloat16":
        import torch

        rounded = torch.from_numpy(np.ascontiguousarray(scale, np.float32)).to(torch.bfloat16).float().numpy()
    else:
        rounded = scale.astype(_NP_DTYPES[dtype]).astype(np.float32)
    ok = bool(np.array_equal(rounded, scale.astype(np.float32)) and np.all(np.isfinite(rounded))
              and np.all(rounded > 0))
    return rounded, ok


def fp16_scale(layer: IRLayer, scale: np.ndarray, on_inexact: str, notes: list[str]) -> tuple[np.ndarray, bool]:
    """``scale`` rounded to fp16 (AutoAWQ / GPTQ store fp16 scales) and whether that is exact."""
    s16, ok = cast_scale(scale, "float16")
    if not ok:
        msg = f"{layer.name}: {layer.spec.scale_dtype} scales are not all representable in fp16; rounded"
        if on_inexact == "error":
            raise Inexact(msg)
        notes.append(msg)
    return s16, ok


def integer_zero(layer: IRLayer, on_inexact: str, notes: list[str], *, lo: int = 0) -> tuple[np.ndarray, bool]:
    """Integer zero points ``[out, n_groups]`` (``round`` of fractional ones) and whether exact."""
    _, z = layer.per_channel_params()
    zi = np.clip(np.rint(z), lo, layer.spec.qmax)
    exact = bool(np.array_equal(zi, z))
    if not exact:
        frac = float(np.mean(zi != z))
        msg = (f"{layer.name}: {frac:.1%} of zero points are not integers in [{lo}, {layer.spec.qmax}] "
               f"({'float zeros (HQQ)' if layer.spec.zero_float else 'out of range'}); rounded")
        if on_inexact == "error":
            raise Inexact(msg)
        notes.append(msg)
    return zi.astype(np.int64), exact


def _need_int(layer: IRLayer, layout: str) -> None:
    if layer.spec.format != "int":
        raise Unsupported(f"{layout} stores integer codes; {layer.spec.format} (a lookup-table format) has no "
                          f"{layout} layout")


def _need_whole_groups(layer: IRLayer, layout: str) -> None:
    if layer.spec.group_size > 0 and layer.in_features % layer.spec.group_size:
        raise Unsupported(f"{layout} needs in_features % group_size == 0; {layer.in_features} % "
                          f"{layer.spec.group_size} != 0 (pad_last_group)")


# ---------------------------------------------------------------- compressed-tensors


def to_compressed_tensors(layer: IRLayer, dtype: str, on_inexact: str = "round") -> Mapped:
    """compressed-tensors tensors (``weight_packed`` / ``weight_scale`` / ...) of one layer.

    ``dtype`` is the model dtype the scales are stored in. Weight-only layers use
    ``pack-quantized``; layers with activation quantization use ``int-quantized``
    (an int8 ``weight`` tensor), the format vLLM's W8A8 kernels read.
    """
    _need_int(layer, "compressed-tensors")
    _need_whole_groups(layer, "compressed-tensors")
    spec, bits = layer.spec, layer.spec.bits
    notes: list[str] = []
    half = 1 << (bits - 1)
    strategy = spec.granularity  # group | channel | tensor
    exact = True
    s = layer.scale.astype(np.float32)
    s_store, ok = cast_scale(s, dtype)
    if not ok:
        msg = f"{layer.name}: scales ({spec.scale_dtype}) are not all representable in {dtype}; rounded"
        if on_inexact == "error":
            raise Inexact(msg)
        notes.append(msg)
        exact = False
    if strategy == "tensor":
        s_store = s_store.reshape(1)
    tensors: dict[str, np.ndarray] = {}
    weights = {"num_bits": bits, "type": "int", "symmetric": bool(spec.symmetric), "strategy": strategy,
               "group_size": spec.group_size if strategy == "group" else None, "dynamic": False,
               "actorder": "group" if layer.g_idx is not None else None}
    codes = layer.codes
    if not spec.symmetric:
        zi, z_ok = integer_zero(layer, on_inexact, notes)
        exact = exact and z_ok
    else:
        zi = None
    act = None
    if spec.act_bits:
        if not spec.symmetric:
            raise Unsupported("compressed-tensors int-quantized (W8A8) export covers symmetric weights only")
        act = {"num_bits": spec.act_bits, "type": "int", "symmetric": True, "dynamic": True,
               "strategy": "token" if spec.act_granularity == "token" else "tensor"}
        fmt = "int-quantized"
        tensors["weight"] = (codes.astype(np.int16) - half).astype(np.int8)
    else:
        fmt = "pack-quantized"
        # field = signed q + 2^(b-1) = qflow's unsigned code (symmetric: z = 2^(b-1); asym: zp = z - 2^(b-1))
        tensors["weight_packed"] = layouts.pack_stream(codes, bits)
        tensors["weight_shape"] = np.array([layer.out_features, layer.in_features], np.int64)
    tensors["weight_scale"] = s_store
    if zi is not None:
        if strategy == "tensor":
            tensors["weight_zero_point"] = (zi.reshape(-1)[:1] - half).astype(np.int8)
        elif fmt == "pack-quantized":
            tensors["weight_zero_point"] = layouts.pack_stream(zi.astype(np.uint8), bits, axis=0)
        else:
            tensors["weight_zero_point"] = (zi - half).astype(np.int8)
    if layer.g_idx is not None:
        tensors["weight_g_idx"] = layer.g_idx.astype(np.int32)
    scheme = {"format": fmt, "weights": weights, "input_activations": act}
    return Mapped("exact" if exact else "rounded", tensors, scheme, notes)


# ---------------------------------------------------------------- AutoAWQ GEMM


def to_awq_gemm(layer: IRLayer, on_inexact: str = "round") -> Mapped:
    """AutoAWQ GEMM tensors ``qweight [in, out/8]``, ``qzeros [in/G, out/8]``, ``scales fp16 [in/G, out]``."""
    _need_int(layer, "AutoAWQ GEMM")
    spec = layer.spec
    if spec.bits != 4:
        raise Unsupported(f"AutoAWQ GEMM is 4-bit only; the layer is {spec.bits}-bit")
    if spec.group_size <= 0:
        raise Unsupported("AutoAWQ GEMM needs a positive group size (per-channel/per-tensor layers do not map)")
    _need_whole_groups(layer, "AutoAWQ GEMM")
    if layer.g_idx is not None:
        raise Unsupported("AutoAWQ GEMM has no g_idx (act-order GPTQ layers do not map)")
    if layer.out_features % 8:
        raise Unsupported(f"AutoAWQ GEMM packs 8 output columns per word; out_features {layer.out_features}")
    if spec.act_bits:
        raise Unsupported("AutoAWQ GEMM is weight-only; the layer quantizes activations")
    notes: list[str] = []
    s, exact = fp16_scale(layer, layer.scale, on_inexact, notes)
    zi, z_ok = integer_zero(layer, on_inexact, notes)
    exact = exact and z_ok
    tensors = {
        "qweight": layouts.pack_awq(np.ascontiguousarray(layer.codes.T)),
        "qzeros": layouts.pack_awq(np.ascontiguousarray(zi.T.astype(np.uint8))),
        "scales": np.ascontiguousarray(s.T).astype(np.float16),
    }
    scheme = {"bits": 4, "group_size": spec.group_size, "zero_point": True, "version": "gemm"}
    return Mapped("exact" if exact else "rounded", tensors, scheme, notes)


# ---------------------------------------------------------------- GPTQ


def to_gptq(layer: IRLayer, checkpoint_format: str = "gptq", on_inexact: str = "round") -> Mapped:
    """GPTQ tensors ``qweight [in*b/32, out]``, ``qzeros [n_groups, out*b/32]``, ``scales``, ``g_idx``.

    ``checkpoint_format="gptq"`` (v1) stores ``z - 1`` (kernels add 1 back); a zero
    point of 0 cannot be stored and is clamped to 1 (``rounded``, with a note).
    ``"gptq_v2"`` stores true zeros.
    """
    _need_int(layer, "GPTQ")
    spec = layer.spec
    if spec.bits not in (2, 3, 4, 8):
        raise Unsupported(f"GPTQ packs 2, 3, 4 or 8 bits; the layer is {spec.bits}-bit")
    _need_whole_groups(layer, "GPTQ")
    if spec.act_bits:
        raise Unsupported("GPTQ is weight-only; the layer quantizes activations")
    notes: list[str] = []
    s, z = layer.per_channel_params()  # per-tensor -> per-channel with one repeated scale (exact)
    s16, exact = fp16_scale(layer, s, on_inexact, notes)
    v1 = checkpoint_format == "gptq"
    zi, z_ok = integer_zero(layer, on_inexact, notes)
    exact = exact and z_ok
    if v1 and np.any(zi < 1):
        msg = (f"{layer.name}: {float(np.mean(zi < 1)):.1%} of groups have zero point 0, which GPTQ v1 cannot store "
               "(it stores z-1); clamped to 1 (write checkpoint_format gptq_v2 for true zeros)")
        if on_inexact == "error":
            raise Inexact(msg)
        notes.append(msg)
        zi = np.maximum(zi, 1)
        exact = False
    stored = (zi - 1 if v1 else zi).astype(np.int64) & spec.qmax
    g = layer.column_groups().astype(np.int32)
    tensors = {
        "qweight": layouts.pack_stream(np.ascontiguousarray(layer.codes.T), spec.bits, axis=0),
        "qzeros": layouts.pack_stream(np.ascontiguousarray(stored.T.astype(np.uint8)), spec.bits),
        "scales": np.ascontiguousarray(s16.T).astype(np.float16),
        "g_idx": g,
    }
    group_size = spec.group_size if spec.group_size > 0 else -1
    scheme = {"bits": spec.bits, "group_size": group_size, "sym": bool(spec.symmetric),
              "desc_act": layer.g_idx is not None, "checkpoint_format": checkpoint_format}
    return Mapped("exact" if exact else "rounded", tensors, scheme, notes)


def to_float(layer: IRLayer, reason: str) -> Mapped:
    return Mapped("float", {"weight": layer.dequantized()}, None, [f"{layer.name}: written as float ({reason})"])
