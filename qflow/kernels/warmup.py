"""Compile (or load from the on-disk cache) every numba kernel ahead of use, e.g. in CI.

numba compiles a kernel on its first call, about a second each; a cold run of
every variant takes tens of seconds. Calling :func:`warmup` once fills
``<runs dir>/numba`` so later processes start fast. Nothing calls it on import.

Example::

    python -c "from qflow.kernels.warmup import warmup; print(warmup())"
"""

from __future__ import annotations

import time

import numpy as np

from ..quant.spec import QuantSpec

_BITS = (2, 3, 4, 5, 6, 8)


def warmup_specs() -> list[QuantSpec]:
    """Specs that together reach every kernel variant (each bit width, affine and lookup formats).

    Example::

        len(warmup_specs())   # 8
    """
    specs = [QuantSpec(bits=b, group_size=16) for b in _BITS]
    specs += [QuantSpec(format="nf4", group_size=16), QuantSpec(format="fp4", group_size=16)]
    return specs


def warmup() -> float:
    """Run every numba kernel once on a tiny input; returns the seconds it took.

    Example::

        seconds = warmup()
    """
    from . import cpu  # imports numba (after configure_numba)

    start = time.perf_counter()
    w = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    for spec in warmup_specs():
        scale, zero = cpu.compute_params(w, spec)
        codes = cpu.quantize(w, scale, zero, spec)
        cpu.dequantize(codes, scale, zero, spec)
        cpu.fake_quant(w, spec)
        packed = cpu.pack(codes, spec.bits)
        cpu.unpack(packed, spec.bits, w.shape[1])
        cpu.dequantize_packed(packed, scale, zero, spec, w.shape[1])
    return time.perf_counter() - start
