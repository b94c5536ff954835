"""HQQ — Half-Quadratic Quantization of one weight matrix (docs/METHODS.md §7).

Data-free: only the zero point is optimized, under an ``ℓp`` (``p < 1``)
reconstruction loss, with the half-quadratic split of mobiusml/hqq
(``optimize_weights_proximal``). Groups run along the input dimension
(HQQ ``axis=1``).

qflow conventions:

* the scale is rounded to ``spec.scale_dtype`` (fp16) *before* the zero is
  optimized, and every iteration uses that stored scale with the affine
  convention ``w_hat = (code − zero)·scale`` (codes from ``w/scale + zero``);
* the best zero seen is kept (the reference v2 solver's behaviour), then
  rounded to fp16 and the codes are recomputed against the stored
  ``(scale, zero)``, so ``affine.dequantize(codes, scale, zero, spec)`` is
  exactly the weight the reported ``final_error`` refers to;
* a partial last group (``pad_last_group``) takes its min/max and its zero
  mean over its valid columns only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..affine import dequantize, grouped
from ..spec import QuantSpec

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_TINY = 2.0 ** -24


@dataclass
class HQQResult:
    """``codes`` uint8 ``[out, in]``; ``scale``/``zero`` fp32 ``[out, n_groups]`` (fp16-representable);
    ``errors``: mean-abs reconstruction error of the min-max start (``errors[0]``) and of each
    accepted zero update (non-increasing with ``early_stop``; every evaluated iterate otherwise);
    ``final_error``: mean-abs error of ``affine.dequantize(codes, scale, zero, spec)``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    errors: list[float] = field(default_factory=list)
    final_error: float = float("nan")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding ``sign(x)·max(|x| − |x|^(p−1)/β, 0)`` (``p=1``: ``|x| − 1/β``)."""
    ax = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(ax - 1.0 / beta)
    return torch.sign(x) * torch.relu(ax - ax.pow(p - 1) / beta)


def _store_scale(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    dt = _DTYPES[spec.scale_dtype]
    s = x.clamp(max=torch.finfo(dt).max).to(dt).float()
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.full_like(s, _TINY))


class _ZeroProblem:
    """The half-quadratic zero-point problem of one grouped weight ``wg [R, ng, g]`` at a fixed scale.

    Rows are processed in chunks so the elementwise passes stay in cache; a
    partial last group (``pad`` repeated columns) counts its valid columns only.
    """

    def __init__(self, wg: torch.Tensor, scale: torch.Tensor, *, pad: int, n_valid: float, qmax: float,
                 lp_norm: float) -> None:
        R, ng, g = wg.shape
        self.wg, self.scale, self.qmax, self.lp_norm, self.n_valid = wg, scale, qmax, lp_norm, n_valid
        self.wd = wg / scale                                             # W in code units
        self.vmask = self.count = None
        if pad:
            valid = torch.ones(ng, g, dtype=torch.bool, device=wg.device)
            valid[-1, g - pad:] = False
            self.count = valid.sum(dim=-1, keepdim=True).to(torch.float32)  # [ng, 1]
            self.vmask = valid.to(torch.float32)
        rows = max(1, (1 << 17) // (ng * g))
        self.chunks = [(r0, min(r0 + rows, R)) for r0 in range(0, R, rows)]
        shape = (min(rows, R), ng, g)
        self.bufs = [torch.empty(shape, dtype=torch.float32, device=wg.device) for _ in range(4)]

    def step(self, z: torch.Tensor, b: float, update: bool) -> tuple[float, torch.Tensor | None]:
        """Mean-abs error at zero ``z`` and (if ``update``) the half-quadratic zero update."""
        qmax, lp_norm, vmask = self.qmax, self.lp_norm, self.vmask
        total = torch.zeros((), dtype=torch.float64, device=z.device)
        z_new = torch.empty_like(z) if update else None
        for r0, r1 in self.chunks:
            n = r1 - r0
            wq, diff, ax, sh = (buf[:n] for buf in self.bufs)
            zc, sc, wdc = z[r0:r1], self.scale[r0:r1], self.wd[r0:r1]
            torch.add(wdc, zc, out=wq).round_().clamp_(0.0, qmax)
            torch.sub(wq, zc, out=diff).mul_(sc).sub_(self.wg[r0:r1]).neg_()  # W - W_r
            torch.abs(diff, out=ax)
            total += (ax * vmask).sum() if vmask is not None else ax.sum(dtype=torch.float64)
            if update:
                if lp_norm == 1:
                    sh.copy_(ax).sub_(1.0 / b)
                else:
                    torch.pow(ax, lp_norm - 1, out=sh).mul_(-1.0 / b).add_(ax)
                sh.relu_().copysign_(diff)                                     # W_e = shrink(W - W_r)
                sh.div_(sc).add_(wq).sub_(wdc)                                 # W_q - (W - W_e)/s
                if vmask is not None:
                    z_new[r0:r1] = (sh * vmask).sum(dim=-1, keepdim=True) / self.count
                else:
                    z_new[r0:r1] = sh.mean(dim=-1, keepdim=True)
        return float(total) / self.n_valid, z_new

    def best_zero(self, z: torch.Tensor, *, beta: float, kappa: float, iters: int,
                  early_stop: bool) -> tuple[torch.Tensor, list[float]]:
        """The best zero seen from ``z`` on (``β`` grows by ``κ`` each iteration) and the errors logged."""
        errors: list[float] = []
        best = float("inf")
        z_best = z
        b = float(beta)
        for t in range(iters):
            err, z_next = self.step(z, b, update=t < iters - 1)
            if err < best:
                best, z_best = err, z
                errors.append(err)
            elif early_stop:
                break
            else:
                errors.append(err)
            if z_next is None:
                break
            z = z_next
            b *= kappa
        return z_best, errors


def hqq_quantize(W: torch.Tensor, spec: QuantSpec, *, lp_norm: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, iters: int = 20, early_stop: bool = True) -> HQQResult:
    """HQQ zero-point optimization of ``W [out, in]`` under ``spec``
    (normally ``QuantSpec(bits=b, group_size=G, scheme="asym_h", zero_float=True)``).

    With ``spec.zero_float`` False the optimized zero is finally rounded to an
    integer in ``[0, qmax]`` (what integer-zero formats can store)."""
    if W.dim() != 2:
        raise ValueError(f"hqq_quantize: W must be 2-D [out, in], got shape {tuple(W.shape)}")
    if spec.format != "int" or spec.symmetric:
        raise ValueError(f"hqq_quantize needs an asymmetric integer spec (scheme asym_h), got "
                         f"format={spec.format!r} scheme={spec.scheme!r}")
    out, cols = W.shape
    problem = spec.check_shape(out, cols)
    if problem:
        raise ValueError(f"hqq_quantize: {problem}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    W = W.detach().float()
    if not bool(torch.isfinite(W).all()):
        raise ValueError("hqq_quantize: W contains non-finite values")

    qmax = float(spec.qmax)
    wg = grouped(W, spec)                            # [R, ng, g]; partial group padded by repetition
    R, ng, g = wg.shape
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    rng = hi - lo
    sigma = torch.where(rng.abs() <= 1e-4, torch.ones_like(rng), qmax / rng).clamp(max=2e4)
    scale = _store_scale(1.0 / sigma, spec)          # [R, ng, 1], the stored scale
    z = -lo / scale
    if spec.bits == 4:
        z = torch.round(z)

    solver = _ZeroProblem(wg, scale, pad=ng * g - cols if spec.group_size > 0 else 0, qmax=qmax, lp_norm=lp_norm,
                           n_valid=float(R * cols) if spec.group_size != 0 else float(W.numel()))
    z_best, errors = solver.best_zero(z, beta=beta, kappa=kappa, iters=iters, early_stop=early_stop)

    if spec.zero_float:
        zero = z_best.to(torch.float16).float()
    else:
        zero = torch.round(z_best).clamp_(0.0, qmax)
    codes_g = torch.round(solver.wd + zero).clamp_(0.0, qmax).to(torch.uint8)
    if spec.group_size == 0:
        codes = codes_g.reshape(out, cols)
    else:
        codes = codes_g.reshape(R, ng * g)[:, :cols].contiguous()
    scale2 = scale.reshape(R, ng).contiguous()
    zero2 = zero.reshape(R, ng).contiguous()
    final = float((dequantize(codes, scale2, zero2, spec) - W).abs().mean())
    return HQQResult(codes=codes, scale=scale2, zero=zero2, errors=errors, final_error=final)
