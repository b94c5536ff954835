"""What a kernel is told about a quantization, as plain numbers, and the packed-word geometry.

The kernels (cpu.py, cuda.py) read nothing else: the quant core
(qflow/quant/dispatch.py) translates a QuantSpec into a :class:`KernelParams`
and hands the nf4/fp4 code values over as an array. The integer codes equal
the ``QFLOW_*`` defines of native/qflow_kernels.h (a test compares them).

Example::

    params = KernelParams(bits=4, group_size=64, scheme=SCHEMES["asym_z"], scale_dtype=SCALE_DTYPES["float16"],
                          float_zero=False)
    packed_words(100, 3)   # 10 words: 3-bit codes go 10 to an int32
"""

from __future__ import annotations

from typing import NamedTuple

# the affine scheme of docs/METHODS.md §1 by name (QFLOW_SCHEME_*); "absmax" is the scale rule of nf4/fp4
SCHEMES = {"asym_z": 0, "asym_a": 1, "asym_h": 2, "sym_f": 3, "sym_r": 4, "absmax": 5}
SCALE_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}  # QFLOW_SCALE_*
LOOKUPS = {"none": 0, "nf4": 1, "fp4": 2}  # QFLOW_KIND_AFFINE / _NF4 / _FP4
PACK_BITS = (2, 3, 4, 5, 6, 8)


class KernelParams(NamedTuple):
    """How one ``[out, in]`` weight is quantized, in the kernels' terms.

    ``group_size``: > 0 groups along the input dim, -1 one group per row, 0 one
    group for the whole tensor. ``float_zero``: the zero point is a fraction
    (HQQ's fp16 zero) added before rounding, not an integer added after it.
    ``lookup``: codes index a 16-entry table (``LOOKUPS``), whose scheme is
    ``SCHEMES["absmax"]`` and which has no zero point.

    Example::

        KernelParams(4, 64, SCHEMES["absmax"], SCALE_DTYPES["float32"], False, LOOKUPS["nf4"]).qmax   # 15
    """

    bits: int
    group_size: int
    scheme: int
    scale_dtype: int
    float_zero: bool
    lookup: int = LOOKUPS["none"]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def validate(self) -> "KernelParams":
        """Self, or ValueError naming the first inconsistent field (the kernels trust these numbers)."""
        if self.bits not in PACK_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, PACK_BITS))}; got {self.bits}")
        if self.group_size < -1:
            raise ValueError(f"group_size must be > 0, -1 (per row) or 0 (per tensor); got {self.group_size}")
        if self.scheme not in SCHEMES.values() or self.scale_dtype not in SCALE_DTYPES.values() \
                or self.lookup not in LOOKUPS.values():
            raise ValueError(f"unknown scheme/scale_dtype/lookup code in {self}")
        if (self.lookup != LOOKUPS["none"]) != (self.scheme == SCHEMES["absmax"]) \
                or (self.lookup and (self.bits != 4 or self.float_zero)):
            raise ValueError(f"a lookup format is 4-bit with the absmax scheme and no float zero, and only it; "
                             f"got {self}")
        if self.float_zero and self.scheme not in (SCHEMES["asym_a"], SCHEMES["asym_h"]):
            raise ValueError(f"a float zero point needs the asym_a or asym_h scheme; got {self}")
        return self


def per_word(bits: int) -> int:
    """Codes per int32 word, e.g. ``per_word(3) == 10`` (docs/METHODS.md §2.1)."""
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; bits must be one of {', '.join(map(str, PACK_BITS))}")
    return 32 // bits


def packed_words(in_features: int, bits: int) -> int:
    """int32 words per packed row of ``in_features`` codes, e.g. ``packed_words(100, 4) == 13``."""
    return -(-in_features // per_word(bits))
