"""``quantize.gptq``: second-order error-compensating quantization (IST-DASLab/gptq, docs/METHODS.md §5)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import BitAllocation, CalibSet, ModelRef, QuantizedCheckpoint
from qflow.quant.layerspec import PerLayerConfig
from qflow.registry import Stage, register


class GPTQConfig(PerLayerConfig):
    """GPTQ knobs; defaults are qflow's (b=4, G=128, sym, true-sequential, act-order + static groups).

        quantize:
          uses: quantize.gptq
          needs: [calibrate]
          with: {bits: 4, group_size: 64, symmetric: false}

    ``symmetric: true`` is GPTQ's SYM-F (z = 2^(b-1)); ``false`` is ASYM-Z.
    ``act_order`` without ``static_groups`` stores a per-column ``g_idx``.
    ``layers:`` may change bits, group_size, symmetric and scheme per layer (each
    layer's own spec in GPTQ's column loop); ``ignore:`` leaves layers float.
    """

    layer_fields = ("bits", "group_size", "symmetric", "scheme")

    bits: int = Field(4, description="weight bits (2, 3, 4, 5, 6, 8)")
    group_size: int = Field(128, description="columns per group; -1 = per output channel")
    symmetric: bool = True
    true_sequential: bool = Field(True, description="sub-steps [k,v,q] -> [o] -> [up,gate] -> [down]")
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal")
    static_groups: bool = Field(True, description="group params from the original W (needs groups)")
    percdamp: float = Field(0.01, ge=0, description="damping as a fraction of mean(diag H)")
    block_size: int = Field(128, ge=1, description="lazy-batch width in columns")
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel of the float model while quantizing (sdpa: ~3x faster on CPU)")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward (memory bound)")
    moe_calibrate_all_experts: bool = Field(
        False, description="mixture-of-experts: calibrate every expert on every token (default: on the tokens "
                           "routed to it); the model's output still uses top-k routing")

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be > 0 or -1 (per channel), got {self.group_size}")
        if self.static_groups and self.group_size == -1 and "static_groups" in self.model_fields_set:
            raise ValueError("static_groups needs group_size > 0")

        self.base_spec()
        return self

    def base_spec(self):
        from qflow.quant.spec import QuantSpec

        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                         scale_dtype=self.scale_dtype)

    def options(self):
        from qflow.quant.algos.gptq_model import GPTQOptions

        return GPTQOptions(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                           true_sequential=self.true_sequential, act_order=self.act_order,
                           static_groups=self.static_groups and self.group_size > 0, percdamp=self.percdamp,
                           block_size=self.block_size, scale_dtype=self.scale_dtype)


@register("quantize.gptq")
class GPTQ(Stage):
    """GPTQ with sequential calibration: each block sees the quantized blocks before it.

        quantize:
          uses: quantize.gptq
          needs: [calibrate]
          with: {bits: 4, group_size: 64, symmetric: false}

    Block by block (one block's activations and Hessians in memory); resumable after a crash.
    Per layer: ``layers:`` / ``ignore:`` and an optional ``plan`` input (BitAllocation).
    """

    version = 2  # 2: per-layer specs (layers, ignore, plan)
    # what it logs (qflow lint checks gates against it); moe_*: mixture-of-experts models only
    metrics = ("gptq_loss_total", "quantize_seconds", "moe_expert_tokens_min", "moe_experts_without_tokens",
               "moe_routed_share_min")
    Config = GPTQConfig
    inputs = {"model": ModelRef, "calib": CalibSet, "plan": BitAllocation}
    optional_inputs = frozenset({"plan"})
    outputs = {"model": QuantizedCheckpoint}

    def check(self, cfg, inputs_meta):
        from qflow.models.adapters import check_group_size, model_config_from_inputs

        from qflow.quant.layerspec import check_layer_specs

        return (check_group_size(model_config_from_inputs(inputs_meta), cfg.group_size, where="group_size")
                + check_layer_specs(cfg, inputs_meta))

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.models.memory import estimate_calibrated

        return estimate_calibrated(cfg, inputs_meta, upstream, hessians=True)

    def run(self, ctx, cfg, model, calib, plan=None):
        from qflow.quant.algos.gptq_model import quantize_model_gptq
        from qflow.quant.algos.calibrated import calibration_ids, checkpoint_meta, open_float_model
        from qflow.quant.layerspec import report_resolution, stage_layer_specs

        specs = stage_layer_specs(cfg, model, plan, stage_id=ctx.stage_id)   # before any work
        report_resolution(ctx, specs)
        net, adapter = open_float_model(cfg, model)
        ids = calibration_ids(ctx, calib, uses="quantize.gptq")
        meta = checkpoint_meta(cfg, calib, ids)
        result = quantize_model_gptq(ctx, net, adapter, ids, cfg.options(), base_model=str(model.base_model_dir),
                                     meta=meta, batch_size=cfg.batch_size, spec_for=specs.spec_for,
                                     layer_specs=specs.signature())
        losses = [r["gptq_loss"] for r in result.records if "gptq_loss" in r]
        if losses:
            ctx.log_metric("gptq_loss_total", float(sum(losses)))
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir), method="gptq",
                                             source=model.meta.get("source"))}
