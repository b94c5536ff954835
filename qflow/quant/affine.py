"""Reference (torch, fp32) affine and lookup-table quantization, docs/METHODS.md §1.

This module is the *definition* the numba and CUDA kernels must match bit
for bit. Everything works on a weight ``w`` of shape ``[out, in]`` split into
groups along the input dimension; parameters have shape ``[out, n_groups]``.

Rules fixed here and followed by every kernel:

* all arithmetic in fp32; ``round`` is round-half-to-even;
* the scale is computed in fp32, guarded, then rounded through the spec's
  ``scale_dtype`` (fp16 by default) *before* codes are computed, so the
  stored scale is exactly the one the codes were made with;
* ``code = clamp(rint(w / scale) + zero, 0, qmax)`` (division, not
  multiplication by a reciprocal), and ``w_hat = (float(code) - zero) * scale``;
* a partial last group (``pad_last_group``) takes its parameters from its
  valid columns only.
"""

from __future__ import annotations

import torch

from .spec import QuantSpec

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes fp4: bit 3 = sign, magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12
_FP4_MAG = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_TABLE = tuple(m / 12 for m in _FP4_MAG) + tuple(-m / 12 for m in _FP4_MAG)

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal)


def lut(spec: QuantSpec) -> torch.Tensor:
    return torch.tensor(NF4_TABLE if spec.format == "nf4" else FP4_TABLE, dtype=torch.float32)


def grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``[out, n_groups, G]`` fp32 view of ``w``; a partial last group is padded by
    repeating its last valid column (neutral for min/max/absmax)."""
    w = w.float()
    if spec.group_size == 0:
        return w.reshape(1, 1, -1)
    out, cols = w.shape
    g = spec.effective_group(cols)
    n = -(-cols // g)
    pad = n * g - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out, n, g)


def _round_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    s = scale.to(_SCALE_DTYPES[spec.scale_dtype]).float()
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.full_like(s, _TINY))
    return s


def compute_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of shape ``[out, n_groups]`` (``[1, 1]`` per tensor), fp32."""
    wg = grouped(w, spec)
    lo = wg.amin(dim=-1)
    hi = wg.amax(dim=-1)
    if spec.format in ("nf4", "fp4"):
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # all-zero block decodes to 0 anyway
        return scale, torch.zeros_like(scale)
    qmax = float(spec.qmax)
    half = float(1 << (spec.bits - 1))
    if spec.scheme == "asym_z":
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        both0 = (lo == 0) & (hi == 0)
        lo = torch.where(both0, torch.full_like(lo, -1.0), lo)
        hi = torch.where(both0, torch.full_like(hi, 1.0), hi)
        scale = _round_scale((hi - lo) / qmax, spec)
        zero = torch.clamp(torch.round(-lo / scale), 0.0, qmax)
    elif spec.scheme in ("asym_a", "asym_h"):
        scale = _round_scale(torch.clamp(hi - lo, min=1e-5) / qmax, spec)
        if spec.zero_float:
            zero = (-lo / scale).to(torch.float16).float()
        else:
            zero = torch.clamp(-torch.round(lo / scale), 0.0, qmax)
    elif spec.scheme == "sym_f":
        amax = torch.maximum(lo.abs(), hi.abs())
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # GPTQ: xmin=-1, xmax=+1
        scale = _round_scale(2 * amax / qmax, spec)
        zero = torch.full_like(scale, half)
    elif spec.scheme == "sym_r":
        amax = torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=1e-5)
        scale = _round_scale(amax / (half - 1), spec)
        zero = torch.full_like(scale, half)
    else:  # pragma: no cover - validated by QuantSpec
        raise ValueError(spec.scheme)
    return scale, zero


def has_float_zero(spec: QuantSpec) -> bool:
    """Whether ``compute_params`` gives a fractional (fp16) zero: ``zero_float`` with asym_a/asym_h."""
    return spec.zero_float and spec.scheme in ("asym_a", "asym_h")


def _expand(p: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """Per-group params ``[out, n_groups]`` broadcast to per-element ``[out, in]``."""
    out, cols = shape
    if spec.group_size == 0:
        return p.reshape(1, 1).expand(out, cols)
    g = spec.effective_group(cols)
    return p.repeat_interleave(g, dim=1)[:, :cols]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (uint8, ``[out, in]``) for ``w`` under given parameters."""
    w = w.float()
    s = _expand(scale, spec, tuple(w.shape))
    if spec.format in ("nf4", "fp4"):
        table = lut(spec)
        x = w / s
        return torch.argmin((x.unsqueeze(-1) - table).abs(), dim=-1).to(torch.uint8)
    z = _expand(zero, spec, tuple(w.shape))
    if has_float_zero(spec):  # HQQ rounds w/s + z (METHODS §7); a fractional code would be truncated
        q = torch.clamp(torch.round(w / s + z), 0.0, float(spec.qmax))
    else:
        q = torch.clamp(torch.round(w / s) + z, 0.0, float(spec.qmax))
    return q.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fp32 ``[out, in]`` reconstruction ``(code - zero) * scale`` (or ``TABLE[code] * scale``)."""
    shape = tuple(codes.shape)
    s = _expand(scale.float(), spec, shape)
    if spec.format in ("nf4", "fp4"):
        return lut(spec)[codes.long()] * s
    z = _expand(zero.float(), spec, shape)
    return (codes.float() - z) * s


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(w))`` with parameters computed from ``w`` itself."""
    scale, zero = compute_params(w, spec)
    return dequantize(quantize(w, scale, zero, spec), scale, zero, spec)


# ---- QLoRA double quantization of absmax (docs/METHODS.md §1) -----------------

def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes ``create_dynamic_map(signed=True)``: 256 sorted values in [-1, 1]."""
    values: list[float] = []
    for i in range(7):
        n = 2 ** i
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2) * (10.0 ** (i - 6))
        values += mids.tolist() + (-mids).tolist()
    values += [0.0, 1.0]
    out = torch.tensor(sorted(values), dtype=torch.float32)
    assert out.numel() == 256, out.numel()
    return out


def double_quantize(absmax: torch.Tensor, block: int = 256) -> dict[str, torch.Tensor]:
    """Quantize fp32 absmax values to 8-bit dynamic codes (block 256, mean offset)."""
    flat = absmax.float().reshape(-1)
    offset = flat.mean()
    centered = flat - offset
    n = flat.numel()
    nb = -(-n // block)
    padded = torch.cat([centered, centered.new_zeros(nb * block - n)]).reshape(nb, block)
    absmax2 = padded.abs().amax(dim=1)
    absmax2 = torch.where(absmax2 > 0, absmax2, torch.ones_like(absmax2))
    dyn = dynamic_map_signed()
    normed = padded / absmax2[:, None]
    codes = torch.argmin((normed.unsqueeze(-1) - dyn).abs(), dim=-1).to(torch.uint8)
    return {"codes": codes.reshape(-1)[:n].reshape(absmax.shape), "absmax2": absmax2,
            "offset": offset.reshape(1), "map": dyn}


def double_dequantize(dq: dict[str, torch.Tensor], block: int = 256) -> torch.Tensor:
    codes = dq["codes"].reshape(-1).long()
    n = codes.numel()
    scale2 = dq["absmax2"].repeat_interleave(block)[:n]
    return (dq["map"][codes] * scale2 + dq["offset"]).reshape(dq["codes"].shape)
