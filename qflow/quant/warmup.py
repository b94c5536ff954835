"""Compile (or load from the on-disk cache) every numba kernel ahead of use, e.g. in CI.

numba compiles a kernel on its first call, about a second each; a cold run of
every variant takes tens of seconds. Calling :func:`warmup` once fills
``<runs dir>/numba`` so later processes start fast. Nothing calls it on import.
It lives in the quant core because it reaches the kernel variants through
QuantSpecs (each bit width, the affine and the lookup formats).

Example::

    python -c "from qflow.quant.warmup import warmup; print(warmup())"
"""

from __future__ import annotations

import numpy as np

from .dispatch import kernel_params, kernel_table
from .spec import QuantSpec

_BITS = (2, 3, 4, 5, 6, 8)


def warmup_specs() -> list[QuantSpec]:
    """Specs that together reach every kernel variant (each bit width, affine and lookup formats).

    Example::

        len(warmup_specs())   # 8
    """
    specs = [QuantSpec(bits=b, group_size=16) for b in _BITS]
    specs += [QuantSpec(format="nf4", group_size=16), QuantSpec(format="fp4", group_size=16)]
    return specs


def warmup() -> list[str]:
    """Run every numba kernel once on a tiny input; returns the variants now compiled in this process.

    A complete warm-up returns ``qflow.kernels.cpu.kernel_variants()``; anything
    shorter names a kernel that did not run.

    Example::

        missing = set(cpu.kernel_variants()) - set(warmup())
    """
    from ..kernels import cpu  # imports numba (after configure_numba)

    w = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    for spec in warmup_specs():
        params, table = kernel_params(spec), kernel_table(spec)
        scale, zero = cpu.compute_params(w, params)
        codes = cpu.quantize(w, scale, zero, params, table)
        cpu.dequantize(codes, scale, zero, params, table)
        cpu.fake_quant(w, params, table)
        packed = cpu.pack(codes, params.bits)
        cpu.unpack(packed, params.bits, w.shape[1])
        cpu.dequantize_packed(packed, scale, zero, params, w.shape[1], table)
    return cpu.compiled_variants()
