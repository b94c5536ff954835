"""QuantSpec: what one quantized tensor looks like, and its bits-per-weight.

A spec is plain data (pydantic, frozen) so it can be hashed into cache keys,
stored as JSON in checkpoint metadata and validated in recipes.

Example::

    QuantSpec(bits=4, group_size=64, symmetric=False)          # ASYM-Z g64
    QuantSpec(format="nf4", group_size=64, double_quant=True)  # QLoRA NF4 + DQ

Storage convention shared by every kernel and exporter (docs/METHODS.md §1):
codes are *unsigned* integers in ``[0, 2^bits - 1]`` and
``w_hat = scale * (code - zero)`` computed in fp32 as ``(float(code) - zero) * scale``.
Symmetric schemes store ``zero = 2^(bits-1)``; lookup formats (nf4/fp4)
decode ``w_hat = TABLE[code] * scale`` and have no zero.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

# scheme ids follow docs/METHODS.md §1's table
Scheme = Literal["asym_z", "asym_a", "asym_h", "sym_r", "sym_f"]


class QuantSpec(BaseModel):
    """How one weight tensor is quantized (weights; optional activation bits)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["int", "nf4", "fp4"] = "int"
    bits: int = 4
    group_size: int = 128          # > 0: groups along the input dim; -1: per output channel; 0: per tensor
    symmetric: bool = False
    scheme: Scheme | None = None   # filled from `symmetric` when omitted
    zero_float: bool = False       # HQQ: zero point stored as fp16, not an integer
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    double_quant: bool = False     # QLoRA DQ of nf4/fp4 absmax
    pad_last_group: bool = False   # allow in % group_size != 0 (last group partial)
    act_bits: int | None = None    # activation quantization (SmoothQuant W8A8)
    act_granularity: Literal["token", "tensor"] = "token"

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.format in ("nf4", "fp4"):
            if self.bits != 4:
                raise ValueError(f"format {self.format} is 4-bit; got bits={self.bits}")
            if self.group_size <= 0:
                raise ValueError(f"format {self.format} needs a positive block size (group_size), got {self.group_size}")
            if self.scheme is not None:
                raise ValueError(f"format {self.format} has no affine scheme; remove scheme")
        else:
            if self.bits not in (2, 3, 4, 5, 6, 8):
                raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 8; got {self.bits}")
            if self.double_quant:
                raise ValueError("double_quant applies only to nf4/fp4 formats")
            if self.scheme is None:
                object.__setattr__(self, "scheme", "sym_f" if self.symmetric else "asym_z")
            sym_scheme = self.scheme in ("sym_r", "sym_f")
            if sym_scheme != self.symmetric:
                object.__setattr__(self, "symmetric", sym_scheme)
            if self.zero_float and self.symmetric:
                raise ValueError("zero_float needs an asymmetric scheme")
        if self.group_size < -1:
            raise ValueError(f"group_size must be > 0, -1 (per channel) or 0 (per tensor); got {self.group_size}")
        if self.act_bits is not None and self.act_bits not in (4, 8):
            raise ValueError(f"act_bits must be 4 or 8; got {self.act_bits}")
        return self

    # ---- geometry -------------------------------------------------------
    @property
    def granularity(self) -> str:
        if self.group_size > 0:
            return "group"
        return "channel" if self.group_size == -1 else "tensor"

    def effective_group(self, in_features: int) -> int:
        """Group length along the input dim for a weight with ``in_features`` columns."""
        if self.group_size > 0:
            return self.group_size
        return in_features

    def n_groups(self, in_features: int) -> int:
        if self.group_size == 0:
            return 1
        return math.ceil(in_features / self.effective_group(in_features))

    def check_shape(self, out_features: int, in_features: int) -> str | None:
        """A problem with quantizing a [out, in] weight under this spec, or None."""
        if self.group_size > 0 and in_features % self.group_size and not self.pad_last_group:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            hint = f"use group_size in {divisors}" if divisors else "use group_size=-1 (per channel)"
            return (f"group_size {self.group_size} does not divide in_features {in_features}; "
                    f"{hint} or set pad_last_group: true")
        return None

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def has_zero(self) -> bool:
        return self.format == "int" and not self.symmetric

    # ---- size accounting (docs/METHODS.md §1 "Bits-per-weight accounting") ---
    def scale_bits(self) -> float:
        """Bits stored per group for the scale (nf4/fp4 DQ: 8-bit code + second-level fp32/256)."""
        if self.format in ("nf4", "fp4"):
            return 8 + 32 / 256 if self.double_quant else 32
        return {"float16": 16, "bfloat16": 16, "float32": 32}[self.scale_dtype]

    def zero_bits(self) -> float:
        if not self.has_zero:
            return 0
        return 16 if self.zero_float else self.bits

    def bpw(self, out_features: int | None = None, in_features: int | None = None, *, g_idx: bool = False) -> float:
        """Bits per weight including scales, zeros and (optionally) a per-column g_idx.

        >>> QuantSpec(bits=4, group_size=128).bpw()
        4.15625
        """
        if self.group_size > 0:
            per_group = self.group_size
        else:
            if in_features is None:
                raise ValueError("per-channel/per-tensor bpw needs in_features")
            per_group = in_features if self.group_size == -1 else in_features * (out_features or 1)
        bits = self.bits + (self.scale_bits() + self.zero_bits()) / per_group
        if g_idx:
            if out_features is None:
                raise ValueError("g_idx bpw needs out_features")
            bits += 32 / out_features
        return bits


# GGUF block types: (block length, bytes per block) for bpw accounting.
GGUF_TYPES: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


def gguf_bpw(type_name: str) -> float:
    """Bits per weight of a GGUF block type, e.g. ``gguf_bpw("Q4_K") == 4.5``."""
    block, nbytes = GGUF_TYPES[type_name]
    return 8 * nbytes / block
