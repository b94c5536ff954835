"""GPTQ over a whole model, block by block with sequential calibration (docs/METHODS.md §5).

For block ``l`` with ``true_sequential`` the sub-steps are the adapter's groups
``[k,v,q] -> [o] -> [up,gate] -> [down]``: each sub-step runs every calibration
sequence through the block (earlier sub-steps already quantized in place),
accumulates the Hessian of that subset only (once per distinct input: q, k and v
share one), and quantizes it with :func:`qflow.quant.algos.gptq.gptq_quantize`.
Without it, one pass over the FP block collects every Hessian. The *quantized*
block's outputs are the next block's inputs (``propagate="quant"``).

A pass stops as soon as the sub-step's inputs are captured (the ``[k,v,q]`` pass
only runs the input norm). The ``[o]`` pass keeps o_proj's inputs, so once o_proj
is quantized the residual stream entering the MLP half is ``h + o_proj(inputs)``
without running attention again; the ``[up,gate]`` and ``[down]`` passes run only
the MLP half on it (the adapter's ``mlp_half``); the block's output is the MLP half
run once more on ``mid`` (down_proj's inputs are 4x wider than the residual stream,
too large to keep; an output linear no wider than it keeps them instead). Each is
op for op the block's own forward, mini-batch by mini-batch: the checkpoint is
bit-identical to running the whole block per sub-step (a test checks it).

Example::

    opts = GPTQOptions(bits=4, group_size=64, symmetric=False)
    quantize_model_gptq(ctx, model, get_adapter(model), ids, opts, base_model=str(model_dir))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ...errors import StageError
from ...models.adapters import ArchAdapter
from ...models.lazy import release_freed_memory
from ..spec import QuantSpec
from .blockwise import Block, run_blockwise, write_records
from .moe import count_routed_tokens, record_expert_tokens, report_expert_tokens

if TYPE_CHECKING:
    from .gptq import HessianAccumulator


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings; defaults are qflow's (docs/METHODS.md §5): b=4, G=128, sym, true-sequential, act-order + static groups."""

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


def _sub_steps(block: Block, opts: GPTQOptions,
               layer_spec: Callable[[str], QuantSpec | None]) -> tuple[list[str], list[list[str]], set[str]]:
    """(the block's linears, its sequential sub-steps without float layers, the float layers);
    StageError unless the sub-steps cover the linears and every quantized linear's shape fits its spec."""
    adapter: ArchAdapter = block.adapter
    names = adapter.linear_names(block.module)
    groups = adapter.sequential_groups(block.module) if opts.true_sequential else [names]
    covered = sorted(n for g in groups for n in g)
    if covered != sorted(names):
        raise StageError(f"sequential groups {groups} do not cover the block's linears {names}",
                         where=f"adapter for {block.name}")
    floats = {n for n in names if layer_spec(n) is None}
    for name in names:
        spec = layer_spec(name)
        problem = spec.check_shape(*block.linear(name).weight.shape) if spec is not None else None
        if problem:
            raise StageError(f"{block.full_name(name)}: {problem}", where="quantize.gptq.group_size",
                             fix="choose a group size that divides every layer width")
    groups = [[n for n in g if n not in floats] for g in groups]
    return names, [g for g in groups if g], floats


def _quantize_sub_step(block: Block, group: list[str], hessians: dict[str, HessianAccumulator],
                       layer_spec: Callable[[str], QuantSpec | None], opts: GPTQOptions,
                       hessian_seconds: float) -> None:
    """GPTQ-quantize the linears of one sub-step in place (each with its own spec) and add them to the checkpoint.

    Linears that read the same input (q/k/v, gate/up) share one Hessian factorisation;
    it is dropped as soon as the last of them is done.
    """
    from .gptq import dequantize_result, factor_hessian, gptq_quantize

    uses: dict[str, int] = {}
    for name in group:
        key = block.adapter.canonical_input(name)
        uses[key] = uses.get(key, 0) + 1
    factors: dict[str, Any] = {}
    for name in group:
        spec = layer_spec(name)
        t1 = time.perf_counter()
        lin = block.linear(name)
        key = block.adapter.canonical_input(name)
        tokens = hessians[key].n_tokens
        if block.adapter.routed(name) and tokens == 0:
            # an expert no calibration token was routed to: no Hessian, RTN (docs/METHODS.md §4.2)
            uses[key] -= 1
            _rtn_fallback(block, name, spec)
            continue
        try:
            if key not in factors:   # the accumulator is done: its H becomes the factor (no second n² matrix)
                factors[key] = factor_hessian(hessians[key].H, percdamp=opts.percdamp, act_order=opts.act_order,
                                              consume=True)
                hessians[key].release()
            res = gptq_quantize(lin.weight.data.float(), None, spec, block_size=opts.block_size,
                                percdamp=opts.percdamp, act_order=opts.act_order,
                                static_groups=opts.static_groups, factor=factors[key])
        except ValueError as exc:
            raise StageError(f"GPTQ failed: {exc}", where=block.full_name(name),
                             fix="use more calibration tokens or a larger percdamp") from exc
        uses[key] -= 1
        if not uses[key]:
            del factors[key]
        lin.weight.data = dequantize_result(res, spec).to(lin.weight.dtype)
        block.writer.add_quantized(block.full_name(name), spec, res.codes, res.scale, res.zero, res.g_idx)
        block.record(layer=block.full_name(name), gptq_loss=res.loss, damp=res.damp,
                     hessian_seconds=hessian_seconds, quantize_seconds=time.perf_counter() - t1,
                     **({"tokens": tokens} if block.adapter.routed(name) else {}))


def _rtn_fallback(block: Block, name: str, spec: QuantSpec) -> None:
    """Round ``name`` to nearest under ``spec`` (in place and into the checkpoint), with a warning."""
    from .. import dispatch
    from .moe import warn_no_tokens

    lin = block.linear(name)
    w = lin.weight.data.float()
    scale, zero = dispatch.compute_params(w, spec)
    codes = dispatch.quantize(w, scale, zero, spec)
    block.writer.add_quantized(block.full_name(name), spec, codes, scale, zero)
    lin.weight.data = dispatch.dequantize(codes, scale, zero, spec).to(lin.weight.dtype)
    warn_no_tokens(block, name, "GPTQ")


def gptq_block(block: Block, opts: GPTQOptions, *, spec: QuantSpec | None = None,
               spec_for: Callable[[str], QuantSpec | None] | None = None) -> None:
    """GPTQ-quantize every linear of ``block`` in place (weights become their dequantized values).

    ``spec_for(full module name)``: each linear's spec, None to leave it float (qflow/quant/layerspec.py);
    default: ``spec`` (or ``opts.spec()``) for every linear.
    """
    from .gptq import HessianAccumulator

    adapter: ArchAdapter = block.adapter
    base = spec or opts.spec()

    def layer_spec(rel: str) -> QuantSpec | None:   # default: every linear but MoE routers
        if spec_for is not None:
            return spec_for(block.full_name(rel))
        return None if adapter.is_router(rel) else base

    names, groups, floats = _sub_steps(block, opts, layer_spec)
    attn = set(adapter.attn_linears)
    done: set[str] = set(floats)   # a float linear is final from the start
    mid: torch.Tensor | None = None      # residual stream after the (quantized) attention half
    out_of = {adapter.attn_out_linear: "attn", adapter.mlp_out_linear: "mlp"} if adapter.splits_residual else {}
    kept: torch.Tensor | None = None     # the inputs of a half's output linear, captured by its pass
    token_rows: dict[str, int] = {}      # mixture-of-experts: calibration rows per (canonical) input
    routed_counts: dict[str, list[int]] = {}

    def narrow(rel: str) -> bool:
        return block.linear(rel).in_features <= block.inputs.shape[-1]

    def mlp_half(h: torch.Tensor) -> torch.Tensor:
        return adapter.mlp_half(block.module, h)

    def residual_plus(lin: torch.nn.Linear, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + lin(x)`` mini-batch by mini-batch, as the block's own forward computes it."""
        out = torch.empty_like(residual)
        for b0 in range(0, residual.shape[0], block.batch_size):
            b1 = min(residual.shape[0], b0 + block.batch_size)
            out[b0:b1] = residual[b0:b1] + lin(x[b0:b1])
        return out

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
        # a sub-step made of a half's output linear alone keeps that linear's inputs: once it is
        # quantized, the half's output is residual + linear(inputs), without re-running the half;
        # unless they are wider than the residual stream (down_proj's: 4x the block's inputs, 256 MiB
        # at 1B shapes and 16 x 512 tokens, alive through the factorisation): the MLP half then runs
        # once more at the end (the same ops, the same result)
        keep = group if len(group) == 1 and group[0] in out_of and narrow(group[0]) else []
        with count_routed_tokens(block.module) as routed:
            if mid is not None:
                acts = block.run(stream=group, capture=keep, on_input=on_input, inputs=mid, forward=mlp_half)
            else:
                acts = block.run(stream=group, capture=keep, on_input=on_input)
        if any(adapter.routed(n) for n in group):
            # tokens per expert: each input's rows as first streamed (gate/up), and the router's
            # assignments from a pass that ran the routing (a pass may stop inside the router)
            token_rows.update({k: acc.n_tokens for k, acc in accs.items() if k not in token_rows})
            if any(sum(c) for c in routed.values()):
                routed_counts = routed
        kept = acts.inputs.get(keep[0]) if keep else None
        _quantize_sub_step(block, group, accs, layer_spec, opts, hessian_seconds=time.perf_counter() - t0)
        done.update(group)
        accs.clear()
        release_freed_memory()  # the Hessians and the pass's temporaries: glibc keeps freed heap pages otherwise
        if kept is not None:
            with torch.no_grad():
                if out_of[group[0]] == "attn" and mid is None and attn <= done:
                    mid = residual_plus(block.linear(group[0]), block.inputs, kept)
                elif out_of[group[0]] == "mlp" and mid is not None and set(names) <= done and not block.is_last:
                    block.next_inputs = residual_plus(block.linear(group[0]), mid, kept)
            kept = None
    if mid is not None and not block.is_last and block.next_inputs is None:
        block.next_inputs = block.run(outputs=True, inputs=mid, forward=mlp_half).outputs
    if routed_counts:
        record_expert_tokens(block, routed_counts, lambda rel: token_rows.get(rel, 0))


def quantize_model_gptq(ctx: Any, model: torch.nn.Module, adapter: ArchAdapter, ids: torch.Tensor,
                        opts: GPTQOptions, *, base_model: str, meta: dict[str, Any] | None = None,
                        batch_size: int = 8, spec_for: Callable[[str], QuantSpec | None] | None = None,
                        layer_specs: dict[str, Any] | None = None):
    """Run GPTQ over every block and write the IR (see ``run_blockwise``).

    ``spec_for``: per-layer specs (see ``gptq_block``); ``layer_specs``: their JSON form for the resume guard.
    """
    widest = max(lin.in_features for lin in adapter.linears(adapter.blocks()[0]).values())
    if ids.numel() < widest:
        ctx.log.warning("GPTQ: %d calibration tokens < %d input features: the Hessians are rank-deficient "
                        "and only damping keeps them invertible; calibrate with more tokens", ids.numel(), widest)
    result = run_blockwise(ctx, model, adapter, ids, lambda b: gptq_block(b, opts, spec_for=spec_for),
                           method="gptq", base_model=base_model, meta=meta,
                           signature={"options": asdict(opts), **({"layers": layer_specs} if layer_specs else {})},
                           propagate="quant", batch_size=batch_size, desc="gptq")
    write_records(ctx, result.records, "gptq_layers.json")
    report_expert_tokens(ctx, result.records)
    return result
