"""GPTQ over a whole model, block by block with sequential calibration (METHODS.md §5).

For block ``l`` with ``true_sequential`` the sub-steps are the adapter's groups
``[k,v,q] -> [o] -> [up,gate] -> [down]``: each sub-step runs every calibration
sequence through the block (earlier sub-steps already quantized in place),
accumulates the Hessian of that subset only (once per distinct input: q, k and v
share one), and quantizes it with :func:`qflow.quant.algos.gptq.gptq_quantize`.
Without it, one pass over the FP block collects every Hessian. The *quantized*
block's outputs are the next block's inputs (``propagate="quant"``).

A pass stops as soon as the sub-step's inputs are captured (the ``[k,v,q]`` pass
only runs the input norm), and once every attention linear is quantized the
attention half of the block runs once: the ``[up,gate]``, ``[down]`` and output
passes run only the MLP half on that residual stream (the adapter's
``attention_half``/``mlp_half``, op for op the block's own forward). Both are exact.

Example::

    opts = GPTQOptions(bits=4, group_size=64, symmetric=False)
    quantize_model_gptq(ctx, model, get_adapter(model), ids, opts, base_model=str(model_dir))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...errors import StageError
from ...models.adapters import ArchAdapter
from ..spec import QuantSpec
from .blockwise import Block, run_blockwise, write_records


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings; defaults are qflow's (METHODS.md §5): b=4, G=128, sym, true-sequential, act-order + static groups."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    true_sequential: bool = True
    act_order: bool = True
    static_groups: bool = True
    percdamp: float = 0.01
    block_size: int = 128
    scale_dtype: str = "float16"

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                         scale_dtype=self.scale_dtype)


def gptq_block(block: Block, opts: GPTQOptions, *, spec: QuantSpec | None = None) -> None:
    """GPTQ-quantize every linear of ``block`` in place (weights become their dequantized values)."""
    from .gptq import HessianAccumulator, dequantize_result, gptq_quantize

    adapter: ArchAdapter = block.adapter
    spec = spec or opts.spec()
    names = adapter.linear_names(block.module)
    groups = adapter.sequential_groups(block.module) if opts.true_sequential else [names]
    covered = sorted(n for g in groups for n in g)
    if covered != sorted(names):
        raise StageError(f"sequential groups {groups} do not cover the block's linears {names}",
                         where=f"adapter for {block.name}")
    for name in names:
        problem = spec.check_shape(*block.linear(name).weight.shape)
        if problem:
            raise StageError(f"{block.full_name(name)}: {problem}", where="quantize.gptq.group_size",
                             fix="choose a group size that divides every layer width")
    attn = set(adapter.attn_linears)
    done: set[str] = set()
    mid: torch.Tensor | None = None      # residual stream after the (quantized) attention half

    def mlp_half(h: torch.Tensor) -> torch.Tensor:
        return adapter.mlp_half(block.module, h)

    for group in groups:
        t0 = time.perf_counter()
        accs: dict[str, HessianAccumulator] = {}
        for name in group:
            key = adapter.canonical_input(name)
            if key not in accs:
                accs[key] = HessianAccumulator(block.linear(key).in_features)

        def on_input(rel: str, x: torch.Tensor) -> None:
            accs[rel].add(x.float())

        if mid is None and adapter.splits_residual and attn <= done and not (attn & set(group)):
            # the attention half is final: run it once, then only the MLP half per sub-step
            mid = block.run(outputs=True, forward=lambda h: adapter.attention_half(block.module, h, block.kwargs)).outputs
        if mid is not None:
            block.run(stream=group, on_input=on_input, inputs=mid, forward=mlp_half)
        else:
            block.run(stream=group, on_input=on_input)
        t_h = time.perf_counter() - t0
        for name in group:
            t1 = time.perf_counter()
            lin = block.linear(name)
            H = accs[adapter.canonical_input(name)].H
            try:
                res = gptq_quantize(lin.weight.data.float(), H, spec, block_size=opts.block_size,
                                    percdamp=opts.percdamp, act_order=opts.act_order,
                                    static_groups=opts.static_groups)
            except ValueError as exc:
                raise StageError(f"GPTQ failed: {exc}", where=block.full_name(name),
                                 fix="use more calibration tokens or a larger percdamp") from exc
            lin.weight.data = dequantize_result(res, spec).to(lin.weight.dtype)
            block.writer.add_quantized(block.full_name(name), spec, res.codes, res.scale, res.zero, res.g_idx)
            block.record(layer=block.full_name(name), gptq_loss=res.loss, damp=res.damp,
                         hessian_seconds=t_h, quantize_seconds=time.perf_counter() - t1)
        done.update(group)
        accs.clear()
    if mid is not None and not block.is_last:
        block.next_inputs = block.run(outputs=True, inputs=mid, forward=mlp_half).outputs


def quantize_model_gptq(ctx: Any, model: torch.nn.Module, adapter: ArchAdapter, ids: torch.Tensor,
                        opts: GPTQOptions, *, base_model: str, meta: dict[str, Any] | None = None,
                        batch_size: int = 8):
    """Run GPTQ over every block and write the IR (see ``run_blockwise``)."""
    widest = max(lin.in_features for lin in adapter.linears(adapter.blocks()[0]).values())
    if ids.numel() < widest:
        ctx.log.warning("GPTQ: %d calibration tokens < %d input features: the Hessians are rank-deficient "
                        "and only damping keeps them invertible; calibrate with more tokens", ids.numel(), widest)
    result = run_blockwise(ctx, model, adapter, ids, lambda b: gptq_block(b, opts), method="gptq",
                           base_model=base_model, meta=meta, signature={"options": asdict(opts)},
                           propagate="quant", batch_size=batch_size, desc="gptq")
    write_records(ctx, result.records, "gptq_layers.json")
    return result
