"""QLinear: a linear layer that runs from qflow's packed weights.

Forward = dequantize (through the dispatcher) then matmul; with
``cache_weight=True`` the dequantized weight is kept after the first call
(evaluation speed); activations can be fake-quantized per token or per tensor
(SmoothQuant W8A8) with the exact SYM-R int8 rule.

Example::

    layer = QLinear.from_checkpoint(ckpt, "model.layers.0.mlp.down_proj", bias=None)
    y = layer(x)
"""

from __future__ import annotations

import torch
from torch import nn

from . import dispatch
from .ir import Checkpoint, LayerRecord, decode_params
from .spec import QuantSpec


def fake_quant_activation(x: torch.Tensor, bits: int, granularity: str) -> torch.Tensor:
    """Symmetric dynamic activation fake quant (SYM-R): per token (last dim) or per tensor."""
    qmax = float((1 << (bits - 1)) - 1)
    xf = x.float()
    if granularity == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax()
    scale = amax.clamp(min=1e-5) / qmax
    q = torch.clamp(torch.round(xf / scale), -qmax, qmax)
    return (q * scale).to(x.dtype)


class QLinear(nn.Module):
    def __init__(self, record: LayerRecord, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 *, cache_weight: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.record = record
        self.spec: QuantSpec = record.spec
        self.in_features = record.in_features
        self.out_features = record.out_features
        self.register_buffer("qweight", tensors["qweight"], persistent=False)
        scale, zero = decode_params(record.spec, tensors)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        self.register_buffer("g_idx", tensors.get("g_idx"), persistent=False)
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        self.cache_weight = cache_weight
        self.compute_dtype = dtype
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, name: str, bias: torch.Tensor | None, **kw) -> "QLinear":
        return cls(ckpt.layers[name], ckpt.layer_tensors(name), bias, **kw)

    def dequantized_weight(self) -> torch.Tensor:
        if self._weight is not None:
            return self._weight
        if self.g_idx is not None:
            codes = dispatch.unpack(self.qweight, self.spec.bits, self.in_features)
            g = self.g_idx.long()
            w = (codes.float() - self.zero[:, g]) * self.scale[:, g]  # act-order: gather per column
        else:
            w = dispatch.dequantize_packed(self.qweight, self.scale, self.zero, self.spec, self.in_features)
        w = w.to(self.compute_dtype)
        if self.cache_weight:
            self._weight = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.act_bits:
            x = fake_quant_activation(x, self.spec.act_bits, self.spec.act_granularity)
        w = self.dequantized_weight()
        return nn.functional.linear(x.to(w.dtype), w, self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        act = f", act_bits={s.act_bits}" if s.act_bits else ""
        return (f"in={self.in_features}, out={self.out_features}, {s.format}{s.bits} "
                f"g{s.group_size} {s.scheme or ''}{act}")
