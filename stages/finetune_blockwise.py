"""``finetune.blockwise``: block-by-block reconstruction after quantization (SignRound, docs/METHODS.md §10.2)."""

from __future__ import annotations

from pydantic import Field

from qflow.artifacts import CalibSet, QuantizedCheckpoint
from qflow.finetune.config import RoundingScaleConfig
from qflow.registry import Stage, register


class BlockwiseConfig(RoundingScaleConfig):
    """SignRound-style knobs; ``steps`` and the batch are per block.

        finetune:
          uses: finetune.blockwise
          needs: [quantize, calibrate]
          with: {steps: 200, batch_size: 8, heldout_windows: 2}

    ``lr`` unset = SignRound's 1/steps with a linear decay to 0 (signed-gradient
    descent). ``rounding`` trains offsets V in [-0.5, 0.5]; ``scale`` trains a
    per-group scale factor in ``scale_range`` (< 1 clips the group's range).
    Resume is per block (the state is saved after every block), so
    ``checkpoint_every`` is not used here; ``eval_every``/``patience`` act within each block.
    """

    steps: int = Field(200, ge=1, description="signed-gradient steps per block")
    lr: float | None = Field(None, gt=0, description="step size of V and the scale factors; unset = 1/steps")
    schedule: str = Field("linear", pattern="^(cosine|linear|constant)$")
    grad_clip: float = Field(0.0, ge=0, description="unused by signed-gradient descent")
    forward_batch: int = Field(8, ge=1, description="windows per no-grad forward")


@register("finetune.blockwise")
class FinetuneBlockwise(Stage):
    """SignRound/AutoRound-style block reconstruction of any quantized IR, one block in memory.

        finetune:
          uses: finetune.blockwise
          needs: [quantize, calibrate]
          with: {steps: 200, batch_size: 8}

    Per block: MSE between the fake-quantized block fed the quantized blocks'
    outputs and the float block fed float inputs; trains rounding offsets and
    per-group scale factors, keeps the lowest held-out MSE, re-quantizes into the
    IR (same specs, zero points, g_idx and folds as the start). Resumes per block.

    Metrics: ``block_mse_start_sum`` / ``block_mse_end_sum``: sum over blocks of the block-output
    MSE on the training windows, start IR vs stored result, each block fed the same quantized
    stream; ``block_mse_ratio`` = end / start. Per block (``finetune.json``, and curves
    ``block_mse_start``/``block_mse_end`` with step = block index) also the held-out MSE.
    """

    version = 3  # 2: grouped fake-quant function (float-level differences from version 1's autograd form); 3: fused AdamW
    # windows used, time, summed per-block output MSE before/after and their ratio (curves are not gateable)
    metrics = ("train_windows", "heldout_windows", "finetune_seconds", "quantize_seconds", "block_mse_start_sum",
               "block_mse_end_sum", "block_mse_ratio")
    Config = BlockwiseConfig
    inputs = {"model": QuantizedCheckpoint, "calib": CalibSet}
    outputs = {"model": QuantizedCheckpoint}

    def check(self, cfg, inputs_meta):
        from qflow.finetune.memory import heldout_problems

        return heldout_problems(cfg, inputs_meta)

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.finetune.memory import finetune_peak_bytes

        return finetune_peak_bytes(cfg, inputs_meta, upstream, method="blockwise")

    def run(self, ctx, cfg, model, calib):
        from qflow.finetune.blockwise import BlockwiseOptions, finetune_blockwise
        from qflow.finetune.stage_common import finish_report, log_curve, open_start

        start, windows, meta = open_start(ctx, cfg, model, calib)
        lr = cfg.lr if cfg.lr is not None else 1.0 / cfg.steps
        opts = BlockwiseOptions(settings=cfg.loop_settings("signsgd", lr=lr), rounding=cfg.rounding,
                                scale=cfg.scale, scale_range=tuple(cfg.scale_range),
                                train_batch=cfg.batch_size, forward_batch=cfg.forward_batch)
        result, records = finetune_blockwise(ctx, start, str(model.base_model_dir), windows, opts,
                                             attn_implementation=cfg.attn_implementation, meta=meta,
                                             signature={"config": cfg.model_dump(mode="json"),
                                                        "start": str(model.path)})
        start_mse = sum(r["mse_start"] for r in records)
        end_mse = sum(r["mse_final_hard"] for r in records)
        ctx.log_metric("finetune_seconds", result.seconds)
        ctx.log_metric("block_mse_start_sum", start_mse)
        ctx.log_metric("block_mse_end_sum", end_mse)
        ctx.log_metric("block_mse_ratio", end_mse / start_mse if start_mse else float("nan"))
        for r in records:   # per block: MSE before/after (step = block index), and the block's own training curve
            ctx.log_metric_at("block_mse_start", r["block"], r["mse_start"])
            ctx.log_metric_at("block_mse_end", r["block"], r["mse_final_hard"])
            log_curve(ctx, r.get("curve", []), offset=r["block"] * cfg.steps, prefix="block_")
        finish_report(ctx, windows, records)
        return {"model": QuantizedCheckpoint(result.checkpoint_dir, base_model=str(model.base_model_dir),
                                             method=f"{start.method}+blockwise", source=model.meta.get("source"))}
