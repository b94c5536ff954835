"""Bit-level packing of the exported layouts (docs/METHODS.md §2), numpy, vectorized.

Every function takes unsigned integer codes (``uint8``) and returns int32
words (little-endian fields), or the reverse. Three packings cover all the
safetensors layouts:

* :func:`pack_stream` -- a *dense bit stream* along the last axis: element ``i``
  of a row occupies bits ``[b*i, b*i + b)`` of the row's little-endian stream of
  32-bit words. For b in {2, 4, 8} this is the plain sequential packing (8
  nibbles per word, first element in the low bits). For b = 3 it is AutoGPTQ's
  "32 values in 3 words" spill layout, and for 3/5/6/7 bits it is
  compressed-tensors' dense cross-element packing (``pack_to_int32``).
  GPTQ packs ``qweight`` along the *input* rows (axis 0 of ``W^T``) and
  ``qzeros`` along the output columns; compressed-tensors packs
  ``weight_packed`` along the input columns of ``W`` and ``weight_zero_point``
  along dim 0 (output rows).
* :func:`pack_awq` -- AutoAWQ GEMM: 8 nibbles per word along the output
  columns, nibble ``i`` holding logical column ``8c + AWQ_ORDER[i]``.

Tests (docs/METHODS.md): AWQ columns 0..7 holding 1..8 pack to ``0x86427531``;
sequential codes 1..8 pack to ``0x87654321``.
"""

from __future__ import annotations

import numpy as np

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # nibble i holds logical column AWQ_ORDER[i]
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)    # logical column j sits in nibble AWQ_REVERSE[j]


def stream_words(n: int, bits: int) -> int:
    """int32 words holding ``n`` dense ``bits``-wide fields."""
    return -(-n * bits // 32)


def _to_int32(words_u64: np.ndarray) -> np.ndarray:
    return words_u64.astype(np.uint32).view(np.int32)


def pack_stream(values: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Dense little-endian bit stream of unsigned ``bits``-wide fields along ``axis`` -> int32.

    >>> hex(pack_stream(np.arange(1, 9, dtype=np.uint8)[None], 4)[0, 0] & 0xFFFFFFFF)
    '0x87654321'
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit fields")
    v = np.asarray(values)
    if axis not in (-1, v.ndim - 1):
        return np.ascontiguousarray(np.moveaxis(pack_stream(np.moveaxis(v, axis, -1), bits), -1, axis))
    if v.size and (int(v.max()) >> bits or int(v.min()) < 0):
        raise ValueError(f"values out of range for {bits}-bit fields")
    lead, n = v.shape[:-1], v.shape[-1]
    words = stream_words(n, bits)
    v = v.reshape(-1, n).astype(np.uint64)
    if 32 % bits == 0:
        per = 32 // bits
        pad = words * per - n
        if pad:
            v = np.concatenate([v, np.zeros((v.shape[0], pad), np.uint64)], axis=1)
        v = v.reshape(v.shape[0], words, per)
        shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
        out = np.bitwise_or.reduce(v << shifts, axis=-1)
        return _to_int32(out).reshape(*lead, words)
    # general widths: expand to bits, repack bytes little-endian
    bit_planes = ((v[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    flat = bit_planes.reshape(v.shape[0], n * bits)
    pad = words * 32 - n * bits
    if pad:
        flat = np.concatenate([flat, np.zeros((flat.shape[0], pad), np.uint8)], axis=1)
    packed = np.packbits(flat, axis=1, bitorder="little")
    return packed.view("<u4").view(np.int32).reshape(*lead, words).copy()


def unpack_stream(words: np.ndarray, bits: int, n: int, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_stream`: int32 words -> uint8 ``[..., n]`` along ``axis``."""
    w = np.asarray(words)
    if axis not in (-1, w.ndim - 1):
        return np.ascontiguousarray(np.moveaxis(unpack_stream(np.moveaxis(w, axis, -1), bits, n), -1, axis))
    lead = w.shape[:-1]
    w = w.reshape(-1, w.shape[-1]).astype(np.int64) & 0xFFFFFFFF
    if w.shape[-1] < stream_words(n, bits):
        raise ValueError(f"{w.shape[-1]} words cannot hold {n} {bits}-bit fields")
    if bits in (2, 4, 8):  # whole fields per word: the stream is qflow's internal packing (docs/METHODS.md §2.1)
        import torch

        from qflow.quant.packing import unpack_reference

        return unpack_reference(torch.from_numpy(w), bits, n).numpy().reshape(*lead, n)
    as_bytes = np.ascontiguousarray(w.astype("<u4")).view(np.uint8).reshape(w.shape[0], -1)
    flat = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, : n * bits].reshape(w.shape[0], n, bits)
    vals = (flat.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(-1)
    return vals.astype(np.uint8).reshape(*lead, n)


def pack_awq(values: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM: 4-bit ``[rows, cols]`` -> int32 ``[rows, cols/8]`` in AWQ's interleaved order.

    >>> hex(pack_awq(np.arange(1, 9, dtype=np.uint8)[None])[0, 0] & 0xFFFFFFFF)
    '0x86427531'
    """
    v = np.asarray(values)
    rows, cols = v.shape
    if cols % 8:
        raise ValueError(f"AWQ GEMM packs 8 columns per word; {cols} columns is not a multiple of 8")
    v = v.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    return pack_stream(v.reshape(rows, cols), 4)


def unpack_awq(words: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_awq`: int32 ``[rows, cols/8]`` -> uint8 ``[rows, cols]``."""
    w = np.asarray(words)
    rows, n = w.shape
    cols = cols if cols is not None else n * 8
    v = unpack_stream(w, 4, n * 8).reshape(rows, n, 8)[:, :, list(AWQ_REVERSE)]
    return v.reshape(rows, n * 8)[:, :cols]
