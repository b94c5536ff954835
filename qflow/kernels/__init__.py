"""CPU (numba) and CUDA kernels: arrays in, arrays out, told what to do by plain numbers.

The kernels know no QuantSpec and no torch module: ``params.KernelParams``
carries the numbers, and the quant core's dispatcher (``qflow.quant.dispatch``)
translates a QuantSpec into them and picks CUDA, numba or its torch reference.
Importing this package is cheap: numba is imported only when a numba kernel is
first needed, after :func:`configure_numba` has pointed its on-disk cache at
the runs directory.

Example::

    from qflow.quant import dispatch
    codes = dispatch.quantize(w, scale, zero, spec)
"""

from __future__ import annotations

import os
from pathlib import Path


def runs_dir() -> Path:
    """The runs root: ``$QFLOW_RUNS_DIR`` or ``./runs`` (absolute).

    Example::

        runs_dir() / "numba"
    """
    return Path(os.environ.get("QFLOW_RUNS_DIR") or "runs").absolute()


def configure_numba() -> None:
    """Point ``NUMBA_CACHE_DIR`` at ``<runs dir>/numba`` unless the user set it; call before importing numba.

    numba reads its configuration from the environment when it is first
    imported, so this must run earlier; ``qflow.kernels.cpu`` calls it first.

    Example::

        configure_numba(); import numba
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", str(runs_dir() / "numba"))
