"""``finetune.qat``: quantization-aware training with LSQ step sizes (docs/METHODS.md §10.4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import CalibSet, QuantizedCheckpoint
from qflow.finetune.config import TrainConfig, precision_field
from qflow.registry import Stage, register


class QATConfig(TrainConfig):
    """QAT knobs.

        finetune:
          uses: finetune.qat
          needs: [quantize, calibrate]
          with: {steps: 100, lr: 1.0e-5, init: start}

    Trains every quantized layer's float weight and its per-group LSQ step sizes
    (straight-through estimator), loss as finetune.distill (T²·KL_T to the float
    teacher, optional cross-entropy), then re-quantizes into the IR with the
    learned steps as scales and the start's zero points. ``init: start`` (default)
    keeps the start IR's scales; ``init: lsq`` is the paper's 2·mean|w|/sqrt(Qp),
    meant for long training runs (from an RTN W3 g64 start, 60 steps at lr 1e-5 left
    the KL 2.2x worse than the start: benchmarks/RESULTS.md "Fine-tune recovery").
    """

    steps: int = Field(100, ge=1)
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(2, ge=1)
    init: Literal["lsq", "start"] = Field("start", description="step-size initialisation: the start IR's scales, "
                                                              "or LSQ's 2*mean|w|/sqrt(Qp)")
    temperature: float = Field(2.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    precision: Literal["float32", "bfloat16"] = precision_field()
    topk: int = Field(64, ge=1)
    forward_batch: int = Field(2, ge=1)


@register("finetune.qat")
class FinetuneQAT(Stage):
    """Fake-quant training with LSQ learnable step sizes, ending by re-quantizing into the IR.

        finetune:
          uses: finetune.qat
          needs: [quantize, calibrate]
          with: {steps: 100, init: start}

    Layers in a lookup format (nf4/fp4) or with a fractional zero (HQQ) are
    not LSQ grids and are written back unchanged (counted in ``n_layers_frozen``).
    """

    version = 4  # 2: LSQ broadcast over contiguous groups (float-level differences from version 1's gathers); 3: fused AdamW; 4: init start by default
    # windows used, steps, time, held-out KL at the start and at the best step (curves are not gateable)
    metrics = ("train_windows", "heldout_windows", "train_steps", "train_seconds", "best_step", "heldout_kl_start",
               "heldout_kl_best", "heldout_kl_ratio", "train_loss_last", "n_layers_frozen")
    Config = QATConfig
    inputs = {"model": QuantizedCheckpoint, "calib": CalibSet}
    outputs = {"model": QuantizedCheckpoint}

    def check(self, cfg, inputs_meta):
        from qflow.finetune.memory import heldout_problems

        return heldout_problems(cfg, inputs_meta)

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.finetune.memory import finetune_peak_bytes

        return finetune_peak_bytes(cfg, inputs_meta, upstream, method="qat")

    def run(self, ctx, cfg, model, calib):
        from qflow.finetune.e2e import E2EOptions, finetune_e2e
        from qflow.finetune.fakequant import FakeQuantLinear
        from qflow.finetune.lsq import LSQLinear
        from qflow.finetune.stage_common import finish_report, log_e2e_result, open_start

        start, windows, meta = open_start(ctx, cfg, model, calib)
        opts = E2EOptions(settings=cfg.loop_settings("adamw"), temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                          topk=cfg.topk, train_batch=cfg.batch_size, forward_batch=cfg.forward_batch,
                          precision=cfg.precision)
        frozen = []

        def make_layer(layer_start, linear):
            if layer_start.lookup or layer_start.spec.zero_float:
                frozen.append(layer_start.name)
                return FakeQuantLinear(layer_start, linear.bias, rounding=False, scale=False)
            return LSQLinear(layer_start, linear.bias, init=cfg.init)

        result, seconds, _ = finetune_e2e(ctx, start, str(model.base_model_dir), windows, opts, make_layer,
                                          method="finetune.qat", meta=meta, attn=cfg.attn_implementation,
                                          signature={"config": cfg.model_dump(mode="json"), "start": str(model.path)})
        ctx.log_metric("n_layers_frozen", len(frozen))
        log_e2e_result(ctx, result, seconds)
        finish_report(ctx, windows, result.curve)
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir),
                                             method=f"{start.method}+qat", source=model.meta.get("source"))}
