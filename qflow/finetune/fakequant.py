"""A quantized linear whose rounding and scales can be learned, starting from one layer of an IR.

Every fine-tune stage starts from a quantized checkpoint written by any
``quantize.*`` stage (mixed per-layer specs, GPTQ's ``g_idx``, AWQ's folds
included) and ends by writing the same IR. One layer is parametrised in the
IR's own coordinates: ``W'`` is the float weight mapped through the folds the
IR recorded (``Checkpoint.fold_factors``: ``W' = diag(r)·W·diag(c)``), ``s``
and ``z`` are the IR's per-group scale and zero, and for an integer grid

    u    = W' / (s·f) + z                      # the continuous code
    code = clamp(round(u + k + V), 0, 2^b - 1)
    Ŵ    = (code - z) · s·f

``k`` is the integer that makes ``round(u + k) == start code`` (``round(x) = floor(x + 0.5)``) (0 for RTN; GPTQ's
error compensation moves some codes), so with ``V = 0, f = 1`` the layer is
exactly the starting IR; ``V`` (rounding offsets, SignRound) and ``f`` (per-group
scale factors, clipping when < 1) are what a method trains, through a
straight-through estimate of ``round``. The zero point stays the IR's, so codes
are always in ``[0, 2^b - 1]`` and each group has at most ``2^b`` values.
Lookup formats (nf4/fp4) keep their codes and learn only ``f``.

    start = layer_start(ckpt, name, float_weight)
    layer = FakeQuantLinear(start, bias, rounding=True, scale=True)
    y = layer(x)                       # differentiable in layer.v and layer.f
    codes, scale, zero = layer.export()  # what CheckpointWriter.add_quantized takes
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant import affine, dispatch
from ..quant.ir import Checkpoint, decode_params
from ..quant.spec import QuantSpec

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LayerStart:
    """One IR layer in trainable form: folded float weight, start codes and parameters."""

    name: str
    spec: QuantSpec
    weight: torch.Tensor          # W' fp32 [out, in] (float weight in the IR's folded coordinates)
    codes: torch.Tensor           # uint8 [out, in] start codes
    scale: torch.Tensor           # fp32 [P, n_groups] (P = out, or 1 per tensor)
    zero: torch.Tensor            # fp32 [P, n_groups]
    col_group: torch.Tensor       # long [in]: the group of each input column
    g_idx: torch.Tensor | None    # int32 [in] when the IR stores one (act-order)

    @property
    def lookup(self) -> bool:
        return self.spec.format in ("nf4", "fp4")


def layer_start(ckpt: Checkpoint, name: str, float_weight: torch.Tensor) -> LayerStart:
    """The trainable form of IR layer ``name`` given the base model's float weight of that linear."""
    rec = ckpt.layers[name]
    tensors = ckpt.layer_tensors(name)
    codes = dispatch.unpack(tensors["qweight"], rec.spec.bits, rec.in_features)
    scale, zero = decode_params(rec.spec, tensors)
    w = float_weight.detach().float().clone()
    row, col = ckpt.fold_factors(name)
    if row is not None:
        w.mul_(row[:, None])
    if col is not None:
        w.mul_(col[None, :])
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        col_group = g_idx.long()
    elif rec.spec.group_size == 0:
        col_group = torch.zeros(rec.in_features, dtype=torch.long)
    else:
        col_group = torch.arange(rec.in_features) // rec.spec.effective_group(rec.in_features)
    return LayerStart(name, rec.spec, w, codes, scale.float(), zero.float(), col_group, g_idx)


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """``floor(x + 0.5)``: unlike round-half-to-even, ``round(u + k) == round(u) + k`` for every integer ``k``,
    which the start offsets ``k`` rely on."""
    return torch.floor(x + 0.5)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round_half_up(x)`` forward, identity backward (straight-through estimator)."""
    return x + (round_half_up(x) - x).detach()


def store_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``scale`` as the IR will store it (rounded through the spec's scale dtype, kept positive)."""
    if spec.format in ("nf4", "fp4"):
        return scale.float().clamp_min(2.0 ** -24)
    s = scale.to(_SCALE_DTYPES[spec.scale_dtype]).float()
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.full_like(s, 2.0 ** -24))


class FakeQuantLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ`` from the module doc; trains ``v`` and/or ``f``.

    ``scale_range``: bounds of the per-group factor ``f`` (SignRound's clipping range
    is [0.5, 1]). ``v`` is kept in [-0.5, 0.5] by :meth:`clamp_`.
    """

    def __init__(self, start: LayerStart, bias: torch.Tensor | None, *, rounding: bool = True,
                 scale: bool = False, scale_range: tuple[float, float] = (0.5, 1.0)):
        super().__init__()
        self.name = start.name
        self.spec = start.spec
        self.lookup = start.lookup
        self.g_idx = start.g_idx
        self.scale_range = scale_range
        self.register_buffer("weight_float", start.weight, persistent=False)
        self.register_buffer("scale0", start.scale, persistent=False)
        self.register_buffer("zero", start.zero, persistent=False)
        self.register_buffer("col_group", start.col_group, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        if self.lookup:
            self.register_buffer("codes0", start.codes.clone(), persistent=False)
            self.register_buffer("offset", None, persistent=False)
        else:
            self.register_buffer("codes0", None, persistent=False)
            with torch.no_grad():
                u = self._continuous(self.scale0)
                offset = start.codes.float() - round_half_up(u)
                for _ in range(2):  # fp32 rounding of u + k near a half: nudge k until the start is exact
                    offset += start.codes.float() - torch.clamp(round_half_up(u + offset), 0.0, float(self.spec.qmax))
            self.register_buffer("offset", offset, persistent=False)
        self.v = nn.Parameter(torch.zeros_like(start.weight)) if rounding and not self.lookup else None
        self.f = nn.Parameter(torch.ones_like(start.scale)) if scale else None
        self.group_cols = 0 if self.lookup else contiguous_group(start.col_group, start.scale.shape[1])
        self._frozen_hat: torch.Tensor | None = None   # Ŵ of a layer with nothing to train, made once

    # -- the quantizer ----------------------------------------------------------
    def _per_column(self, p: torch.Tensor) -> torch.Tensor:
        return p[:, self.col_group]

    def _continuous(self, scale: torch.Tensor) -> torch.Tensor:
        return self.weight_float / self._per_column(scale) + self._per_column(self.zero)

    def current_scale(self) -> torch.Tensor:
        return self.scale0 if self.f is None else self.scale0 * self.f

    def _codes(self, scale: torch.Tensor, *, ste: bool) -> torch.Tensor:
        x = self._continuous(scale) + self.offset
        if self.v is not None:
            x = x + self.v
        q = round_ste(x) if ste else round_half_up(x)
        return torch.clamp(q, 0.0, float(self.spec.qmax))

    def weight_hat(self) -> torch.Tensor:
        """The fake-quantized weight ``Ŵ`` (differentiable in ``v`` and ``f``).

        Integer grids whose groups are contiguous column runs (every IR without ``g_idx``) go through
        :class:`GroupedFakeQuant`, one autograd node that keeps no weight-sized intermediate; the others
        through :meth:`gathered_weight_hat` (plain autograd ops)."""
        if self.v is None and self.f is None:
            if self._frozen_hat is None:
                with torch.no_grad():
                    self._frozen_hat = self.gathered_weight_hat()
            return self._frozen_hat
        if self.group_cols:
            return GroupedFakeQuant.apply(self.weight_float, self.scale0, self.zero, self.offset, self.v, self.f,
                                          self.group_cols, float(self.spec.qmax))
        return self.gathered_weight_hat()

    def gathered_weight_hat(self) -> torch.Tensor:
        """``Ŵ`` as plain autograd ops: scale and zero gathered to the weight's shape, straight-through rounding
        as ``x + (round(x) - x).detach()`` (any column-to-group map; the reference of :class:`GroupedFakeQuant`)."""
        scale = self.current_scale()
        s = self._per_column(scale)
        if self.lookup:
            return affine.lut(self.spec).to(s.device)[self.codes0.long()] * s
        return (self._codes(scale, ste=True) - self._per_column(self.zero)) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_hat().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the trained parameters back into their bounds (after each optimiser step)."""
        if self.v is not None:
            self.v.clamp_(-0.5, 0.5)
        if self.f is not None:
            self.f.clamp_(*self.scale_range)

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [out, in], scale, zero) for the IR, codes made with the scale as stored."""
        scale = store_scale(self.current_scale(), self.spec)
        if self.lookup:
            return self.codes0.clone(), scale, self.zero.clone()
        return self._codes(scale, ste=False).to(torch.uint8), scale, self.zero.clone()

    def trainable(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in (("v", self.v), ("f", self.f)) if p is not None}


class ReferenceFakeQuantLinear(FakeQuantLinear):
    """:class:`FakeQuantLinear` computing ``Ŵ`` only through :meth:`~FakeQuantLinear.gathered_weight_hat`
    (the plain-autograd reference that tests and ``benchmarks/finetune_step.py`` compare the fast path with)."""

    def weight_hat(self) -> torch.Tensor:
        return self.gathered_weight_hat()


def contiguous_group(col_group: torch.Tensor, n_groups: int) -> int:
    """Columns per group when group ``g`` is exactly the columns ``[g·k, (g+1)·k)``, else 0."""
    in_features = int(col_group.shape[0])
    if n_groups < 1 or in_features % n_groups:
        return 0
    k = in_features // n_groups
    return k if torch.equal(col_group, torch.arange(in_features, device=col_group.device) // k) else 0


class GroupedFakeQuant(torch.autograd.Function):
    """``Ŵ = (clamp(round(W'/s + z + k + V), 0, qmax) - z) · s`` with ``s = s0·f`` on the weight viewed as
    ``[out, groups, k]`` (scale and zero broadcast, never gathered), and its straight-through gradients:

        dŴ/dV = s · 1[0 <= round(·) <= qmax]
        dŴ/ds = (q - z) - 1[0 <= round(·) <= qmax] · W'/s        (summed over each group; dŴ/df = s0 · dŴ/ds)

    the same as autograd through :meth:`FakeQuantLinear.gathered_weight_hat` (round as identity, clamp
    passing the gradient inside its range). Nothing weight-sized is saved: the backward recomputes the codes
    from the inputs (one more pass over the weight instead of about five stored intermediates per linear).
    The forward's rounding is exact (``floor(x + 0.5)``), where the reference's ``x + (round(x) - x)`` may be
    off by one float ulp.
    """

    @staticmethod
    def _codes(w, scale, zero, offset, v, k):
        """``floor(W'/s + z + k + V + 0.5)`` as ``[out, groups, k]``, in the reference's order of operations."""
        w3 = w.view(w.shape[0], -1, k)
        x = w3 / scale.unsqueeze(-1)
        x += zero.unsqueeze(-1)
        x += offset.view_as(w3)
        if v is not None:
            x += v.view_as(w3)
        return x.add_(0.5).floor_()

    @staticmethod
    def forward(ctx, w, scale0, zero, offset, v, f, k: int, qmax: float):
        scale = scale0 if f is None else scale0 * f
        q = GroupedFakeQuant._codes(w, scale, zero, offset, v, k)
        q.clamp_(0.0, qmax).sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        ctx.save_for_backward(w, scale0, zero, offset, v, f)
        ctx.k, ctx.qmax = k, qmax
        return q.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        w, scale0, zero, offset, v, f = ctx.saved_tensors
        k, qmax = ctx.k, ctx.qmax
        scale = scale0 if f is None else scale0 * f
        s3 = scale.unsqueeze(-1)
        q = GroupedFakeQuant._codes(w, scale, zero, offset, v, k)
        outside = (q < 0) | (q > qmax)
        g3 = grad.reshape(q.shape)
        grad_v = grad_f = None
        if v is not None and ctx.needs_input_grad[4]:
            grad_v = (g3 * s3).masked_fill_(outside, 0.0).view_as(w)
        if f is not None and ctx.needs_input_grad[5]:
            inner = (w.view_as(q) / s3).masked_fill_(outside, 0.0)      # 1[inside] · W'/s
            q.clamp_(0.0, qmax).sub_(zero.unsqueeze(-1)).sub_(inner)     # (q - z) - 1[inside] · W'/s
            grad_s = (g3 * q).sum(-1)
            if grad_s.shape[0] != scale.shape[0]:                        # one scale row shared by every output row
                grad_s = grad_s.sum(0, keepdim=True)
            grad_f = grad_s * scale0
        return None, None, None, None, grad_v, grad_f, None, None
