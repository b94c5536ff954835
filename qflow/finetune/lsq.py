"""LSQ fake quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020) on an IR's grid.

The float weight ``W'`` (in the IR's folded coordinates) is trained together
with one step size ``s`` per group; the forward is LSQ's

    Ŵ = round(clamp(W'/s, -z, Qmax - z)) · s        (round with a straight-through estimator)

where ``z`` is the start IR's integer zero point, so ``code = round(...) + z`` is in
``[0, 2^b - 1]``. Initialisation, as in the paper: ``s = 2·mean|w| / sqrt(Qp)`` over
the weights sharing the step (one group), ``Qp = 2^(b-1) - 1``; the step's
gradient is scaled by ``g = 1 / sqrt(N · Qp)`` with ``N`` the number of weights
sharing the step (the paper's per-layer ``N_W`` becomes per group, since each
group has its own step). ``init="start"`` starts from the IR's scales instead.
Note that Adam normalises gradient magnitudes, so ``g`` matters less than with
the paper's SGD. Lookup formats and fractional zero points are not LSQ grids:
the QAT stage keeps those layers as the start wrote them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fakequant import LayerStart, contiguous_group, round_half_up, round_ste, store_scale


def scale_grad(x: torch.Tensor, g: torch.Tensor | float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``g`` backward (LSQ's gradient scale)."""
    return (x - x * g).detach() + x * g


class LSQLinear(nn.Module):
    def __init__(self, start: LayerStart, bias: torch.Tensor | None, *, init: str = "lsq"):
        super().__init__()
        if start.lookup or start.spec.zero_float:
            raise ValueError(f"{start.name}: LSQ needs an integer grid with an integer zero point")
        self.name, self.spec, self.g_idx = start.name, start.spec, start.g_idx
        self.weight = nn.Parameter(start.weight.clone())
        self.register_buffer("zero", start.zero.round(), persistent=False)
        self.register_buffer("col_group", start.col_group, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        qp = max(1, (1 << (start.spec.bits - 1)) - 1)
        rows = start.scale.shape[0]
        n_groups = start.scale.shape[1]
        per_group = torch.bincount(start.col_group, minlength=n_groups).float()   # columns per group
        n_shared = per_group * (start.weight.shape[0] if rows == 1 else 1)       # weights sharing one step
        if init == "lsq":
            absw = start.weight.abs()
            sums = torch.zeros(start.weight.shape[0], n_groups).index_add_(1, start.col_group, absw)
            if rows == 1:
                sums = sums.sum(0, keepdim=True)
            step = 2.0 * sums / n_shared.clamp_min(1) / math.sqrt(qp)
        elif init == "start":
            step = start.scale.clone()
        else:
            raise ValueError(f"init must be lsq or start, got {init!r}")
        self.step = nn.Parameter(step.clamp_min(1e-8))
        self.register_buffer("grad_scale", 1.0 / torch.sqrt(n_shared.clamp_min(1) * qp), persistent=False)
        self.group_cols = contiguous_group(start.col_group, n_groups)

    def weight_hat(self) -> torch.Tensor:
        if self.group_cols:   # contiguous groups: broadcast over [out, groups, k], no gather (and no scatter backward)
            w3 = self.weight.view(self.weight.shape[0], -1, self.group_cols)
            s3 = scale_grad(self.step, self.grad_scale).unsqueeze(-1)
            z3 = self.zero.unsqueeze(-1)
            return (round_ste(torch.clamp(w3 / s3, -z3, float(self.spec.qmax) - z3)) * s3).view_as(self.weight)
        s = scale_grad(self.step, self.grad_scale)[:, self.col_group]
        z = self.zero[:, self.col_group]
        q = round_ste(torch.clamp(self.weight / s, -z, float(self.spec.qmax) - z))
        return q * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_hat().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.step.clamp_(min=1e-8)

    @torch.no_grad()
    def export(self):
        scale = store_scale(self.step, self.spec)
        s, z = scale[:, self.col_group], self.zero[:, self.col_group]
        codes = torch.clamp(round_half_up(self.weight / s) + z, 0.0, float(self.spec.qmax))
        return codes.to(torch.uint8), scale, self.zero.clone()

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight, "step": self.step}
