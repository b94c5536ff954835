"""One entry point per quantization hot loop: CUDA, else numba, else torch.

Every function takes/returns torch tensors; shapes follow qflow.quant.affine
(weights ``[out, in]``, params ``[out, n_groups]``) and qflow.quant.packing.
The backend chosen for each operation is logged once.

NOTE: this first version routes everything to the torch reference; the numba
(qflow/kernels/cpu.py) and CUDA (native/) paths plug in here.
"""

from __future__ import annotations

import logging

import torch

from ..quant import affine, packing
from ..quant.spec import QuantSpec

log = logging.getLogger("qflow.kernels")
_announced: set[tuple[str, str]] = set()


def _announce(op: str, backend: str) -> None:
    if (op, backend) not in _announced:
        _announced.add((op, backend))
        log.info("kernel %s -> %s", op, backend)


def compute_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    _announce("compute_params", "torch")
    return affine.compute_params(w, spec)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    _announce("quantize", "torch")
    return affine.quantize(w, scale, zero, spec)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    _announce("dequantize", "torch")
    return affine.dequantize(codes, scale, zero, spec)


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    _announce("fake_quant", "torch")
    return affine.fake_quant(w, spec)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    _announce("pack", "torch")
    return packing.pack_reference(codes, bits)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    _announce("unpack", "torch")
    return packing.unpack_reference(packed, bits, in_features)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      spec: QuantSpec, in_features: int) -> torch.Tensor:
    _announce("dequantize_packed", "torch")
    return affine.dequantize(packing.unpack_reference(packed, spec.bits, in_features), scale, zero, spec)
