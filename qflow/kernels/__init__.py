"""CPU (numba) and CUDA kernels behind one dispatcher (``qflow.kernels.dispatch``).

Importing this package is cheap: numba is imported only when a numba kernel is
first needed, after :func:`configure_numba` has pointed its on-disk cache at
the runs directory.

Example::

    from qflow.kernels import dispatch
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
