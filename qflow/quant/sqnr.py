"""Signal-to-quantization-noise ratio in dB: the one definition every SQNR in qflow uses.

``SQNR = 10·log10(Σy² / Σ(y−ŷ)²)`` over the flattened tensors, summed in float64.
At the edges (docs/PROTOCOL.md §7):

* no noise (``ŷ == y``, including two zero tensors): ``+inf``;
* a zero signal with noise: ``-inf``.

Torch tensors are summed with torch and numpy arrays with numpy (each in float64),
so a caller keeps the summation order of its own library.

Example::

    sqnr_db(torch.tensor([1., 2.]), torch.tensor([1., 2.1]))   # 26.9897
    sqnr_db(np.zeros(3), np.zeros(3))                          # inf
    sqnr_from_sums(0.0, 1.0)                                   # -inf
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np


def sqnr_from_sums(signal_sq: float, noise_sq: float) -> float:
    """SQNR in dB from ``Σy²`` and ``Σ(y−ŷ)²`` (sums kept by a caller that streams its data)."""
    if noise_sq <= 0.0:
        return math.inf
    if signal_sq <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_sq / noise_sq)


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    return torch is not None and isinstance(x, torch.Tensor)


def sqnr_db(reference: Any, approx: Any) -> float:
    """SQNR of ``approx`` against ``reference`` (torch tensors or numpy arrays, any shape), in dB."""
    if _is_torch(reference) or _is_torch(approx):
        import torch

        y = torch.as_tensor(reference).double().reshape(-1)
        noise = (y - torch.as_tensor(approx).double().reshape(-1)).pow(2).sum()
        return sqnr_from_sums(float(y.pow(2).sum()), float(noise))
    y = np.asarray(reference).astype(np.float64)
    noise = float(np.sum((y - np.asarray(approx).astype(np.float64)) ** 2))
    return sqnr_from_sums(float(np.sum(y ** 2)), noise)
