"""SmoothQuant (docs/METHODS.md §6, following mit-han-lab/smoothquant ``smooth.py`` / ``fake_quant.py``).

Per-site math only: smoothing factors from activation and weight statistics,
the exact fold into the preceding norm and the following linears, and the
W8A8 fake quantizers (SYM-R). Nothing here mutates its inputs.

Arithmetic runs in ``float32`` or, when any input is ``float64``, in
``float64``; results are returned in the dtype of the tensor they replace.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..affine import compute_params, quantize
from ..spec import QuantSpec

_CLAMP = 1e-5


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dt = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dt = torch.float64
    return dt


def smooth_scales(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor] | torch.Tensor,
                  alpha: float = 0.5) -> torch.Tensor:
    """Smoothing factors ``s [in]``: ``s_j = clamp(xmax_j^α / wmax_j^(1−α), 1e-5)``.

    ``x_absmax``: per-input-channel running max of ``|X|``. ``weights``: the
    linears that consume this input (``[out_k, in]`` each, e.g. q/k/v or
    gate/up); ``wmax_j`` is the max of ``|W_k[:, j]|`` over output rows and over
    the linears, clamped to ``≥ 1e-5``.
    """
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    if len(weights) == 0:
        raise ValueError("smooth_scales needs at least one weight")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    x_absmax = x_absmax.detach().reshape(-1)
    n_in = x_absmax.numel()
    for w in weights:
        if w.dim() != 2 or w.shape[1] != n_in:
            raise ValueError(f"smooth_scales: weight of shape {tuple(w.shape)} does not take "
                             f"{n_in} input channels")
    dt = _compute_dtype(x_absmax, *weights)
    wmax = torch.stack([w.detach().to(dt).abs().amax(dim=0) for w in weights]).amax(dim=0)
    wmax = wmax.clamp(min=_CLAMP)
    xmax = x_absmax.to(dt)
    if not bool(torch.isfinite(xmax).all()) or bool((xmax < 0).any()):
        raise ValueError("smooth_scales: x_absmax must be finite and non-negative")
    s = (xmax.pow(alpha) / wmax.pow(1.0 - alpha)).clamp(min=_CLAMP)
    return s


def fold_into_norm(norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
                   s: torch.Tensor, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(γ/s, β/s)`` for the norm preceding the smoothed linears (``β`` may be ``None``).

    ``offset``: 1 for a norm that scales by ``1 + w`` (Gemma), giving ``w' = (1 + w)/s - 1``.
    """
    if norm_weight.shape != s.shape or (norm_bias is not None and norm_bias.shape != s.shape):
        raise ValueError(f"fold_into_norm: shapes differ (weight {tuple(norm_weight.shape)}, "
                         f"bias {None if norm_bias is None else tuple(norm_bias.shape)}, s {tuple(s.shape)})")
    dt = _compute_dtype(norm_weight, norm_bias, s)
    sd = s.detach().to(dt)
    w = ((norm_weight.detach().to(dt) + offset) / sd - offset).to(norm_weight.dtype)
    b = None if norm_bias is None else (norm_bias.detach().to(dt) / sd).to(norm_bias.dtype)
    return w, b


def scale_linear_inputs(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """New weight ``W[:, j]·s_j`` (``[out, in]``) for a linear that reads the smoothed input."""
    if weight.dim() != 2 or weight.shape[1] != s.numel():
        raise ValueError(f"scale_linear_inputs: weight {tuple(weight.shape)} vs s {tuple(s.shape)}")
    dt = _compute_dtype(weight, s)
    return (weight.detach().to(dt) * s.detach().to(dt).reshape(1, -1)).to(weight.dtype)


def quantize_activation(x: torch.Tensor, bits: int = 8, granularity: str = "token") -> torch.Tensor:
    """Dynamic SYM-R fake quantization of activations ``x [..., in]``.

    Per token (one scale per row of the last dim) or per tensor:
    ``s = clamp(max|x|, 1e-5)/(2^(b−1)−1)``, ``x̂ = clamp(round(x/s), −qmax, qmax)·s``
    (``fake_quant.py::quantize_activation_per_{token,tensor}_absmax``; the clamp
    never binds there, it is kept as a guard). Returns ``x``'s dtype.
    """
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    if granularity not in ("token", "tensor"):
        raise ValueError(f"granularity must be 'token' or 'tensor', got {granularity!r}")
    qmax = float((1 << (bits - 1)) - 1)
    dt = _compute_dtype(x)
    xf = x.detach().to(dt)
    if granularity == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True) if xf.numel() else xf.new_zeros(xf.shape[:-1] + (1,))
    else:
        amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    scale = amax.clamp(min=_CLAMP) / qmax
    q = torch.round(xf / scale).clamp_(-qmax, qmax)
    return (q * scale).to(x.dtype)


def quantize_weight_per_channel_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 SYM-R weight quantization via the affine core.

    Returns ``(codes uint8 [out, in], scale fp32 [out, 1], zero fp32 [out, 1])``
    with ``w_hat = (code − 128)·scale`` (codes in ``[1, 255]``); spec
    ``QuantSpec(bits=8, group_size=-1, scheme="sym_r")``.
    """
    spec = INT8_CHANNEL_SPEC
    scale, zero = compute_params(W.detach(), spec)
    codes = quantize(W.detach(), scale, zero, spec)
    return codes, scale, zero


INT8_CHANNEL_SPEC = QuantSpec(bits=8, group_size=-1, scheme="sym_r")
