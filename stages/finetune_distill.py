"""``finetune.distill``: end-to-end knowledge distillation into the quantization parameters (docs/METHODS.md §10.3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import CalibSet, QuantizedCheckpoint
from qflow.finetune.config import RoundingScaleConfig, precision_field
from qflow.registry import Stage, register


class DistillConfig(RoundingScaleConfig):
    """Distillation knobs.

        finetune:
          uses: finetune.distill
          needs: [quantize, calibrate]
          with: {steps: 100, lr: 5.0e-3, temperature: 2.0, ce_weight: 0.0, topk: 64}

    Trains the rounding offsets V in [-0.5, 0.5] of every quantized weight (a
    straight-through estimate of the rounded weight, each weight may move to a
    neighbouring grid point) and per-group scale factors in ``scale_range``; zero
    points stay the start's. Loss: T²·KL_T(teacher || student) on the teacher's
    top-k tokens + a tail bin, plus ``ce_weight`` × next-token cross-entropy.
    """

    steps: int = Field(100, ge=1)
    lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(2, ge=1)
    temperature: float = Field(2.0, gt=0, description="softmax temperature of teacher and student (loss scaled by T^2)")
    ce_weight: float = Field(0.0, ge=0, description="weight of the next-token cross-entropy added to the KL")
    precision: Literal["float32", "bfloat16"] = precision_field()
    topk: int = Field(64, ge=1, description="teacher logits kept per token (the rest is one tail bin)")
    forward_batch: int = Field(2, ge=1)


@register("finetune.distill")
class FinetuneDistill(Stage):
    """Distil the float model into a quantized IR's rounding and scales, end to end; writes the same IR.

        finetune:
          uses: finetune.distill
          needs: [quantize, calibrate]
          with: {steps: 100, temperature: 2.0}

    Teacher logits are computed once and memoised (top-k + logsumexp per token).
    The whole model is in memory. Checkpoints every ``checkpoint_every`` steps.
    """

    version = 3  # 2: grouped fake-quant function (float-level differences from version 1's autograd form); 3: fused AdamW
    # windows used, steps, time, held-out KL at the start and at the best step (curves are not gateable)
    metrics = ("train_windows", "heldout_windows", "train_steps", "train_seconds", "best_step", "heldout_kl_start",
               "heldout_kl_best", "heldout_kl_ratio", "train_loss_last")
    Config = DistillConfig
    inputs = {"model": QuantizedCheckpoint, "calib": CalibSet}
    outputs = {"model": QuantizedCheckpoint}

    def check(self, cfg, inputs_meta):
        from qflow.finetune.memory import heldout_problems

        return heldout_problems(cfg, inputs_meta)

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.finetune.memory import finetune_peak_bytes

        return finetune_peak_bytes(cfg, inputs_meta, upstream, method="distill")

    def run(self, ctx, cfg, model, calib):
        from qflow.finetune.e2e import E2EOptions, finetune_e2e
        from qflow.finetune.fakequant import FakeQuantLinear
        from qflow.finetune.stage_common import finish_report, log_e2e_result, open_start

        start, windows, meta = open_start(ctx, cfg, model, calib)
        opts = E2EOptions(settings=cfg.loop_settings("adamw"), temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                          topk=cfg.topk, train_batch=cfg.batch_size, forward_batch=cfg.forward_batch,
                          precision=cfg.precision)

        def make_layer(layer_start, linear):
            return FakeQuantLinear(layer_start, linear.bias, rounding=cfg.rounding, scale=cfg.scale,
                                   scale_range=tuple(cfg.scale_range))

        result, seconds, _ = finetune_e2e(ctx, start, str(model.base_model_dir), windows, opts, make_layer,
                                       method="finetune.distill", meta=meta, attn=cfg.attn_implementation,
                                       signature={"config": cfg.model_dump(mode="json"), "start": str(model.path)})
        log_e2e_result(ctx, result, seconds)
        finish_report(ctx, windows, result.curve)
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir),
                                             method=f"{start.method}+distill", source=model.meta.get("source"))}
