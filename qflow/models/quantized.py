"""Materialize a quantized checkpoint on top of its float base model.

``mode="qlinear"`` swaps every quantized ``nn.Linear`` for a ``QLinear``
(packed weights, dispatcher kernels, optional activation quant);
``mode="dequant"`` writes the dequantized weights into the float model
(fastest for evaluation when no activation quantization is involved).
Float tensors the method changed (e.g. AWQ-folded norms) are loaded either way.

Example::

    model, tok = load_quantized_model(Checkpoint(path), dtype=torch.float32)
"""

from __future__ import annotations

import torch
from torch import nn

from qflow.quant.ir import Checkpoint
from qflow.quant.qlinear import QLinear


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def apply_checkpoint(model: nn.Module, ckpt: Checkpoint, *, mode: str = "qlinear",
                     cache_weight: bool = True) -> nn.Module:
    """Apply ``ckpt`` to ``model`` in place and return it."""
    params = dict(model.named_parameters())
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for pname, tensor in ckpt.iter_floats():
            if pname not in params:
                raise KeyError(f"checkpoint changes {pname}, which the base model does not have")
            params[pname].copy_(tensor.to(params[pname].dtype))
        for name, rec in ckpt.layers.items():
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name} is {type(module).__name__}, expected nn.Linear")
            if (module.out_features, module.in_features) != (rec.out_features, rec.in_features):
                raise ValueError(f"{name}: checkpoint shape {(rec.out_features, rec.in_features)} != "
                                 f"model {(module.out_features, module.in_features)}")
            if mode == "dequant" and not rec.spec.act_bits:
                module.weight.copy_(ckpt.dequantized(name).to(module.weight.dtype))
                continue
            bias = module.bias.detach().clone() if module.bias is not None else None
            q = QLinear.from_checkpoint(ckpt, name, bias, cache_weight=cache_weight, dtype=dtype)
            parent, child = _parent(model, name)
            setattr(parent, child, q)
    return model


def load_quantized_model(ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32, mode: str = "qlinear",
                         base_dir: str | None = None):
    """(model, tokenizer) of a checkpoint: its float base with the delta applied."""
    from qflow.models.loading import load_model

    model, tok = load_model(base_dir or ckpt.base_model, dtype=dtype)
    return apply_checkpoint(model, ckpt, mode=mode), tok
