"""CPU kernel throughput: numba vs torch eager vs plain numpy, as ratios to memory-copy bandwidth.

Everything is measured in this one process on a 4096x4096 fp32 weight, at 1
thread and at all cores: quantize (params + codes; GB/s of fp32 input),
dequantize from packed words (GB/s of fp32 output) and pack (GB/s of uint8
codes in), each divided by the bandwidth of a 64 MiB copy at the same thread
count (bytes read + written, the STREAM convention; the faster of numpy's and
a numba-parallel copy), remeasured before each row so that load drift on a
shared machine cancels. numba: median of 15 runs after a warm-up run (JIT
compile excluded); torch and numpy (0.1-1 s a call): median of 2 runs. numba
kernels write into preallocated outputs, like the copy; torch and numpy
allocate as they would in use. The last line is
``dequant_int4_g64_vs_copy=<ratio>`` (numba, 1 thread).

Example::

    .venv/bin/python benchmarks/kernels.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qflow.kernels import cpu  # noqa: E402  (imports numba)
from qflow.quant import affine, packing  # noqa: E402
from qflow.quant.dispatch import kernel_params  # noqa: E402
from qflow.quant.spec import QuantSpec  # noqa: E402
from qflow.quant.warmup import warmup  # noqa: E402

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

ROWS = COLS = 4096
COPY_BYTES = 64 << 20
GB = 1e9


@njit(parallel=True, cache=True)
def _parallel_copy(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = src[i]


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run if asked."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- plain vectorised numpy versions (same arithmetic as qflow.quant.affine) ----

def numpy_quantize(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    rows, cols = w.shape
    groups = w.reshape(rows, -1, spec.group_size)
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    qmax = np.float32(spec.qmax)
    if spec.symmetric:  # sym_f
        amax = np.maximum(np.abs(lo), np.abs(hi))
        amax[amax == 0] = 1
        scale = (np.float32(2) * amax / qmax).astype(np.float16).astype(np.float32)
        zero = np.full_like(scale, 1 << (spec.bits - 1))
    else:  # asym_z
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        both_zero = (lo == 0) & (hi == 0)
        lo[both_zero], hi[both_zero] = -1, 1
        scale = ((hi - lo) / qmax).astype(np.float16).astype(np.float32)
        zero = np.clip(np.rint(-lo / scale), 0, qmax)
    scale[~(np.isfinite(scale) & (scale > 0))] = 2.0 ** -24
    q = np.rint(groups / scale[..., None]) + zero[..., None]
    return np.clip(q, 0, qmax, out=q).astype(np.uint8).reshape(rows, cols)


def numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    rows, cols = codes.shape
    per = 32 // bits
    words = -(-cols // per)
    wide = np.zeros((rows, words * per), np.uint32)
    wide[:, :cols] = codes & ((1 << bits) - 1)
    shifted = wide.reshape(rows, words, per) << (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(shifted, axis=-1).view(np.int32)


def numpy_dequantize_packed(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec,
                            cols: int) -> np.ndarray:
    rows = packed.shape[0]
    per = 32 // spec.bits
    fields = (packed.view(np.uint32)[:, :, None] >> (np.arange(per, dtype=np.uint32) * spec.bits)) & spec.qmax
    codes = fields.reshape(rows, -1)[:, :cols].astype(np.float32).reshape(rows, -1, spec.group_size)
    return ((codes - zero[..., None]) * scale[..., None]).reshape(rows, cols)


# ---- measurement ----------------------------------------------------------------

def copy_bandwidth() -> tuple[float, float]:
    """(numpy copy GB/s, numba parallel copy GB/s) of a 64 MiB fp32 buffer, read + written bytes."""
    src = np.random.default_rng(0).random(COPY_BYTES // 4, dtype=np.float32)
    dst = np.empty_like(src)
    numpy_seconds = median_seconds(lambda: np.copyto(dst, src), 9)
    numba_seconds = median_seconds(lambda: _parallel_copy(src, dst), 9)
    return 2 * src.nbytes / numpy_seconds / GB, 2 * src.nbytes / numba_seconds / GB


def measure(threads: int, w: np.ndarray) -> dict:
    """Print one table at ``threads`` threads; returns {(op, bits, group, sym, impl): ratio to copy}."""
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    print(f"\n## {threads} thread(s); copy = the faster of numpy and numba-parallel copy, remeasured before each row")
    print(f"{'op':<11}{'bits':>5}{'group':>6}{'scheme':>7}{'copy':>11}"
          + "".join(f"{impl:>22}" for impl in ("numba", "torch", "numpy")))
    tw = torch.from_numpy(w)
    ratios: dict = {}

    def row(op: str, bits: int, group: int, sym: bool, nbytes: int, runs: dict) -> None:
        copy = max(copy_bandwidth())  # next to the row it divides, so load drift on a shared machine cancels
        cells = []
        for impl, fn in runs.items():
            fast = impl == "numba"  # torch/numpy take ~0.1-1 s a call: fewer runs keep the benchmark short
            gbps = nbytes / median_seconds(fn, 15 if fast else 2, warmup=fast) / GB
            ratios[(op, bits, group, sym, impl)] = gbps / copy
            cells.append(f"{gbps:8.2f} GB/s ({gbps / copy:5.3f}x)")
        scheme = "-" if op == "pack" else ("sym" if sym else "asym")
        print(f"{op:<11}{bits:>5}{group if op != 'pack' else '-':>6}{scheme:>7}{copy:>6.1f} GB/s"
              + "".join(f"{c:>22}" for c in cells))

    for bits in (4, 3):
        params = kernel_params(QuantSpec(bits=bits, group_size=64))
        codes = cpu.quantize(w, *cpu.compute_params(w, params), params)
        tcodes = torch.from_numpy(codes)
        packed = cpu.pack(codes, bits)
        assert np.array_equal(numpy_pack(codes, bits), packed)
        row("pack", bits, 0, False, codes.nbytes, {
            "numba": lambda: cpu.pack(codes, bits, out=packed),
            "torch": lambda: packing.pack_reference(tcodes, bits),
            "numpy": lambda: numpy_pack(codes, bits)})
        for group in (64, 128):
            for sym in (False, True):
                spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
                params = kernel_params(spec)
                scale, zero = cpu.compute_params(w, params)
                codes = np.empty(w.shape, np.uint8)
                cpu.quantize(w, scale, zero, params, out=codes)
                assert np.array_equal(numpy_quantize(w, spec), codes)

                def numba_quantize():
                    cpu.quantize(w, *cpu.compute_params(w, params), params, out=codes)

                row("quantize", bits, group, sym, w.nbytes, {
                    "numba": numba_quantize,
                    "torch": lambda: affine.quantize(tw, *affine.compute_params(tw, spec), spec),
                    "numpy": lambda: numpy_quantize(w, spec)})
                packed = cpu.pack(codes, bits)
                tpacked, tscale, tzero = torch.from_numpy(packed), torch.from_numpy(scale), torch.from_numpy(zero)
                out = np.empty(w.shape, np.float32)
                cpu.dequantize_packed(packed, scale, zero, params, COLS, out=out)
                assert np.array_equal(numpy_dequantize_packed(packed, scale, zero, spec, COLS), out)
                row("dequantize", bits, group, sym, out.nbytes, {
                    "numba": lambda: cpu.dequantize_packed(packed, scale, zero, params, COLS, out=out),
                    "torch": lambda: affine.dequantize(packing.unpack_reference(tpacked, bits, COLS), tscale, tzero,
                                                       spec),
                    "numpy": lambda: numpy_dequantize_packed(packed, scale, zero, spec, COLS)})
    return ratios


def main() -> None:
    cores = numba.config.NUMBA_NUM_THREADS
    print(f"qflow kernel benchmark: {ROWS}x{COLS} fp32 weight, {os.cpu_count()} CPUs, numba {numba.__version__}, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    w = np.random.default_rng(0).standard_normal((ROWS, COLS), dtype=np.float32)
    started = time.perf_counter()
    compiled = warmup()
    missing = sorted(set(cpu.kernel_variants()) - set(compiled))
    if missing:
        raise SystemExit(f"warmup did not compile {', '.join(missing)}")
    print(f"{len(compiled)} numba kernels compiled or loaded from cache in {time.perf_counter() - started:.1f} s "
          f"(not timed below)")
    one = measure(1, w)
    if cores > 1:
        measure(cores, w)
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    params = kernel_params(QuantSpec(bits=4, group_size=64))
    scale, zero = cpu.compute_params(w, params)
    packed = cpu.pack(cpu.quantize(w, scale, zero, params), 4)
    copy = max(copy_bandwidth())
    allocating = w.nbytes / median_seconds(lambda: cpu.dequantize_packed(packed, scale, zero, params, COLS), 15) / GB
    print(f"\nnumba int4 g64 dequantize incl. allocating its output (as the dispatcher does), 1 thread: "
          f"{allocating:.2f} GB/s ({allocating / copy:.3f}x copy at {copy:.1f} GB/s)")
    speedup = one[("quantize", 4, 64, False, "numba")] / one[("quantize", 4, 64, False, "torch")]
    print(f"quantize_speedup_vs_torch={speedup:.2f}")
    print(f"dequant_int4_g64_vs_copy={one[('dequantize', 4, 64, False, 'numba')]:.3f}")


if __name__ == "__main__":
    main()
