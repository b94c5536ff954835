"""One entry point per quantization hot loop: CUDA, else numba, else the torch reference.

Every function takes/returns torch tensors and a QuantSpec; shapes follow
qflow.quant.affine (weights ``[out, in]``, params ``[out, n_groups]``) and
qflow.quant.packing. The kernels (qflow/kernels/) take plain numbers: this
module translates a spec into their :class:`~qflow.kernels.params.KernelParams`
(:func:`kernel_params`) and the nf4/fp4 code values into an array
(:func:`kernel_table`). All three backends give bit-identical results. The
backend of a call:

* ``QFLOW_KERNEL_BACKEND=torch|numba`` forces one (tests, benchmarks);
  a forced numba runs GPU tensors on the CPU and moves the result back;
* otherwise CUDA when the tensor lives on a GPU and ``qflow.kernels.cuda``
  reports ``available()``; numba for CPU tensors when it imports; the torch
  reference (``qflow.quant.affine`` / ``packing``) last.

The choice is logged once per operation and backend.

Example::

    backend_for("dequantize_packed", packed)   # "numba" for a CPU tensor
    w_hat = dequantize_packed(packed, scale, zero, spec, in_features)
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable
from types import ModuleType

import numpy as np
import torch

from ..errors import QflowError
from ..kernels.params import LOOKUPS, SCALE_DTYPES, SCHEMES, KernelParams
from . import affine, packing
from .spec import QuantSpec

log = logging.getLogger("qflow.kernels")
_announced: set[tuple[str, str]] = set()

OPS = ("compute_params", "quantize", "dequantize", "fake_quant", "pack", "unpack", "dequantize_packed",
       "gptq_columns")
BACKEND_ENV = "QFLOW_KERNEL_BACKEND"
_FORCEABLE = ("torch", "numba")
_CUDA_MODULE = "qflow.kernels.cuda"
_modules: dict[str, ModuleType | None] = {}


# ---- a QuantSpec in the kernels' terms ---------------------------------------------

def kernel_params(spec: QuantSpec) -> KernelParams:
    """The plain numbers the kernels read for ``spec``.

    Example::

        kernel_params(QuantSpec(bits=4, group_size=64)).scheme == SCHEMES["asym_z"]
    """
    if spec.format in ("nf4", "fp4"):
        return KernelParams(bits=4, group_size=spec.group_size, scheme=SCHEMES["absmax"],
                            scale_dtype=SCALE_DTYPES["float32"], float_zero=False,
                            lookup=LOOKUPS[spec.format]).validate()
    return KernelParams(bits=spec.bits, group_size=spec.group_size, scheme=SCHEMES[spec.scheme],
                        scale_dtype=SCALE_DTYPES[spec.scale_dtype], float_zero=affine.has_float_zero(spec)).validate()


@functools.cache
def _table(fmt: str) -> np.ndarray:
    table = np.array(affine.NF4_TABLE if fmt == "nf4" else affine.FP4_TABLE, np.float32)
    table.flags.writeable = False  # shared by every call
    return table


def kernel_table(spec: QuantSpec) -> np.ndarray | None:
    """The 16 fp32 code values of an nf4/fp4 spec (read-only), None for an affine one.

    Example::

        kernel_table(QuantSpec(format="nf4", group_size=64))[0]   # -1.0
    """
    return _table(spec.format) if spec.format in ("nf4", "fp4") else None


# ---- backend choice ------------------------------------------------------------------

def _announce(op: str, backend: str) -> None:
    if (op, backend) not in _announced:
        _announced.add((op, backend))
        log.info("kernel %s -> %s", op, backend)


def _numba_kernels() -> ModuleType | None:
    """``qflow.kernels.cpu``, or None (reported once) when numba cannot be imported."""
    if "numba" not in _modules:
        try:
            from ..kernels import cpu
        except ImportError as err:  # numba missing or broken: the torch reference still works
            log.warning("numba kernels unavailable (%s); CPU tensors use the torch reference", err)
            cpu = None
        _modules["numba"] = cpu
    return _modules["numba"]


def _cuda_kernels() -> ModuleType | None:
    """``qflow.kernels.cuda`` when it imports and its library is usable, else None."""
    if "cuda" not in _modules:
        cuda = None
        try:
            cuda = importlib.import_module(_CUDA_MODULE)
        except ModuleNotFoundError as err:
            if err.name != _CUDA_MODULE:  # the binding exists but a dependency of it is missing
                log.warning("CUDA kernels unavailable (%s); GPU tensors use the torch reference", err)
        except ImportError as err:
            log.warning("CUDA kernels unavailable (%s); GPU tensors use the torch reference", err)
        _modules["cuda"] = cuda if cuda is not None and cuda.available() else None
    return _modules["cuda"]


def backend_for(op: str, tensor: torch.Tensor) -> str:
    """Name of the backend (``"cuda"``, ``"numba"`` or ``"torch"``) that ``op`` would use on ``tensor``.

    Example::

        backend_for("quantize", torch.randn(4, 64))   # "numba" where numba imports
    """
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; expected one of {', '.join(OPS)}")
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in _FORCEABLE:
            raise QflowError(f"{BACKEND_ENV}={forced!r} is not a kernel backend", where="environment",
                             fix=f"set {BACKEND_ENV} to one of {', '.join(_FORCEABLE)}, or unset it")
        if forced == "numba" and _numba_kernels() is None:
            raise QflowError(f"{BACKEND_ENV}=numba but numba cannot be imported", where="environment",
                             fix=f"install numba (requirements.txt) or unset {BACKEND_ENV}")
        return forced
    if tensor.device.type == "cuda" and _cuda_kernels() is not None:
        return "cuda"
    if tensor.device.type == "cpu" and _numba_kernels() is not None:
        return "numba"
    return "torch"


def _pick(op: str, tensor: torch.Tensor) -> str:
    backend = backend_for(op, tensor)
    _announce(op, backend)
    return backend


def _np(t: torch.Tensor, dtype: torch.dtype):
    """numpy view (a copy only where dtype, device or layout need one) of a tensor."""
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


def _back(a, like: torch.Tensor) -> torch.Tensor:
    """numpy result -> tensor on ``like``'s device (a forced numba may run GPU tensors)."""
    t = torch.from_numpy(a)
    return t if like.device.type == "cpu" else t.to(like.device)


def _zero_np(zero: torch.Tensor | None, spec: QuantSpec):
    return None if zero is None or spec.format != "int" else _np(zero, torch.float32)


# ---- the ops ---------------------------------------------------------------------------

def compute_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _pick("compute_params", w)
    if backend == "cuda":
        return _cuda_kernels().compute_params(w, kernel_params(spec))
    if backend == "numba":
        scale, zero = _numba_kernels().compute_params(_np(w, torch.float32), kernel_params(spec))
        return _back(scale, w), _back(zero, w)
    return affine.compute_params(w, spec)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    backend = _pick("quantize", w)
    if backend == "cuda":
        return _cuda_kernels().quantize(w, scale, zero, kernel_params(spec))
    if backend == "numba":
        codes = _numba_kernels().quantize(_np(w, torch.float32), _np(scale, torch.float32), _zero_np(zero, spec),
                                          kernel_params(spec), kernel_table(spec))
        return _back(codes, w)
    return affine.quantize(w, scale, zero, spec)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    backend = _pick("dequantize", codes)
    if backend == "cuda":
        return _cuda_kernels().dequantize(codes, scale, zero, kernel_params(spec))
    if backend == "numba":
        w_hat = _numba_kernels().dequantize(_np(codes, torch.uint8), _np(scale, torch.float32),
                                            _zero_np(zero, spec), kernel_params(spec), kernel_table(spec))
        return _back(w_hat, codes)
    return affine.dequantize(codes, scale, zero, spec)


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    backend = _pick("fake_quant", w)
    if backend == "cuda":
        return _cuda_kernels().fake_quant(w, kernel_params(spec))
    if backend == "numba":
        return _back(_numba_kernels().fake_quant(_np(w, torch.float32), kernel_params(spec), kernel_table(spec)), w)
    return affine.fake_quant(w, spec)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    backend = _pick("pack", codes)
    if backend == "cuda":
        return _cuda_kernels().pack(codes, bits)
    if backend == "numba":
        return _back(_numba_kernels().pack(_np(codes, torch.uint8), bits), codes)
    return packing.pack_reference(codes, bits)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    backend = _pick("unpack", packed)
    if backend == "cuda":
        return _cuda_kernels().unpack(packed, bits, in_features)
    if backend == "numba":
        return _back(_numba_kernels().unpack(_np(packed, torch.int32), bits, in_features), packed)
    return packing.unpack_reference(packed, bits, in_features)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      spec: QuantSpec, in_features: int) -> torch.Tensor:
    backend = _pick("dequantize_packed", packed)
    if backend == "cuda":
        return _cuda_kernels().dequantize_packed(packed, scale, zero, kernel_params(spec), in_features)
    if backend == "numba":
        w_hat = _numba_kernels().dequantize_packed(_np(packed, torch.int32), _np(scale, torch.float32),
                                                   _zero_np(zero, spec), kernel_params(spec), in_features,
                                                   kernel_table(spec))
        return _back(w_hat, packed)
    return affine.dequantize(packing.unpack_reference(packed, spec.bits, in_features), scale, zero, spec)


def gptq_columns(w1: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: float,
                 reference: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over one lazy batch: (codes uint8, err float32) ``[n, out]``; ``w1`` updated in place.

    numba on CPU (``qflow/kernels/gptq_cpu.py``); elsewhere ``reference`` (the torch loop
    of ``qflow.quant.algos.gptq``, passed in: this layer does not import the algorithms).
    """
    if _pick("gptq_columns", w1) != "numba" or w1.device.type != "cpu" or not w1.is_contiguous():
        return reference(w1, u, scale, zero, qmax)
    from ..kernels import gptq_cpu

    codes, err = gptq_cpu.run_columns(w1.numpy(), _np(u, torch.float32), _np(scale, torch.float32),
                                      _np(zero, torch.float32), qmax)
    return torch.from_numpy(codes), torch.from_numpy(err)
