"""qflow's internal packing (docs/METHODS.md §2.1), torch reference.

Unsigned ``bits``-wide codes are packed along the input dimension into int32
words, ``per_word = 32 // bits`` codes per word, sequential from the least
significant bit: field ``i`` of word ``k`` holds column ``k*per_word + i`` in
bits ``[bits*i, bits*i + bits)``. Unused high bits and padding fields are 0.

    bits:      2   3   4   5   6   8
    per word: 16  10   8   6   5   4

(3-bit packs 10 codes per int32 and leaves bits 30-31 zero.) Codes 1..8 at
4 bits pack to the word ``0x87654321``.
"""

from __future__ import annotations

import torch

from ..kernels.params import packed_words, per_word  # the packed-word geometry, shared with the kernels


def pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[out, in]`` -> int32 ``[out, ceil(in / per_word)]``."""
    out, cols = codes.shape
    per = per_word(bits)
    words = packed_words(cols, bits)
    c = torch.zeros(out, words * per, dtype=torch.int64)
    c[:, :cols] = codes.to(torch.int64) & ((1 << bits) - 1)
    c = c.reshape(out, words, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (c << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_reference(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 ``[out, words]`` -> uint8 ``[out, in_features]``."""
    per = per_word(bits)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)
