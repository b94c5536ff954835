"""Block-wise reconstruction (SignRound / AutoRound family, docs/METHODS.md §10.2).

For each decoder block ``i``, with one block in memory (the others stay on disk,
``qflow.models.lazy``):

1. the float block maps the *float* stream's inputs to the targets ``Y_i``
   (float outputs of float inputs, as AutoRound does), which become the float
   stream's next inputs;
2. the block is re-built from the starting IR (float deltas such as AWQ's folded
   norms applied, every quantized linear a :class:`FakeQuantLinear`) and fed the
   *quantized* stream: the outputs of blocks ``0..i-1`` already fine-tuned and
   re-quantized, so each block learns to correct the error accumulated before it;
3. rounding offsets ``V`` in [-0.5, 0.5] and (optionally) per-group scale factors
   are trained by signed-gradient descent on ``MSE(block_q(X_q), Y_i)`` over
   random mini-batches of the training windows (SignRound's default: lr =
   1/steps, linear decay to 0); the held-out windows' MSE is measured at the
   start, every ``eval_every`` steps and at the end, and the parameters with the
   lowest held-out MSE are kept (so a block never ends worse than it started on
   the held-out windows);
4. the block is re-quantized into the IR, its hard-quantized outputs become the
   quantized stream's next inputs, and a resume state (both streams, writer index,
   generator state, per-block records) is saved: a killed run re-run with the same
   key continues after the last finished block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.lazy import block_loader, fix_mmap_threshold, load_model_lazy, release_freed_memory
from ..quant.algos.blockwise import _first, capture_block0_inputs, capture_block_kwargs, check_calibration, finish
from ..quant.algos.resume import BlockState
from ..quant.ir import Checkpoint
from .data import Windows, copy_floats_and_folds, open_writer
from .fakequant import FakeQuantLinear, layer_start
from .loop import LoopSettings, TrainLoop


@dataclass(frozen=True)
class BlockwiseOptions:
    settings: LoopSettings
    rounding: bool = True
    scale: bool = True
    scale_range: tuple[float, float] = (0.5, 1.0)
    train_batch: int = 4            # windows per training step (drawn at random each step)
    forward_batch: int = 8          # windows per no-grad forward (targets, held-out loss, propagation)


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, child)


@torch.no_grad()
def _forward(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for b0 in range(0, x.shape[0], batch):
        out[b0:b0 + batch] = _first(block(x[b0:b0 + batch], **kwargs))
    return out


@torch.no_grad()
def _mse(block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict[str, Any], batch: int) -> float:
    if x.shape[0] == 0:
        return float("nan")
    total = 0.0
    for b0 in range(0, x.shape[0], batch):
        out = _first(block(x[b0:b0 + batch], **kwargs))
        total += float(((out - y[b0:b0 + batch]) ** 2).sum(dtype=torch.float64))
    return total / y.numel()


def finetune_blockwise(ctx: Any, start: Checkpoint, base_dir: str, windows: Windows, opts: BlockwiseOptions, *,
                       attn_implementation: str = "sdpa", meta: dict[str, Any], signature: dict[str, Any]):
    """Fine-tune every block of ``start`` (see the module doc); returns (BlockwiseResult, per-block records)."""
    t_start = time.perf_counter()
    fix_mmap_threshold()
    net, adapter = load_model_lazy(base_dir, dtype="float32", attn_implementation=attn_implementation)
    blocks = adapter.blocks()
    n_blocks = len(blocks)
    n_train = int(windows.train.shape[0])
    ids = torch.cat([windows.train, windows.heldout])
    check_calibration(ids, net)
    resume = BlockState(ctx.scratch, {"method": "finetune.blockwise", "n_blocks": n_blocks,
                                      "ids_shape": list(ids.shape), "n_train": n_train, **signature}, ctx.log)
    saved = resume.load()
    writer = open_writer(resume.ir_dir, start, "blockwise", meta)
    generator = ctx.torch_generator("finetune.blockwise")
    loader = block_loader(net)
    kwargs_per_block = capture_block_kwargs(net, adapter, ids)
    if saved is not None:
        writer.restore(saved["writer"])
        generator.set_state(saved["generator"])
        first, fp_in, q_in, records = int(saved["next_block"]), saved["fp"], saved["q"], list(saved["records"])
        ctx.log.info("resuming finetune.blockwise at block %d/%d", first, n_blocks)
    else:
        first, records = 0, []
        fp_in = capture_block0_inputs(net, adapter, ids, opts.forward_batch)
        q_in = fp_in.clone()
    progress = ctx.progress(total=n_blocks * opts.settings.steps, desc="finetune.blockwise steps")
    if first:
        progress.update(first * opts.settings.steps, note="resumed")
    try:
        for i in range(first, n_blocks):
            if loader is not None:
                loader.load(i)
            block = blocks[i]
            kwargs = kwargs_per_block[i]
            prefix = adapter.block_name(i)
            block.requires_grad_(False)
            fp_out = _forward(block, fp_in, kwargs, opts.forward_batch)   # targets: float block, float inputs
            fq, originals = _quantized_block(block, start, prefix, opts)
            row = _train_block(ctx, block, fq, kwargs, q_in, fp_out, n_train, opts, generator, progress, i)
            for name, layer in fq.items():
                codes, scale, zero = layer.export()
                writer.add_quantized(name, layer.spec, codes, scale, zero, layer.g_idx)
                _set(block, name[len(prefix) + 1:], _hard_linear(layer, codes, scale, zero))
            copy_floats_and_folds(writer, start, block_prefix=prefix)
            q_out = _forward(block, q_in, kwargs, opts.forward_batch)
            err = (q_out - fp_out) ** 2   # the stored (hard) block, on the same windows as mse_start / heldout_start
            row["mse_final_hard"] = float(err[:n_train].mean(dtype=torch.float64))
            if n_train < err.shape[0]:
                row["heldout_final_hard"] = float(err[n_train:].mean(dtype=torch.float64))
            records.append({"block": i, **row})
            for rel, module in originals.items():
                _set(block, rel, module)
            fp_in, q_in = fp_out, q_out
            del fq, fp_out, q_out
            if loader is not None:
                loader.release(i)
            writer.flush()
            resume.save(i + 1, writer, fp=fp_in, q=q_in, generator=generator.get_state(), records=records)
            release_freed_memory()
            ctx.log.info("finetune.blockwise block %d/%d: mse %.4g -> %.4g", i + 1, n_blocks,
                         row["mse_start"], row["mse_final_hard"])
    finally:
        progress.close()
    rest = [p for p in start.floats if not any(p.startswith(adapter.block_name(i) + ".") for i in range(n_blocks))]
    for param in rest:  # float deltas outside the blocks, carried as they are
        writer.add_float(param, start.float_tensor(param))
    writer.close()
    return finish(ctx, resume, records, first, t_start), records


def _quantized_block(block: nn.Module, start: Checkpoint, prefix: str, opts: BlockwiseOptions):
    """Put the start IR's float deltas and fake-quant linears into ``block``; returns (fq by IR name, originals)."""
    params = dict(block.named_parameters())
    with torch.no_grad():
        for param in start.floats:
            if param.startswith(prefix + "."):
                params[param[len(prefix) + 1:]].copy_(start.float_tensor(param))
    fq: dict[str, FakeQuantLinear] = {}
    originals: dict[str, nn.Module] = {}
    for name in start.layers:
        if not name.startswith(prefix + "."):
            continue
        rel = name[len(prefix) + 1:]
        linear = block.get_submodule(rel)
        layer = FakeQuantLinear(layer_start(start, name, linear.weight), linear.bias, rounding=opts.rounding,
                                scale=opts.scale, scale_range=opts.scale_range)
        originals[rel] = linear
        _set(block, rel, layer)
        fq[name] = layer
    return fq, originals


def _hard_linear(layer: FakeQuantLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> nn.Linear:
    """A plain linear holding exactly the dequantized weight the IR now stores."""
    from ..quant import affine

    s = scale[:, layer.col_group]
    if layer.lookup:
        w = affine.lut(layer.spec)[codes.long()] * s
    else:
        w = (codes.float() - zero[:, layer.col_group]) * s
    out = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    out.requires_grad_(False)
    return out


def _train_block(ctx: Any, block: nn.Module, fq: dict[str, FakeQuantLinear], kwargs: dict[str, Any],
                 q_in: torch.Tensor, fp_out: torch.Tensor, n_train: int, opts: BlockwiseOptions,
                 generator: torch.Generator, progress: Any, index: int) -> dict[str, Any]:
    x_tr, y_tr = q_in[:n_train], fp_out[:n_train]
    x_ho, y_ho = q_in[n_train:], fp_out[n_train:]
    fb = opts.forward_batch
    row: dict[str, Any] = {"mse_start": _mse(block, x_tr, y_tr, kwargs, fb)}
    params = {f"{n}.{k}": p for n, layer in fq.items() for k, p in layer.trainable().items()}
    if not params:
        row.update(steps=0, stopped="nothing to train")
        return row
    batch = min(n_train, opts.train_batch)

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randperm(n_train, generator=generator)[:batch]
        out = _first(block(x_tr[idx], **kwargs))
        return nn.functional.mse_loss(out, y_tr[idx])

    # the parameters kept are those of the lowest held-out block MSE (the start's included); without
    # held-out windows, of the lowest MSE over all training windows (SignRound keeps its best iteration
    # by training loss), so a block never ends worse than it started on the windows it is judged by
    if x_ho.shape[0]:
        heldout, row["selected_on"] = (lambda: _mse(block, x_ho, y_ho, kwargs, fb)), "heldout"
    else:
        heldout, row["selected_on"] = (lambda: _mse(block, x_tr, y_tr, kwargs, fb)), "train"

    def clamp() -> None:
        for layer in fq.values():
            layer.clamp_()

    loop = TrainLoop(params, opts.settings, generator=generator, after_step=clamp, log=ctx.log)
    result = loop.run(step_loss, heldout, progress=progress)
    skipped = opts.settings.steps - result.steps
    if skipped > 0:
        progress.update(skipped, note=f"block {index} stopped: {result.stopped}")
    # the end-of-training MSE is the stored block's (mse_final_hard, measured by the caller on the forward that
    # feeds the next block); a soft-rounding pass over the training windows here would cost a forward per block
    tag = "heldout" if row["selected_on"] == "heldout" else "train_select"   # train_select: MSE on every training window
    if tag != "heldout":
        result.curve = [{(f"{tag}_loss" if k == "heldout_loss" else k): v for k, v in r.items()} for r in result.curve]
    row.update({"steps": result.steps, "stopped": result.stopped, "best_step": result.best_step,
                f"{tag}_start": result.first_heldout, f"{tag}_best": result.best_heldout, "curve": result.curve})
    return row
