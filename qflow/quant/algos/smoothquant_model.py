"""SmoothQuant W8A8 over a whole model (docs/METHODS.md §6, mit-han-lab/smoothquant).

1. Activation statistics: ``xmax_j = max_t |X[t, j]|`` of every decoder linear's
   input on the FP model (the calibrate stage's ``<linear>.max_abs``; computed
   here with hooks when a calibration set carries no statistics).
2. Smoothing at the adapter's sites only (input norm -> q,k,v; post-attention
   norm -> gate,up): ``s = smooth_scales(xmax, [W...], alpha)``, ``γ ← γ/s``,
   ``W[:, j] ← W[:, j]·s_j``. ``o_proj``/``down_proj`` are not smoothed.
3. Quantization of *all* decoder linears (``quantize_llama_like``): int8 SYM-R
   weights per output channel (or per tensor), and a spec with ``act_bits=8`` so
   that QLinear fake-quantizes the activations (per token, dynamic, SYM-R) at
   evaluation time.

Runs through the block-wise driver without activations (blocks are independent
once the statistics are known), so it is resumable like the other methods.

Example::

    opts = SmoothQuantOptions(alpha=0.5)
    quantize_model_smoothquant(ctx, model, get_adapter(model), act_max, opts, base_model=str(model_dir))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ...errors import StageError
from .. import dispatch
from ...models.adapters import ArchAdapter, norm_weight_offset
from ..spec import QuantSpec
from .blockwise import Block, check_calibration, run_blockwise, write_records


@dataclass(frozen=True)
class SmoothQuantOptions:
    """``alpha`` migration strength (smooth_lm default 0.5); W8A8 per-channel weights, per-token activations."""

    alpha: float = 0.5
    weight_bits: int = 8
    act_bits: int = 8
    weight_granularity: str = "channel"      # "channel" | "tensor"
    act_granularity: str = "token"           # "token" | "tensor"
    smooth: bool = True                      # false: plain W8A8 (the unsmoothed baseline)
    scale_dtype: str = "float16"

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.weight_bits, group_size=-1 if self.weight_granularity == "channel" else 0,
                         scheme="sym_r", act_bits=self.act_bits, act_granularity=self.act_granularity,
                         scale_dtype=self.scale_dtype)


@torch.no_grad()
def collect_act_max(model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor, *, batch_size: int = 8,
                    names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``{full linear name: max_t |x_t|}`` over the calibration ids on the FP model (input of each linear)."""
    check_calibration(ids, model)
    wanted = set(names) if names is not None else None
    acc: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str):
        def hook(module, args):
            x = args[0]
            if not bool(torch.isfinite(x).all()):
                raise StageError(f"non-finite activations at the input of {name}", where="smoothquant statistics",
                                 fix="check the calibration data and the float model")
            m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
            acc[name] = torch.maximum(acc[name], m) if name in acc else m
        return hook

    for i, block in enumerate(adapter.blocks()):
        for rel, lin in adapter.linears(block).items():
            full = f"{adapter.block_name(i)}.{rel}"
            if wanted is None or full in wanted:
                handles.append(lin.register_forward_pre_hook(make(full)))
    try:
        for b0 in range(0, ids.shape[0], batch_size):
            adapter.base(input_ids=ids[b0:b0 + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acc


@torch.no_grad()
def smooth_block(block: nn.Module, prefix: str, adapter: ArchAdapter, act_max: dict[str, torch.Tensor],
                 alpha: float, folds: list[tuple[str, list[str], torch.Tensor]] | None = None
                 ) -> list[tuple[str, torch.Tensor]]:
    """Fold SmoothQuant scales into one block in place; returns the changed norm tensors (name, value).

    ``folds`` (when given) receives ``(norm, linears, s)`` per site, full names, for the checkpoint's record.
    """
    from .smoothquant import fold_into_norm, scale_linear_inputs, smooth_scales

    changed = []
    for site in adapter.smooth_sites(block):
        first = f"{prefix}.{site.linears[0]}"
        xmax = act_max.get(first)
        if xmax is None:
            raise StageError(f"no activation statistics for {first}", where="smoothquant",
                             fix="calibrate with stats: true (or let quantize.smoothquant recompute them)")
        linears = [block.get_submodule(n) for n in site.linears]
        s = smooth_scales(xmax.float(), [lin.weight.data for lin in linears], alpha)
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise StageError(f"non-finite or non-positive smoothing scales at {prefix}.{site.norm}",
                             where="smoothquant", fix="check the activation statistics")
        norm = block.get_submodule(site.norm)
        bias = getattr(norm, "bias", None)
        new_w, new_b = fold_into_norm(norm.weight.data, bias.data if bias is not None else None, s,
                                      offset=norm_weight_offset(norm))
        norm.weight.data = new_w
        changed.append((f"{prefix}.{site.norm}.weight", new_w.clone()))
        if bias is not None:
            bias.data = new_b
            changed.append((f"{prefix}.{site.norm}.bias", new_b.clone()))
        for lin in linears:
            lin.weight.data = scale_linear_inputs(lin.weight.data, s)
        if folds is not None:
            folds.append((f"{prefix}.{site.norm}", [f"{prefix}.{n}" for n in site.linears], s.detach().float().clone()))
    return changed


def smoothquant_block(block: Block, opts: SmoothQuantOptions, act_max: dict[str, torch.Tensor],
                      floats: frozenset[str] = frozenset()) -> None:
    """Smooth and W8A8-quantize one block; linears named in ``floats`` (full names) stay float,
    stored as float deltas when smoothing scaled them."""
    spec = opts.spec()
    if opts.smooth:
        folds: list[tuple[str, list[str], torch.Tensor]] = []
        for pname, tensor in smooth_block(block.module, block.name, block.adapter, act_max, opts.alpha, folds):
            block.writer.add_float(pname, tensor)
        for prev, linears, scales in folds:  # exact fold factors for the per-layer report
            block.writer.add_fold(prev, linears, scales)
    for rel, lin in block.adapter.linears(block.module).items():
        if block.full_name(rel) in floats:
            if opts.smooth and any(rel in site.linears for site in block.adapter.smooth_sites(block.module)):
                block.writer.add_float(f"{block.full_name(rel)}.weight", lin.weight.data.detach().clone())
            continue
        w = lin.weight.data.float()
        scale, zero = dispatch.compute_params(w, spec)
        codes = dispatch.quantize(w, scale, zero, spec)
        block.writer.add_quantized(block.full_name(rel), spec, codes, scale, zero)
        w_hat = dispatch.dequantize(codes, scale, zero, spec)
        block.record(layer=block.full_name(rel),
                     weight_rel_err=float((w_hat - w).norm() / w.norm().clamp(min=1e-12)))


def quantize_model_smoothquant(ctx: Any, model: nn.Module, adapter: ArchAdapter, act_max: dict[str, torch.Tensor],
                               opts: SmoothQuantOptions, *, base_model: str, meta: dict[str, Any] | None = None,
                               floats: list[str] | None = None):
    """Smooth + W8A8-quantize every block of ``model`` and write the IR (resumable); ``floats``: linears
    (full names) left float."""
    skip = frozenset(floats or ())
    signature = {"options": asdict(opts),
                 "act_max": {k: float(v.double().sum()) for k, v in sorted(act_max.items())},
                 **({"floats": sorted(skip)} if skip else {})}
    result = run_blockwise(ctx, model, adapter, None, lambda b: smoothquant_block(b, opts, act_max, skip),
                           method="smoothquant", base_model=base_model, meta=meta, signature=signature,
                           desc="smoothquant")
    write_records(ctx, result.records, "smoothquant_layers.json")
    return result
