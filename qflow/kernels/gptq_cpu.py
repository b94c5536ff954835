"""numba kernel for GPTQ's column loop inside one sub-block of a lazy batch (docs/METHODS.md §5).

The sequential part of GPTQ: for each column ``i`` of a sub-block of ``n`` working
columns (rows of ``w1``, ``[n, out]`` float32, updated in place), quantize it with
its own ``(scale, zero)`` rows, turn the rounding error into ``err = (w - ŵ) / d_i``
and subtract ``u[i, k] · err`` from every later column ``k`` of the batch. Every
output row ``o`` is independent of the others, so the kernel runs chunks of
``CHUNK`` outputs in parallel, each chunk through all ``n`` columns (a chunk of the
batch stays in cache). The arithmetic is the torch loop's, in fp32, no fastmath:
``clamp(rint(w / s) + z, 0, qmax)`` (a true division, round half to even), then
``(w - (q - z)·s) / d``; the rank-1 updates run in a different order than torch's
matmuls, so results agree with the torch path to fp32 rounding, not bit for bit.

Example::

    codes, err = run_columns(w1, u_block, scale_rows, zero_rows, qmax)
"""

from __future__ import annotations

import numpy as np

from . import configure_numba

configure_numba()  # before the first numba import: it reads NUMBA_CACHE_DIR once

from numba import get_num_threads, njit, prange, uint64  # noqa: E402

CHUNK = 64  # outputs per parallel task: 64 fp32 = 4 cache lines per column
# below this many multiply-adds a batch runs on one thread: a parallel region costs a wake-up of every
# worker, and on a loaded machine the slowest (descheduled) worker sets the pace
PARALLEL_MIN_WORK = 1 << 22


def _columns(w1, u, scale, zero, diag, qmax, codes, err):  # pragma: no cover - compiled
    """Quantize the ``n`` columns of ``w1 [n, out]`` in order with error feedback through ``u [n, n]``.

    ``scale``/``zero``: ``[n, out]`` float32 (the pair for each column); ``diag``: ``[n]``
    float32 (``u``'s diagonal); writes ``codes [n, out]`` uint8 and ``err [n, out]`` float32.
    """
    n, out = w1.shape
    n_chunks = (out + CHUNK - 1) // CHUNK
    zero32 = np.float32(0.0)
    for chunk in prange(n_chunks):
        # unsigned indices: numba then knows no index is negative (no wrap-around test), so LLVM vectorizes
        o0 = uint64(chunk * CHUNK)
        o1 = uint64(min(chunk * CHUNK + CHUNK, out))
        for i in range(n):
            d = diag[i]
            w_row = w1[i]
            s_row = scale[i]
            z_row = zero[i]
            c_row = codes[i]
            e_row = err[i]
            for o in range(o0, o1):
                w = w_row[o]
                s = s_row[o]
                z = z_row[o]
                q = min(max(np.float32(np.rint(w / s)) + z, zero32), qmax)
                c_row[o] = np.uint8(q)
                e_row[o] = (w - (q - z) * s) / d
            for k in range(i + 1, n):
                a = u[i, k]
                t_row = w1[k]
                for o in range(o0, o1):
                    t_row[o] -= a * e_row[o]


columns = njit(parallel=True, cache=True, fastmath=False)(_columns)
columns_serial = njit(cache=True, fastmath=False)(_columns)  # prange runs as range


def run_columns(w1: np.ndarray, u: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                qmax: float) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, err float32), both ``[n, out]``; ``w1`` is updated in place."""
    n, out = w1.shape
    codes = np.empty((n, out), np.uint8)
    err = np.empty((n, out), np.float32)
    diag = np.ascontiguousarray(np.diagonal(u)).astype(np.float32)
    kernel = columns if get_num_threads() > 1 and n * n * out // 2 >= PARALLEL_MIN_WORK else columns_serial
    kernel(w1, u, scale, zero, diag, np.float32(qmax), codes, err)
    return codes, err
