"""End-to-end fine-tuning of a whole quantized model against the float teacher (distill, QAT, LoRA).

The student is the float model with the starting IR's float deltas applied and
every quantized linear replaced by a trainable layer (``make_layer``: a
:class:`FakeQuantLinear`, an LSQ layer, a LoRA adapter over the frozen
dequantized weight). The loss is ``T² · KL_T(teacher || student)`` on the cached
teacher logits (top-k + tail bin, ``qflow.finetune.teacher``) plus an optional
``ce_weight ·`` next-token cross-entropy. The held-out curve is the top-k + tail
KL at T = 1 on the held-out windows. At the end every layer is re-quantized
(``layer.export()``) into the same IR format; the whole model is in memory (the
methods here are end to end; ``finetune.blockwise`` is the one-block method).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..quant.ir import Checkpoint
from ..quant.weights import block_index
from .data import Windows, copy_floats_and_folds, open_writer
from .fakequant import LayerStart, layer_start
from .loop import LoopSettings, TrainLoop
from .teacher import ids_fingerprint, kl_topk, load_teacher, write_teacher


@dataclass(frozen=True)
class E2EOptions:
    settings: LoopSettings
    temperature: float = 2.0
    ce_weight: float = 0.0
    topk: int = 64
    train_batch: int = 2
    forward_batch: int = 2
    precision: str = "float32"   # the training forward/backward's compute dtype (see ``compute_precision``)


def compute_precision(precision: str, device: str = "cpu"):
    """The context the training forward and backward run in: ``float32`` as stored, or ``bfloat16``
    autocast (matmuls in bf16 with fp32 accumulation: several times faster on CPUs with AMX or
    AVX512-BF16, and on GPUs). The trained parameters, the optimizer state, the teacher logits, the
    loss (computed on fp32 logits), the held-out KL and the re-quantized export stay fp32."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, child)


def teacher_logits(ctx: Any, base_dir: str, ids: torch.Tensor, opts: E2EOptions, attn: str) -> dict[str, torch.Tensor]:
    """The float model's top-k logits on ``ids``, computed once per (model, windows, k, T) and memoised."""
    from ..models.loading import load_model

    def compute(folder: Path) -> None:
        net, _ = load_model(base_dir, dtype="float32", attn_implementation=attn)
        write_teacher(folder, net.eval(), ids, topk=opts.topk, temperature=opts.temperature,
                      batch_size=opts.forward_batch)

    folder = ctx.memo("teacher-logits", {"base_model": str(base_dir), "ids": ids_fingerprint(ids), "topk": opts.topk,
                                         "temperature": opts.temperature}, compute)
    return load_teacher(folder)


def build_student(base_dir: str, start: Checkpoint, make_layer: Callable[[LayerStart, nn.Linear], nn.Module],
                  attn: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The float model with the start IR's float deltas and a trainable layer per quantized linear."""
    from ..models.loading import load_model

    net, _ = load_model(base_dir, dtype="float32", attn_implementation=attn)
    net.eval().requires_grad_(False)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for param, tensor in start.iter_floats():
            params[param].copy_(tensor)
    layers: dict[str, nn.Module] = {}
    for name in start.layers:
        linear = net.get_submodule(name)
        layer = make_layer(layer_start(start, name, linear.weight), linear)
        _set(net, name, layer)
        layers[name] = layer
    return net, layers


def finetune_e2e(ctx: Any, start: Checkpoint, base_dir: str, windows: Windows, opts: E2EOptions,
                 make_layer: Callable[[LayerStart, nn.Linear], nn.Module], *, method: str, meta: dict[str, Any],
                 signature: dict[str, Any], attn: str = "sdpa", generator: torch.Generator | None = None):
    """Train, re-quantize into ``ctx.output("model")``; returns (LoopResult, seconds, trained layers by name)."""
    t0 = time.perf_counter()
    ids = torch.cat([windows.train, windows.heldout])
    n_train = int(windows.train.shape[0])
    teacher = teacher_logits(ctx, base_dir, ids, opts, attn)
    net, layers = build_student(base_dir, start, make_layer, attn)
    params = {f"{n}.{k}": p for n, layer in layers.items() for k, p in layer.trainable().items()}
    generator = generator or ctx.torch_generator(method)
    for layer in layers.values():
        if hasattr(layer, "generator"):
            layer.generator = generator
    temperature = opts.temperature
    batch = min(n_train, opts.train_batch)

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randperm(n_train, generator=generator)[:batch]
        with compute_precision(opts.precision):
            logits = net(input_ids=ids[idx], use_cache=False).logits
        logits = logits.float()
        loss = temperature ** 2 * kl_topk(logits, teacher["values"][idx], teacher["indices"][idx],
                                           teacher["lse"][idx], temperature)
        if opts.ce_weight:
            ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[idx][:, 1:].reshape(-1))
            loss = loss + opts.ce_weight * ce
        return loss

    @torch.no_grad()
    def heldout_kl() -> float:
        train_mode = [m.training for m in layers.values()]
        for m in layers.values():
            m.eval()
        total, count = 0.0, 0
        for b0 in range(n_train, ids.shape[0], opts.forward_batch):
            b1 = min(ids.shape[0], b0 + opts.forward_batch)
            logits = net(input_ids=ids[b0:b1], use_cache=False).logits
            total += float(kl_topk(logits, teacher["values"][b0:b1], teacher["indices"][b0:b1],
                                   teacher["lse1"][b0:b1], 1.0)) * (b1 - b0)
            count += b1 - b0
        for m, was in zip(layers.values(), train_mode):
            m.train(was)
        return total / count

    def clamp() -> None:
        for layer in layers.values():
            layer.clamp_()

    for layer in layers.values():
        layer.train()
    loop = TrainLoop(params, opts.settings, generator=generator, state_path=Path(ctx.scratch) / "train_state.pt",
                     signature={"method": method, **signature}, log=ctx.log, after_step=clamp)
    with ctx.progress(opts.settings.steps, method) as bar:
        result = loop.run(step_loss, heldout_kl if windows.heldout.shape[0] else None, progress=bar)
    for layer in layers.values():
        layer.eval()
    writer = open_writer(ctx.output("model"), start, method.split(".")[-1], meta)
    copy_floats_and_folds(writer, start)
    current = None
    for name, layer in layers.items():
        blk = block_index(name)
        if current is not None and blk != current:
            writer.flush()
        current = blk
        codes, scale, zero = layer.export()
        writer.add_quantized(name, start.layers[name].spec, codes, scale, zero, start.layer_tensors(name).get("g_idx"))
    writer.close()
    loop.clear()
    return result, time.perf_counter() - t0, layers
