"""CUDA kernels (native/, built by ``make native``) bound through ctypes.

The ops of the quant core's dispatcher (qflow/quant/dispatch.py) on CUDA
tensors, told what to do by a :class:`~qflow.kernels.params.KernelParams`
(plain numbers; the nf4/fp4 code values are compiled into native/qflow_math.cuh,
selected by ``params.lookup``), with results bit-identical to the CPU
reference (qflow/quant/affine.py), plus :func:`gemv_w4a16` for batch-1 decode::

    from qflow.kernels import cuda
    if cuda.available():
        scale, zero = cuda.compute_params(w, params)            # w: CUDA [out, in]
        packed = cuda.quantize_pack(w, scale, zero, params)     # fused quantize + pack
        y = cuda.gemv_w4a16(x, packed, scale, zero, params.group_size)

Kernels run on ``torch.cuda.current_stream()`` of the tensors' device and
never synchronize. Every op also takes an optional keyword ``out=`` (a
preallocated contiguous result) for benchmarks and poisoned-buffer checks.
Scales/zeros in fp16 or bf16 are widened to fp32 (exactly) before a call.

Nothing here touches CUDA at import time; the library loads on first use.
:data:`host` runs the same per-thread kernel code on the CPU (CPU tensors;
slow) so the arithmetic can be tested on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from pathlib import Path

import torch

from ..errors import QflowError
from .params import LOOKUPS, KernelParams, packed_words, per_word

log = logging.getLogger("qflow.kernels")

ABI_VERSION = 1  # must equal QFLOW_ABI_VERSION in native/qflow_kernels.h

# QFLOW_KIND_*: the element-wise kernels' decode rule; NF4/FP4 are KernelParams.lookup's codes
_KIND_AFFINE = 0
_KIND_AFFINE_FLOAT_ZERO = 3
_PARAM_F32, _PARAM_F16 = 0, 1
_INVALID_VALUE = 1  # cudaErrorInvalidValue

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_ELEMENTWISE = [_P, _I64, _I64, _I64, _I64, _P, _P, _INT, _INT, _P]
# argument types of each op, without the trailing stream of the device versions
_SIGNATURES: dict[str, list] = {
    "group_minmax": [_P, _P, _I64, _I64, _I64, _P, _P],
    "params_from_minmax": [_P, _P, _I64, _INT, _INT, _INT, _INT, _P, _P],
    "compute_params": [_P, _I64, _I64, _I64, _INT, _INT, _INT, _INT, _P, _P],
    "quantize": _ELEMENTWISE,
    "quantize_pack": _ELEMENTWISE,
    "fake_quant": _ELEMENTWISE,
    "dequantize": _ELEMENTWISE,
    "dequantize_packed": _ELEMENTWISE,
    "pack": [_P, _I64, _I64, _INT, _P],
    "unpack": [_P, _I64, _I64, _INT, _P],
    "gemv_w4a16": [_P, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _I64, _INT, _P],
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def library_path() -> Path:
    """``$QFLOW_NATIVE_LIB`` or ``native/build/libqflow_kernels.so`` of this checkout."""
    override = os.environ.get("QFLOW_NATIVE_LIB")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "native" / "build" / "libqflow_kernels.so"


def built() -> bool:
    return library_path().is_file()


def _load() -> ctypes.CDLL:
    global _lib, _load_error
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not path.is_file():
            raise QflowError(f"the CUDA kernel library {path} is not built",
                             fix="run `make native` (needs nvcc; no GPU needed to build)")
        lib = ctypes.CDLL(str(path))
        lib.qflow_abi_version.restype = _INT
        found = lib.qflow_abi_version()
        if found != ABI_VERSION:
            _load_error = f"{path} has ABI version {found}, qflow expects {ABI_VERSION}"
            raise QflowError(_load_error, fix="rebuild it: python native/build.py --force")
        lib.qflow_error_string.argtypes = [_INT]
        lib.qflow_error_string.restype = ctypes.c_char_p
        lib.qflow_cuda_versions.argtypes = [ctypes.POINTER(_INT), ctypes.POINTER(_INT)]
        lib.qflow_cuda_versions.restype = _INT
        lib.qflow_busy_wait.argtypes = [_I64, _P]
        lib.qflow_busy_wait.restype = _INT
        for name, argtypes in _SIGNATURES.items():
            device_fn = getattr(lib, "qflow_" + name)
            device_fn.argtypes = argtypes + [_P]
            device_fn.restype = _INT
            host_fn = getattr(lib, "qflow_host_" + name)
            host_fn.argtypes = argtypes
            host_fn.restype = _INT
        _lib = lib
        return lib


def available() -> bool:
    """True when the library is built, loads, and torch sees a CUDA device."""
    global _load_error
    if not built() or not torch.cuda.is_available():
        return False
    if _load_error is not None:
        return False
    try:
        _load()
        runtime, driver = cuda_versions()
        if driver // 1000 < runtime // 1000:  # CUDA runtimes need a driver of their major version
            raise QflowError(f"the GPU driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but "
                             f"{library_path()} was built with CUDA {runtime // 1000}.{runtime % 1000 // 10}",
                             fix="rebuild it with an older nvcc: NVCC=/path/to/nvcc python native/build.py --force")
    except (OSError, QflowError) as err:
        _load_error = _load_error or str(err)
        log.warning("CUDA kernels unavailable: %s", _load_error)
        return False
    return True


def cuda_versions() -> tuple[int, int]:
    """(runtime, driver) CUDA versions as integers, e.g. (13000, 13000); driver 0 = none."""
    lib = _load()
    runtime, driver = _INT(0), _INT(0)
    lib.qflow_cuda_versions(ctypes.byref(runtime), ctypes.byref(driver))
    return runtime.value, driver.value


def busy_wait(nanoseconds: int, device: torch.device | None = None) -> None:
    """Occupy the current stream for ``nanoseconds`` without touching memory (benchmarks)."""
    lib = _load()
    with torch.cuda.device(device):
        _check(lib.qflow_busy_wait(int(nanoseconds), torch.cuda.current_stream().cuda_stream), "busy_wait")


def _check(rc: int, op: str) -> None:
    if rc == 0:
        return
    message = _load().qflow_error_string(rc).decode()
    if rc == _INVALID_VALUE:
        raise ValueError(f"qflow_{op}: the kernel rejected its arguments ({message})")
    raise RuntimeError(f"qflow_{op} failed with CUDA error {rc}: {message}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Ops:
    """The ops on CUDA tensors (``host=False``) or on CPU tensors through the host twins."""

    def __init__(self, host: bool):
        self.host = host

    # ---- plumbing ---------------------------------------------------------
    def _call(self, op: str, device: torch.device, *args) -> None:
        lib = _load()
        if self.host:
            _check(getattr(lib, "qflow_host_" + op)(*args), op)
            return
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _check(getattr(lib, "qflow_" + op)(*args, stream), op)

    def _device(self, *tensors: torch.Tensor | None) -> torch.device:
        devices = {t.device for t in tensors if t is not None}
        if len(devices) != 1:
            raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
        device = devices.pop()
        wanted = "cpu" if self.host else "cuda"
        if device.type != wanted:
            raise ValueError(f"qflow.kernels.cuda{'.host' if self.host else ''} needs {wanted} tensors, "
                             f"got {device}")
        return device

    @staticmethod
    def _out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        if out is None:
            return torch.empty(shape, dtype=dtype, device=device)
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device \
                or not out.is_contiguous():
            raise ValueError(f"out= must be a contiguous {dtype} tensor of shape {tuple(shape)} on "
                             f"{device}; got {out.dtype} {tuple(out.shape)} on {out.device}")
        return out

    @staticmethod
    def _matrix(t: torch.Tensor, name: str) -> tuple[int, int]:
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [out, in]; got shape {tuple(t.shape)}")
        return int(t.shape[0]), int(t.shape[1])

    @staticmethod
    def _layout(group_size: int, rows: int, cols: int) -> tuple[int, int, tuple[int, int]]:
        """(group, param_row_stride, param shape) of a [rows, cols] weight."""
        if group_size > 0:
            n_groups = math.ceil(cols / group_size)
            return group_size, n_groups, (rows, n_groups)
        if group_size == -1:
            return max(cols, 1), 1, (rows, 1)
        return max(cols, 1), 0, (1, 1)

    @staticmethod
    def _kind(params: KernelParams) -> int:
        if params.lookup != LOOKUPS["none"]:
            return params.lookup
        # HQQ's fp16 zero is added before rounding, an integer one after
        return _KIND_AFFINE_FLOAT_ZERO if params.float_zero else _KIND_AFFINE

    def _params(self, scale: torch.Tensor, zero: torch.Tensor | None, params: KernelParams,
                shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = scale.to(torch.float32).contiguous()
        if scale.numel() != shape[0] * shape[1]:
            raise ValueError(f"scale has {scale.numel()} values; group_size {params.group_size} "
                             f"needs shape {shape}")
        if params.lookup != LOOKUPS["none"]:
            return scale, None
        if zero is None:
            raise ValueError(f"zero is required for an affine format (scheme code {params.scheme})")
        zero = zero.to(torch.float32).contiguous()
        if zero.numel() != scale.numel():
            raise ValueError(f"zero has {zero.numel()} values, scale {scale.numel()}")
        return scale, zero

    # ---- ops (those of qflow.quant.dispatch, with KernelParams for a spec) --
    def compute_params(self, w: torch.Tensor, params: KernelParams, *,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        params.validate()
        rows, cols = self._matrix(w, "w")
        device = self._device(w)
        w = w.to(torch.float32).contiguous()
        group, _, shape = self._layout(params.group_size, rows, cols)
        scale = self._out(out[0] if out else None, shape, torch.float32, device)
        zero = self._out(out[1] if out else None, shape, torch.float32, device)
        if rows * cols == 0:
            return scale, zero
        scheme, bits = params.scheme, params.bits  # a lookup format: SCHEMES["absmax"], 4 bits
        scale_dtype = params.scale_dtype
        zero_float = int(params.float_zero)  # read by the asym_a/asym_h rules only
        if params.group_size != 0:
            self._call("compute_params", device, w.data_ptr(), rows, cols, group, scheme, bits,
                       scale_dtype, zero_float, scale.data_ptr(), zero.data_ptr())
            return scale, zero
        # per tensor: min/max per row, then over the rows, then the parameters
        lo = torch.empty(rows, dtype=torch.float32, device=device)
        hi = torch.empty(rows, dtype=torch.float32, device=device)
        self._call("group_minmax", device, w.data_ptr(), w.data_ptr(), rows, cols, cols,
                   lo.data_ptr(), hi.data_ptr())
        lo1 = torch.empty(1, dtype=torch.float32, device=device)
        hi1 = torch.empty(1, dtype=torch.float32, device=device)
        self._call("group_minmax", device, lo.data_ptr(), hi.data_ptr(), 1, rows, rows,
                   lo1.data_ptr(), hi1.data_ptr())
        self._call("params_from_minmax", device, lo1.data_ptr(), hi1.data_ptr(), 1, scheme, bits,
                   scale_dtype, zero_float, scale.data_ptr(), zero.data_ptr())
        return scale, zero

    def _elementwise(self, op: str, source: torch.Tensor, rows: int, cols: int, scale: torch.Tensor,
                     zero: torch.Tensor | None, params: KernelParams, out: torch.Tensor) -> torch.Tensor:
        params.validate()
        if rows * cols == 0:
            return out
        group, row_stride, shape = self._layout(params.group_size, rows, cols)
        scale, zero = self._params(scale, zero, params, shape)
        self._device(source, scale, zero, out)
        self._call(op, source.device, source.data_ptr(), rows, cols, group, row_stride,
                   scale.data_ptr(), _ptr(zero), self._kind(params), params.bits, out.data_ptr())
        return out

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, params: KernelParams, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self._matrix(w, "w")
        device = self._device(w)
        out = self._out(out, (rows, cols), torch.uint8, device)
        return self._elementwise("quantize", w.to(torch.float32).contiguous(), rows, cols, scale,
                                 zero, params, out)

    def quantize_pack(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      params: KernelParams, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``pack(quantize(w, scale, zero, params), params.bits)`` in one pass."""
        rows, cols = self._matrix(w, "w")
        device = self._device(w)
        out = self._out(out, (rows, packed_words(cols, params.bits)), torch.int32, device)
        return self._elementwise("quantize_pack", w.to(torch.float32).contiguous(), rows, cols,
                                 scale, zero, params, out)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   params: KernelParams, *, out: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self._matrix(codes, "codes")
        device = self._device(codes)
        out = self._out(out, (rows, cols), torch.float32, device)
        return self._elementwise("dequantize", codes.to(torch.uint8).contiguous(), rows, cols,
                                 scale, zero, params, out)

    def fake_quant(self, w: torch.Tensor, params: KernelParams, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self._matrix(w, "w")
        device = self._device(w)
        out = self._out(out, (rows, cols), torch.float32, device)
        w = w.to(torch.float32).contiguous()
        scale, zero = self.compute_params(w, params)
        return self._elementwise("fake_quant", w, rows, cols, scale, zero, params, out)

    def pack(self, codes: torch.Tensor, bits: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self._matrix(codes, "codes")
        device = self._device(codes)
        out = self._out(out, (rows, packed_words(cols, bits)), torch.int32, device)
        if rows * cols:
            codes = codes.to(torch.uint8).contiguous()
            self._call("pack", device, codes.data_ptr(), rows, cols, bits, out.data_ptr())
        return out

    def unpack(self, packed: torch.Tensor, bits: int, in_features: int, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
        rows, words = self._matrix(packed, "packed")
        device = self._device(packed)
        if words != packed_words(in_features, bits):
            raise ValueError(f"packed has {words} words per row; {in_features} {bits}-bit codes "
                             f"need {packed_words(in_features, bits)} ({per_word(bits)} per word)")
        out = self._out(out, (rows, in_features), torch.uint8, device)
        if rows * in_features:
            packed = packed.to(torch.int32).contiguous()
            self._call("unpack", device, packed.data_ptr(), rows, in_features, bits, out.data_ptr())
        return out

    def dequantize_packed(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          params: KernelParams, in_features: int, *,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        rows, words = self._matrix(packed, "packed")
        device = self._device(packed)
        if words != packed_words(in_features, params.bits):
            raise ValueError(f"packed has {words} words per row; {in_features} {params.bits}-bit codes "
                             f"need {packed_words(in_features, params.bits)}")
        out = self._out(out, (rows, in_features), torch.float32, device)
        return self._elementwise("dequantize_packed", packed.to(torch.int32).contiguous(), rows,
                                 in_features, scale, zero, params, out)

    def gemv_w4a16(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, group_size: int, *, out: torch.Tensor | None = None,
                   rows_per_warp: int = 0) -> torch.Tensor:
        """``y = x @ dequant(qweight).T`` for fp16 ``x [..., in]`` and 4-bit ``qweight [out, in/8]``.

        ``scale``/``zero``: ``[out, n_groups]`` fp16 or fp32 (``zero=None``: symmetric, 8).
        ``group_size`` as in KernelParams (> 0, -1 per row, 0 per tensor). fp32 accumulation,
        fp16 result ``[..., out]``. Meant for a handful of rows of ``x`` (decode).
        """
        if x.dtype != torch.float16:
            raise ValueError(f"x must be float16; got {x.dtype}")
        rows, words = self._matrix(qweight, "qweight")
        cols = int(x.shape[-1])
        if qweight.dtype != torch.int32 or words != packed_words(cols, 4):
            raise ValueError(f"qweight must be int32 [out, {packed_words(cols, 4)}] for in={cols}; "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        device = self._device(x, qweight, scale, zero)
        batch = x.numel() // cols if cols else 0
        if group_size < -1:
            raise ValueError(f"group_size must be > 0, -1 or 0; got {group_size}")
        group, row_stride, shape = self._layout(group_size, rows, cols)
        if scale.numel() != shape[0] * shape[1] or (zero is not None and zero.numel() != scale.numel()):
            raise ValueError(f"scale/zero must have shape {shape} for group_size={group_size}; got "
                             f"{tuple(scale.shape)} / {None if zero is None else tuple(zero.shape)}")
        if scale.dtype == torch.float16 and (zero is None or zero.dtype == torch.float16):
            param_dtype = _PARAM_F16
        else:
            param_dtype, scale = _PARAM_F32, scale.to(torch.float32)
            zero = None if zero is None else zero.to(torch.float32)
        scale = scale.contiguous()
        zero = None if zero is None else zero.contiguous()
        x2 = x.reshape(batch, cols).contiguous()
        qweight = qweight.contiguous()
        y = self._out(out, (*x.shape[:-1], rows), torch.float16, device)
        if batch * rows == 0:
            return y
        self._call("gemv_w4a16", device, x2.data_ptr(), qweight.data_ptr(), scale.data_ptr(),
                   _ptr(zero), param_dtype, batch, rows, cols, group, row_stride, rows_per_warp,
                   y.data_ptr())
        return y


_DEVICE = _Ops(host=False)
host = _Ops(host=True)  # same kernels' code on CPU tensors (tests without a GPU)


def compute_params(w: torch.Tensor, params: KernelParams, *,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) fp32 ``[out, n_groups]`` (``[1, 1]`` per tensor), as affine.compute_params."""
    return _DEVICE.compute_params(w, params, out=out)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, params: KernelParams, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes ``[out, in]``, as affine.quantize."""
    return _DEVICE.quantize(w, scale, zero, params, out=out)


def quantize_pack(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, params: KernelParams, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``[out, ceil(in / (32 // bits))]`` = pack(quantize(...)), fused."""
    return _DEVICE.quantize_pack(w, scale, zero, params, out=out)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, params: KernelParams, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[out, in]``, as affine.dequantize."""
    return _DEVICE.dequantize(codes, scale, zero, params, out=out)


def fake_quant(w: torch.Tensor, params: KernelParams, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(w)) with parameters from ``w``, as affine.fake_quant."""
    return _DEVICE.fake_quant(w, params, out=out)


def pack(codes: torch.Tensor, bits: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[out, in]`` -> int32 words (docs/METHODS.md §2.1), as packing.pack_reference."""
    return _DEVICE.pack(codes, bits, out=out)


def unpack(packed: torch.Tensor, bits: int, in_features: int, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 words -> uint8 ``[out, in_features]``, as packing.unpack_reference."""
    return _DEVICE.unpack(packed, bits, in_features, out=out)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      params: KernelParams, in_features: int, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[out, in_features]`` straight from packed words."""
    return _DEVICE.dequantize_packed(packed, scale, zero, params, in_features, out=out)


def gemv_w4a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, group_size: int, *, out: torch.Tensor | None = None,
               rows_per_warp: int = 0) -> torch.Tensor:
    """fp16 ``x @ W.T`` with 4-bit ``W`` dequantized on the fly; see _Ops.gemv_w4a16."""
    return _DEVICE.gemv_w4a16(x, qweight, scale, zero, group_size, out=out,
                              rows_per_warp=rows_per_warp)
