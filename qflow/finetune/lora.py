"""A LoRA adapter over a frozen quantized linear (Hu et al. 2021; QLoRA, Dettmers et al. 2023).

``y = x·Ŵᵀ + b + (α/r)·dropout(x)·Aᵀ·Bᵀ`` with ``Ŵ`` the start IR's dequantized
weight (any qflow format, NF4 included) kept frozen, ``A`` ``[r, in]`` initialised
as PEFT does (Kaiming-uniform, a = √5) and ``B`` ``[out, r]`` at zero, so training
starts exactly at the quantized model. Our own module rather than ``peft``: peft is
not installed here, and it wraps ``nn.Linear``/bitsandbytes layers, not qflow's
IR layers. The adapter tensors are saved under peft's key names
(``base_model.model.<linear>.lora_A.weight``), so peft can load them onto the
dequantized model.

``export()`` merges: ``W_merged = Ŵ + (α/r)·B·A`` re-rounded onto the start's
grid (its scales and zero points): integer formats round to the nearest code,
lookup formats to the nearest table entry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import affine
from .fakequant import LayerStart, round_half_up


class LoRALinear(nn.Module):
    def __init__(self, start: LayerStart, bias: torch.Tensor | None, *, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator):
        super().__init__()
        self.name, self.spec, self.g_idx, self.lookup = start.name, start.spec, start.g_idx, start.lookup
        self.register_buffer("scale", start.scale, persistent=False)
        self.register_buffer("zero", start.zero, persistent=False)
        self.register_buffer("col_group", start.col_group, persistent=False)
        self.register_buffer("codes0", start.codes.clone(), persistent=False)
        self.register_buffer("base", self._dequant(start.codes), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        out_features, in_features = start.weight.shape
        bound = 1.0 / math.sqrt(in_features)   # kaiming_uniform_(a=sqrt(5)) on [r, in]
        self.lora_A = nn.Parameter((torch.rand((rank, in_features), generator=generator) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank
        self.dropout = dropout
        self.generator = generator
        self.merge = True      # False: export() writes the start's codes (the adapter is saved beside the IR)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        s = self.scale[:, self.col_group]
        if self.lookup:
            return affine.lut(self.spec)[codes.long()] * s
        return (codes.float() - self.zero[:, self.col_group]) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.base.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        h = x
        if self.training and self.dropout > 0:   # our generator, so a resumed run draws the same masks
            keep = torch.rand(x.shape, generator=self.generator) >= self.dropout
            h = x * keep / (1.0 - self.dropout)
        return y + (h @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def clamp_(self) -> None:
        pass

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def export(self):
        """Merged and re-rounded onto the start's grid (scales and zeros unchanged); the start's codes
        when ``merge`` is off."""
        if not self.merge:
            return self.codes0.clone(), self.scale.clone(), self.zero.clone()
        merged = self.base + self.delta()
        s = self.scale[:, self.col_group]
        if self.lookup:
            codes = torch.argmin((merged.div(s).unsqueeze(-1) - affine.lut(self.spec)).abs(), dim=-1)
        else:
            z = self.zero[:, self.col_group]
            codes = torch.clamp(round_half_up(merged / s + z), 0.0, float(self.spec.qmax))
        return codes.to(torch.uint8), self.scale.clone(), self.zero.clone()

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}


def save_adapter(folder, adapters: dict[str, LoRALinear], *, rank: int, alpha: float, dropout: float,
                 base_model: str) -> None:
    """The adapter in peft's layout: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in adapters.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    modules = sorted({name.rsplit(".", 1)[-1] for name in adapters})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": modules, "bias": "none", "base_model_name_or_path": base_model,
              "fan_in_fan_out": False, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
