"""numba CPU kernels for quantize, dequantize, fake quant, pack and unpack, bit-exact with the torch reference.

numpy in, numpy out: weights ``[out, in]`` float32, parameters
``[out, n_groups]`` float32 (``[1, 1]`` per tensor), codes uint8, packed words
int32 in qflow's internal layout (docs/METHODS.md §2.1). What to do is told by a
:class:`~qflow.kernels.params.KernelParams` (plain numbers) and, for the lookup
formats, the 16 code values as an array; the quant core's dispatcher
(qflow/quant/dispatch.py) builds both from a QuantSpec. Codes, scales, zeros
and reconstructions equal ``qflow.quant.affine`` / ``qflow.quant.packing`` bit
for bit for finite inputs (a zero point may differ only in the sign of 0.0, which
no reconstruction sees). To stay exact the kernels repeat the reference's fp32
steps in its order: ``w / scale`` (a true division, never a reciprocal),
round half to even, ``(float(code) - zero) * scale``; no fastmath, so LLVM may
not reassociate, contract to FMA or flush subnormals.

Example::

    params = KernelParams(bits=4, group_size=64, scheme=SCHEMES["asym_z"], scale_dtype=SCALE_DTYPES["float16"],
                          float_zero=False)
    scale, zero = compute_params(w, params)
    packed = pack(quantize(w, scale, zero, params), params.bits)
    w_hat = dequantize_packed(packed, scale, zero, params, w.shape[1])
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from . import configure_numba

configure_numba()  # before the first numba import: it reads NUMBA_CACHE_DIR once

from numba import njit, prange, uint64  # noqa: E402

from .params import LOOKUPS, PACK_BITS, SCALE_DTYPES, SCHEMES, KernelParams, packed_words, per_word  # noqa: E402

if not np.little_endian:  # the byte views of packed words below assume little-endian words
    raise ImportError("qflow.kernels.cpu needs a little-endian CPU")

_JIT = dict(parallel=True, cache=True, fastmath=False)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_AWQ_MIN = np.float32(1e-5)  # the reference's range/amax clamp, as the fp32 value torch compares with
_TINY = np.float32(2.0 ** -24)  # affine._TINY: replaces a non-finite or zero rounded scale
# KernelParams.scheme -> the scheme id the jitted code below branches on (asym_a and asym_h share one rule)
_SCHEME = {SCHEMES["asym_z"]: 0, SCHEMES["asym_a"]: 1, SCHEMES["asym_h"]: 1, SCHEMES["sym_f"]: 2,
           SCHEMES["sym_r"]: 3}
_ABSMAX = 4  # nf4 / fp4
_NO_TABLE = np.zeros(16, np.float32)


def _lookup_table(params: KernelParams, table) -> np.ndarray:
    """The 16 fp32 code values a lookup format needs (``_NO_TABLE`` for an affine one)."""
    if params.lookup == LOOKUPS["none"]:
        return _NO_TABLE
    if table is None:
        raise ValueError("a lookup format (nf4/fp4) needs its 16 code values: pass table=")
    table = np.array(table, dtype=np.float32)  # a private writable copy: one compiled signature, no aliasing
    if table.shape != (16,):
        raise ValueError(f"table must hold the 16 code values of a 4-bit lookup format; got shape {table.shape}")
    return table


# ---- group parameters --------------------------------------------------------

@njit(**_JIT)
def _group_range(w, group, lo, hi):
    """Per-group min and max (NaN if the group holds a NaN, like torch.amin/amax)."""
    rows, cols = w.shape
    for r in prange(rows):
        row = w[r]
        for g in range(lo.shape[1]):
            start = g * group
            mn = row[start]
            mx = mn
            nan = False
            for c in range(uint64(start + 1), uint64(min(start + group, cols))):
                v = row[c]
                nan |= v != v
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            if nan or mn != mn:
                mn = np.float32(np.nan)
                mx = mn
            lo[r, g] = mn
            hi[r, g] = mx


@njit
def _fmax(a, b):
    """torch.maximum for two floats: NaN wins."""
    return a if (a > b or a != a) else b


@njit(cache=True)
def _raw_params(lo, hi, scheme, qmax, half):
    """(unrounded scale, range low end) per group (1-D); the low end is what the zero rule reads."""
    scale = np.empty_like(lo)
    low = np.empty_like(lo)
    for i in range(lo.shape[0]):
        mn = lo[i]
        mx = hi[i]
        if scheme == 0:  # asym_z: range extended to include 0; GPTQ's guard for an all-zero group
            if mn > _F0:
                mn = _F0
            if mx < _F0:
                mx = _F0
            if mn == _F0 and mx == _F0:
                mn = -_F1
                mx = _F1
            s = (mx - mn) / qmax
        elif scheme == 1:  # asym_a / asym_h
            d = mx - mn
            if d < _AWQ_MIN:
                d = _AWQ_MIN
            s = d / qmax
        else:
            amax = _fmax(abs(mn), abs(mx))
            if scheme == 2:  # sym_f
                if amax == _F0:
                    amax = _F1
                s = _F2 * amax / qmax
            elif scheme == 3:  # sym_r
                if amax < _AWQ_MIN:
                    amax = _AWQ_MIN
                s = amax / (half - _F1)
            else:  # absmax of nf4/fp4
                s = amax if amax > _F0 else _F1
        scale[i] = s
        low[i] = mn
    return scale, low


@njit(cache=True)
def _zero_points(low, scale, scheme, zero_float, qmax, half):
    """Zero point per group (1-D) from the rounded scale (zero_float: before its fp16 rounding)."""
    zero = np.empty_like(low)
    for i in range(low.shape[0]):
        mn = low[i]
        s = scale[i]
        if scheme == 0:
            z = np.rint(-mn / s)
        elif scheme == 1:
            if zero_float:
                zero[i] = -mn / s
                continue
            z = -np.rint(mn / s)
        elif scheme == 4:
            zero[i] = _F0
            continue
        else:
            zero[i] = half
            continue
        if z < _F0:  # torch.clamp keeps its input on ties (keeps -0.0), so test that way round
            z = _F0
        if z > qmax:
            z = qmax
        zero[i] = z
    return zero


def _round_to_dtype(x: np.ndarray, dtype: int) -> np.ndarray:
    """fp32 -> ``dtype`` (a ``SCALE_DTYPES`` code) -> fp32 with round-to-nearest-even, as torch's ``.to(dtype).float()``."""
    if dtype == SCALE_DTYPES["float32"]:
        return x
    if dtype == SCALE_DTYPES["float16"]:
        with np.errstate(over="ignore"):  # overflow -> inf is the reference behaviour (then guarded)
            return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32)  # bfloat16: keep the high half, rounded to nearest even
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32))


def _geometry(params: KernelParams, cols: int) -> tuple[int, int]:
    """(group length, groups per row) the kernels walk; per tensor = one group per row."""
    group = params.group_size if params.group_size > 0 else max(cols, 1)
    return group, -(-cols // group)


def _as_2d(x: np.ndarray, dtype) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] array, got shape {x.shape}")
    return x


def compute_params(w: np.ndarray, params: KernelParams) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) fp32 ``[out, n_groups]`` (``[1, 1]`` per tensor), as ``affine.compute_params``.

    Example::

        scale, zero = compute_params(np.random.randn(8, 128).astype(np.float32), params)
    """
    params.validate()
    w = _as_2d(w, np.float32)
    rows, cols = w.shape
    group, n_groups = _geometry(params, cols)
    lo = np.empty((rows, n_groups), np.float32)
    hi = np.empty((rows, n_groups), np.float32)
    _group_range(w, group, lo, hi)
    if params.group_size == 0:
        lo, hi = lo.min(keepdims=True).reshape(1, 1), hi.max(keepdims=True).reshape(1, 1)
    shape = lo.shape
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    if params.lookup != LOOKUPS["none"]:
        scale, _ = _raw_params(lo, hi, _ABSMAX, _F1, _F1)  # absmax stays fp32, as in the reference
        return scale.reshape(shape), np.zeros(shape, np.float32)
    scheme = _SCHEME[params.scheme]
    qmax, half = np.float32(params.qmax), np.float32(1 << (params.bits - 1))
    raw, low = _raw_params(lo, hi, scheme, qmax, half)
    scale = _round_to_dtype(raw, params.scale_dtype)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, _TINY).astype(np.float32)
    zero_float = bool(params.float_zero)
    zero = _zero_points(low, scale, scheme, zero_float, qmax, half)
    if zero_float:
        zero = _round_to_dtype(zero, SCALE_DTYPES["float16"])
    return scale.reshape(shape), zero.reshape(shape)


# ---- quantize / dequantize / fake quant on codes ----------------------------

_QUANTIZE, _DEQUANTIZE, _FAKE_QUANT = range(3)


@functools.cache
def _elementwise_kernel(op: int, lut: bool):
    """One njit kernel per (op, lut); constants are closure values so LLVM sees them."""

    @njit(**_JIT)
    def kernel(src, scale, zero, table, group, qmax, float_zero, dst):
        rows, cols = src.shape
        for r in prange(rows):
            row_in = src[r]
            row_out = dst[r]
            for g in range(scale.shape[1]):
                s = scale[r, g]
                z = zero[r, g]
                # an integer zero is added after rounding, a float (HQQ) zero before it
                z_before = z if float_zero else _F0
                z_after = _F0 if float_zero else z
                start = g * group
                for c in range(uint64(start), uint64(min(start + group, cols))):
                    if op == _DEQUANTIZE:
                        if lut:
                            row_out[c] = table[row_in[c] & 15] * s
                        else:
                            row_out[c] = (np.float32(row_in[c]) - z) * s
                        continue
                    x = row_in[c] / s
                    if lut:  # nearest table entry; strict < keeps the lowest index on ties (torch.argmin)
                        best = abs(x - table[0])
                        idx = 0
                        for k in range(1, 16):
                            d = abs(x - table[k])
                            if d < best:
                                best = d
                                idx = k
                        if op == _QUANTIZE:
                            row_out[c] = idx
                        else:
                            row_out[c] = table[idx] * s
                        continue
                    q = np.rint(x + z_before) + z_after
                    if q < _F0:
                        q = _F0
                    if q > qmax:
                        q = qmax
                    code = np.uint8(q)
                    if op == _QUANTIZE:
                        row_out[c] = code
                    else:  # through the uint8 code, so a -0.0 becomes the +0.0 dequantize sees
                        row_out[c] = (np.float32(code) - z) * s

    return kernel


def _params_2d(p: np.ndarray, rows: int, n_groups: int, params: KernelParams, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float32)
    if params.group_size == 0:
        if p.size != 1:
            raise ValueError(f"per-tensor {name} must hold one value, got shape {p.shape}")
        return np.full((rows, 1), p.reshape(()), np.float32)
    if p.shape != (rows, n_groups):
        raise ValueError(f"{name} shape {p.shape} != (out, n_groups) = {(rows, n_groups)}")
    return np.ascontiguousarray(p)


def _run_elementwise(op: int, src: np.ndarray, scale, zero, params: KernelParams, table, out_dtype,
                     out) -> np.ndarray:
    params.validate()
    rows, cols = src.shape
    group, n_groups = _geometry(params, cols)
    lut = params.lookup != LOOKUPS["none"]
    table = _lookup_table(params, table)
    s = _params_2d(scale, rows, n_groups, params, "scale")
    z = s if lut else _params_2d(zero, rows, n_groups, params, "zero")
    dst = np.empty((rows, cols), out_dtype) if out is None else out
    if dst.shape != (rows, cols) or dst.dtype != out_dtype or not dst.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(out_dtype).name} array of shape {(rows, cols)}")
    _elementwise_kernel(op, lut)(src, s, z, table, group, np.float32(params.qmax), bool(params.float_zero), dst)
    return dst


def quantize(w: np.ndarray, scale, zero, params: KernelParams, table: np.ndarray | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
    """uint8 codes ``[out, in]``, as ``affine.quantize`` (lookup formats: nearest ``table`` entry of ``w / scale``).

    Example::

        codes = quantize(w, *compute_params(w, params), params)
    """
    return _run_elementwise(_QUANTIZE, _as_2d(w, np.float32), scale, zero, params, table, np.uint8, out)


def dequantize(codes: np.ndarray, scale, zero, params: KernelParams, table: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """fp32 ``(code - zero) * scale`` (lookup formats: ``table[code] * scale``), as ``affine.dequantize``.

    Example::

        w_hat = dequantize(codes, scale, zero, params)
    """
    return _run_elementwise(_DEQUANTIZE, _as_2d(codes, np.uint8), scale, zero, params, table, np.float32, out)


def fake_quant(w: np.ndarray, params: KernelParams, table: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """``dequantize(quantize(w))`` in one pass over ``w``, parameters from ``w`` itself.

    Example::

        w_hat = fake_quant(w, params)
    """
    w = _as_2d(w, np.float32)
    scale, zero = compute_params(w, params)
    return _run_elementwise(_FAKE_QUANT, w, scale, zero, params, table, np.float32, out)


# ---- packing (docs/METHODS.md §2.1) ------------------------------------------------
# 2/4/8-bit codes never straddle a byte, so those kernels walk the packed row
# as bytes (a little-endian word is its 4 bytes in order); the short unit gives
# LLVM an interleave it vectorizes. 3/5/6-bit walk whole int32 words.

def _unit(bits: int) -> tuple[type, int]:
    """(numpy dtype of one packed unit, codes per unit)."""
    per = per_word(bits)  # raises for a width that cannot be packed
    if bits in (2, 4, 8):
        return np.uint8, 8 // bits
    return np.uint32, per


def _units_view(packed: np.ndarray, bits: int) -> np.ndarray:
    dtype, _ = _unit(bits)
    return np.ascontiguousarray(packed, dtype=np.int32).view(dtype)


@functools.cache
def _pack_kernel(bits: int):
    _, per = _unit(bits)
    mask = (1 << bits) - 1

    @njit(**_JIT)
    def kernel(codes, units):
        rows, cols = codes.shape
        full = cols // per
        for r in prange(rows):
            src = codes[r]
            dst = units[r]
            for u in range(uint64(full)):
                base = uint64(per) * u
                acc = 0
                for i in range(per):
                    acc |= (np.int64(src[base + uint64(i)]) & mask) << (bits * i)
                dst[u] = acc
            for u in range(full, units.shape[1]):  # partial last unit, then padding units: zero-filled
                acc = 0
                for i in range(per):
                    c = u * per + i
                    if c < cols:
                        acc |= (np.int64(src[c]) & mask) << (bits * i)
                dst[u] = acc

    return kernel


@functools.cache
def _unpack_kernel(bits: int):
    _, per = _unit(bits)
    mask = (1 << bits) - 1

    @njit(**_JIT)
    def kernel(units, codes):
        rows, cols = codes.shape
        full = cols // per
        for r in prange(rows):
            src = units[r]
            dst = codes[r]
            for u in range(uint64(full)):
                v = src[u]
                base = uint64(per) * u
                for i in range(per):
                    dst[base + uint64(i)] = (v >> (bits * i)) & mask
            for c in range(full * per, cols):
                dst[c] = (src[full] >> (bits * (c - full * per))) & mask

    return kernel


@functools.cache
def _dequantize_packed_kernel(bits: int, lut: bool):
    _, per = _unit(bits)
    mask = (1 << bits) - 1
    # LLVM turns a 10-way interleaved store (3-bit) into scatters, 3x slower than scalar code;
    # decoding a word into a small buffer first (which may alias dst) keeps it scalar
    via_buffer = per == 10

    @njit(**_JIT)
    def kernel(units, scale, zero, table, group, dst_all):
        rows, cols = dst_all.shape
        n_groups = scale.shape[1]
        full = cols // per
        aligned = (group % per == 0 or n_groups == 1) and not via_buffer
        for r in prange(rows):
            src = units[r]
            dst = dst_all[r]
            if aligned:  # every unit lies in one group: decode and scale in one pass
                for g in range(n_groups):
                    s = scale[r, g]
                    z = zero[r, g]
                    start = g * group
                    for u in range(uint64(start // per), uint64(min(start + group, cols) // per)):
                        v = src[u]
                        base = uint64(per) * u
                        for i in range(per):
                            code = (v >> (bits * i)) & mask
                            dst[base + uint64(i)] = table[code] * s if lut else (np.float32(code) - z) * s
                s = scale[r, n_groups - 1]
                z = zero[r, n_groups - 1]
                for c in range(full * per, cols):
                    code = (src[full] >> (bits * (c - full * per))) & mask
                    dst[c] = table[code] * s if lut else (np.float32(code) - z) * s
                continue
            # groups cut through units: decode the row to float codes, then scale it in cache
            buffer = np.empty(per, np.float32)
            for u in range(uint64(full)):
                v = src[u]
                base = uint64(per) * u
                if via_buffer:
                    for i in range(per):
                        buffer[i] = np.float32((v >> (bits * i)) & mask)
                    for i in range(per):
                        dst[base + uint64(i)] = buffer[i]
                else:
                    for i in range(per):
                        dst[base + uint64(i)] = np.float32((v >> (bits * i)) & mask)
            for c in range(full * per, cols):
                dst[c] = np.float32((src[full] >> (bits * (c - full * per))) & mask)
            for g in range(n_groups):
                s = scale[r, g]
                z = zero[r, g]
                start = g * group
                for c in range(uint64(start), uint64(min(start + group, cols))):
                    dst[c] = table[np.int64(dst[c])] * s if lut else (dst[c] - z) * s

    return kernel


# 3-bit rows hold 10 codes per little-endian uint32 word (bits 30-31 unused). Decoding a word code by
# code is a 10-way interleaved store LLVM cannot vectorise; instead four words (120 bits, 40 codes)
# become two 60-bit runs, and each run of 8 codes is spread to 8 bytes of a uint64 in three
# shift-and-mask steps (12 -> 2 x 6 -> 4 x 3 bits per 32/16/8-bit lane): five plain uint64 stores per
# four words into a row buffer of code bytes, which a contiguous (vectorised) loop then scales.
_LITTLE_ENDIAN = sys.byteorder == "little"
_M30 = np.uint64(0x3FFFFFFF)
_M24 = np.uint64(0xFFFFFF)
_M12 = np.uint64(0xFFF)


@njit(inline="always")
def _spread3(x):
    """The 8 3-bit fields of ``x``'s low 24 bits -> byte k of a uint64 holds field k."""
    a = (x & np.uint64(0xFFF)) | ((x & np.uint64(0xFFF000)) << np.uint64(20))
    b = (a & np.uint64(0x0000003F0000003F)) | ((a & np.uint64(0x00000FC000000FC0)) << np.uint64(10))
    return (b & np.uint64(0x0007000700070007)) | ((b & np.uint64(0x0038003800380038)) << np.uint64(5))


@njit(inline="always")
def _unpack3_row(src, buf, cols):
    """The ``cols`` 3-bit codes of one packed row ``src`` (uint32 words) into the bytes of ``buf``
    (uint64, at least ``(words // 4 + 1) * 5`` long); returns ``buf`` viewed as uint8."""
    words = (cols + 9) // 10
    quads = words // 4
    for q in range(uint64(quads)):
        w = uint64(4) * q
        lo = (np.uint64(src[w]) & _M30) | ((np.uint64(src[w + uint64(1)]) & _M30) << np.uint64(30))
        hi = (np.uint64(src[w + uint64(2)]) & _M30) | ((np.uint64(src[w + uint64(3)]) & _M30) << np.uint64(30))
        o = uint64(5) * q
        buf[o] = _spread3(lo & _M24)
        buf[o + uint64(1)] = _spread3((lo >> np.uint64(24)) & _M24)
        buf[o + uint64(2)] = _spread3((lo >> np.uint64(48)) | ((hi & _M12) << np.uint64(12)))
        buf[o + uint64(3)] = _spread3((hi >> np.uint64(12)) & _M24)
        buf[o + uint64(4)] = _spread3((hi >> np.uint64(36)) & _M24)
    codes = buf.view(np.uint8)
    for u in range(4 * quads, words):
        v = src[u]
        for i in range(10):
            codes[10 * u + i] = (v >> (3 * i)) & 7
    return codes


@njit(**_JIT)
def _dequantize_packed3(units, scale, zero, group, dst_all):
    """``_dequantize_packed_kernel(3, lut=False)`` through the code-byte buffer (same arithmetic)."""
    rows, cols = dst_all.shape
    n_groups = scale.shape[1]
    for r in prange(rows):
        buf = np.empty(((cols + 9) // 10 // 4 + 1) * 5, np.uint64)
        codes = _unpack3_row(units[r], buf, cols)
        dst = dst_all[r]
        for g in range(n_groups):
            s = scale[r, g]
            z = zero[r, g]
            start = g * group
            for c in range(uint64(start), uint64(min(start + group, cols))):
                dst[c] = (np.float32(codes[c]) - z) * s


@njit(**_JIT)
def _unpack3(units, codes_all):
    """``_unpack_kernel(3)`` through the code-byte buffer."""
    rows, cols = codes_all.shape
    for r in prange(rows):
        buf = np.empty(((cols + 9) // 10 // 4 + 1) * 5, np.uint64)
        codes = _unpack3_row(units[r], buf, cols)
        dst = codes_all[r]
        for c in range(uint64(cols)):
            dst[c] = codes[c]


def _check_packed(packed: np.ndarray, bits: int, in_features: int) -> None:
    words = packed_words(in_features, bits)
    if packed.ndim != 2 or packed.shape[1] < words:
        raise ValueError(f"packed shape {packed.shape} holds fewer than {in_features} {bits}-bit codes per row "
                         f"(needs {words} int32 words)")


def pack(codes: np.ndarray, bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[out, in]`` -> int32 ``[out, ceil(in / (32 // bits))]``, as ``packing.pack_reference``.

    Example::

        pack(np.arange(1, 9, dtype=np.uint8)[None], 4)   # [[0x87654321]] as int32
    """
    codes = _as_2d(codes, np.uint8)
    words = packed_words(codes.shape[1], bits)
    packed = np.empty((codes.shape[0], words), np.int32) if out is None else out
    if packed.shape != (codes.shape[0], words) or packed.dtype != np.int32 or not packed.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int32 array of shape {(codes.shape[0], words)}")
    _pack_kernel(bits)(codes, packed.view(_unit(bits)[0]))
    return packed


def unpack(packed: np.ndarray, bits: int, in_features: int, out: np.ndarray | None = None) -> np.ndarray:
    """int32 ``[out, words]`` -> uint8 ``[out, in_features]``, as ``packing.unpack_reference``.

    Example::

        unpack(pack(codes, 3), 3, codes.shape[1])   # == codes (values < 8)
    """
    units = _units_view(packed, bits)
    _check_packed(packed, bits, in_features)
    codes = np.empty((packed.shape[0], in_features), np.uint8) if out is None else out
    if codes.shape != (packed.shape[0], in_features) or codes.dtype != np.uint8 or not codes.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {(packed.shape[0], in_features)}")
    if bits == 3 and _LITTLE_ENDIAN:
        _unpack3(units, codes)
    else:
        _unpack_kernel(bits)(units, codes)
    return codes


def dequantize_packed(packed: np.ndarray, scale, zero, params: KernelParams, in_features: int,
                      table: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """fp32 ``[out, in_features]`` straight from packed words: unpack and dequantize fused (the hot path).

    Example::

        w_hat = dequantize_packed(packed, scale, zero, params, in_features)
    """
    params.validate()
    units = _units_view(packed, params.bits)
    _check_packed(packed, params.bits, in_features)
    rows = packed.shape[0]
    group, n_groups = _geometry(params, in_features)
    lut = params.lookup != LOOKUPS["none"]
    table = _lookup_table(params, table)
    s = _params_2d(scale, rows, n_groups, params, "scale")
    z = s if lut else _params_2d(zero, rows, n_groups, params, "zero")
    dst = np.empty((rows, in_features), np.float32) if out is None else out
    if dst.shape != (rows, in_features) or dst.dtype != np.float32 or not dst.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(rows, in_features)}")
    if params.bits == 3 and not lut and _LITTLE_ENDIAN:
        _dequantize_packed3(units, s, z, group, dst)
    else:
        _dequantize_packed_kernel(params.bits, lut)(units, s, z, table, group, dst)
    return dst


# ---- which kernels exist, which are compiled ----------------------------------------

def _variants() -> dict:
    """Every numba kernel this module can run, by name; building a dispatcher compiles nothing."""
    kernels = {"group_range": _group_range, "raw_params": _raw_params, "zero_points": _zero_points}
    for op, name in ((_QUANTIZE, "quantize"), (_DEQUANTIZE, "dequantize"), (_FAKE_QUANT, "fake_quant")):
        for lut in (False, True):
            kernels[f"{name}[{'lookup' if lut else 'affine'}]"] = _elementwise_kernel(op, lut)
    for bits in PACK_BITS:
        kernels[f"pack[{bits}]"] = _pack_kernel(bits)
        kernels[f"unpack[{bits}]"] = _unpack_kernel(bits)
        kernels[f"dequantize_packed[{bits}, affine]"] = _dequantize_packed_kernel(bits, False)
    if _LITTLE_ENDIAN:   # what unpack / dequantize_packed run for 3 bits
        kernels["unpack[3]"] = _unpack3
        kernels["dequantize_packed[3, affine]"] = _dequantize_packed3
    kernels["dequantize_packed[4, lookup]"] = _dequantize_packed_kernel(4, True)  # lookup formats are 4-bit
    return kernels


def kernel_variants() -> list[str]:
    """Names of every numba kernel variant, e.g. ``"pack[3]"``, ``"quantize[lookup]"``.

    Example::

        len(kernel_variants())   # 28
    """
    return list(_variants())


def compiled_variants() -> list[str]:
    """The variants this process has compiled or loaded from numba's on-disk cache (same order).

    Example::

        compiled_variants()   # [] in a fresh process
    """
    return [name for name, kernel in _variants().items() if kernel.signatures]
