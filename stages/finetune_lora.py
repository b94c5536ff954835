"""``finetune.lora``: LoRA adapters over the frozen quantized model (docs/METHODS.md §10.5)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import CalibSet, QuantizedCheckpoint
from qflow.finetune.config import TrainConfig, precision_field
from qflow.registry import Stage, register
from qflow.specs import Regex


class LoRAConfig(TrainConfig):
    """LoRA knobs.

        finetune:
          uses: finetune.lora
          needs: [quantize, calibrate]
          with: {steps: 100, rank: 8, alpha: 16, dropout: 0.05, targets: "(q|k|v|o)_proj$", output: merged}

    ``output: merged`` (default) adds the trained update to each weight and
    re-rounds it onto the start's grid, so the result is an ordinary IR that
    every evaluate.* and export.* stage reads; ``output: adapter`` keeps the
    start's codes and saves the adapter beside the IR in ``adapter/`` (peft key
    names, ``adapter_config.json``), which qflow's evaluation does not apply.
    """

    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(2, ge=1)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: Regex = Field(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
                           description="regex over quantized linear names that get an adapter")
    output: Literal["merged", "adapter"] = "merged"
    temperature: float = Field(2.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    precision: Literal["float32", "bfloat16"] = precision_field()
    topk: int = Field(64, ge=1)
    forward_batch: int = Field(2, ge=1)


@register("finetune.lora")
class FinetuneLoRA(Stage):
    """LoRA on a frozen quantized base (any qflow format), distilled from the float model.

        finetune:
          uses: finetune.lora
          needs: [quantize, calibrate]
          with: {steps: 100, rank: 8, alpha: 16}

    Default output: merged into the weights and re-rounded onto the start's grid
    (evaluate/export read the IR unchanged); ``output: adapter`` saves it beside the IR.
    """

    version = 2  # 2: fused AdamW (float-level differences)
    # windows used, steps, time, held-out KL at the start and at the best step (curves are not gateable)
    metrics = ("train_windows", "heldout_windows", "train_steps", "train_seconds", "best_step", "heldout_kl_start",
               "heldout_kl_best", "heldout_kl_ratio", "train_loss_last", "n_adapted_layers",
               "merged_codes_changed")   # fraction of the adapted layers' codes the merge changed (output: merged)
    Config = LoRAConfig
    inputs = {"model": QuantizedCheckpoint, "calib": CalibSet}
    outputs = {"model": QuantizedCheckpoint}

    def check(self, cfg, inputs_meta):
        from qflow.finetune.memory import heldout_problems

        return heldout_problems(cfg, inputs_meta)

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.finetune.memory import finetune_peak_bytes

        return finetune_peak_bytes(cfg, inputs_meta, upstream, method="lora")

    def run(self, ctx, cfg, model, calib):
        import re

        from qflow.errors import StageError
        from qflow.finetune.e2e import E2EOptions, finetune_e2e
        from qflow.finetune.fakequant import FakeQuantLinear
        from qflow.finetune.lora import LoRALinear, save_adapter
        from qflow.finetune.stage_common import finish_report, log_e2e_result, open_start

        start, windows, meta = open_start(ctx, cfg, model, calib)
        pattern = re.compile(cfg.targets)
        if not any(pattern.search(name) for name in start.layers):
            raise StageError(f"targets {cfg.targets!r} matches no quantized linear", where=f"stages.{ctx.stage_id}.with.targets",
                             fix=f"match names such as {next(iter(start.layers))}")
        opts = E2EOptions(settings=cfg.loop_settings("adamw"), temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                          topk=cfg.topk, train_batch=cfg.batch_size, forward_batch=cfg.forward_batch,
                          precision=cfg.precision)
        generator = ctx.torch_generator("finetune.lora")

        def make_layer(layer_start, linear):
            if not pattern.search(layer_start.name):
                return FakeQuantLinear(layer_start, linear.bias, rounding=False, scale=False)
            layer = LoRALinear(layer_start, linear.bias, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                               generator=generator)
            layer.merge = cfg.output == "merged"
            return layer

        result, seconds, layers = finetune_e2e(ctx, start, str(model.base_model_dir), windows, opts, make_layer,
                                               method="finetune.lora", meta=meta, attn=cfg.attn_implementation,
                                               generator=generator,
                                               signature={"config": cfg.model_dump(mode="json"), "start": str(model.path)})
        adapters = {n: m for n, m in layers.items() if isinstance(m, LoRALinear)}
        ctx.log_metric("n_adapted_layers", len(adapters))
        if cfg.output == "merged":
            # the merge re-rounds W + BA onto the start's grid: an update under half a step everywhere is lost
            from qflow.quant.ir import Checkpoint

            merged = Checkpoint(ctx.output("model"))
            changed = total = 0
            for name in adapters:
                a, b = merged.params(name)[0], start.params(name)[0]
                changed += int((a != b).sum())
                total += a.numel()
            frac = changed / max(total, 1)
            ctx.log_metric("merged_codes_changed", frac)
            if changed == 0:
                ctx.log.warning("finetune.lora: the merged update moved no code of the %d adapted layers (it is under "
                                "half a quantization step everywhere), so the merged IR equals the start; keep the "
                                "adapter instead (with.output: adapter) or train longer / with a larger lr",
                                len(adapters))
        if cfg.output == "adapter":
            save_adapter(ctx.output("model") / "adapter", adapters, rank=cfg.rank, alpha=cfg.alpha,
                         dropout=cfg.dropout, base_model=str(model.base_model_dir))
        log_e2e_result(ctx, result, seconds)
        finish_report(ctx, windows, result.curve)
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir),
                                             method=f"{start.method}+lora", source=model.meta.get("source"),
                                             lora_output=cfg.output)}
