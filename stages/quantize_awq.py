"""``quantize.awq``: activation-aware weight quantization (llm-awq, docs/METHODS.md §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import BitAllocation, CalibSet, ModelRef, QuantizedCheckpoint
from qflow.quant.layerspec import PerLayerConfig
from qflow.recipe.validate import reject_renamed_keys
from qflow.registry import Stage, register

_GPTQ_FIELDS = ("gptq_true_sequential", "gptq_act_order", "gptq_static_groups", "gptq_percdamp", "gptq_block_size")
_RENAMED = {"n_sample_token": ("n_clip_tokens", "write n_clip_tokens (the clip search's token sample; n_search_tokens "
                                                "is the scale search's)")}


class AWQConfig(PerLayerConfig):
    """AWQ knobs (llm-awq defaults).

        quantize:
          uses: quantize.awq
          needs: [calibrate]
          with: {bits: 4, group_size: 64, zero_point: true, n_search_tokens: 8192}

    ``zero_point: false`` quantizes SYM-R instead of ASYM-A. ``duo_scaling: true``
    is AutoAWQ's scale formula. ``n_search_tokens`` (default: all tokens, as
    llm-awq) limits the attention/MLP loss of the scale search to evenly spaced
    whole sequences holding about that many tokens (a large speed-up on CPUs);
    ``n_clip_tokens`` is the clip search's own sample of tokens.
    ``then: gptq`` rounds the scaled and clipped weights with GPTQ instead of RTN
    (``gptq_*`` knobs), propagating the quantized blocks' outputs.
    ``layers:`` may change bits, group_size and scheme per layer (the scale search
    fake-quantizes each linear of a site with its own spec); ``ignore:`` leaves layers
    float (folded scales are kept as float deltas).
    """

    layer_fields = ("bits", "group_size", "scheme")

    bits: int = Field(4, description="weight bits (2, 3, 4, 5, 6, 8)")
    group_size: int = Field(128, description="columns per group; -1 = per output channel")
    zero_point: bool = Field(True, description="ASYM-A with zero point (true) or SYM-R (false)")
    n_grid: int = Field(20, ge=1, description="scale-search grid: ratios r/n_grid, r = 0..n_grid-1")
    max_shrink: float = Field(0.5, gt=0, le=1, description="clip search shrinks max|W| down to 1 - max_shrink")
    n_clip_tokens: int = Field(512, ge=1, description="tokens sampled for the clip search")
    duo_scaling: bool = Field(False, description="AutoAWQ's x_mean^a / w_mean^(1-a) scales")
    apply_clip: bool = Field(True, description="run the clip search")
    n_search_tokens: int | None = Field(None, ge=1, description="tokens for the attention/MLP scale-search loss (None = all)")
    then: Literal["rtn", "gptq"] = Field("rtn", description="rounding after scaling+clipping")
    gptq_true_sequential: bool = True
    gptq_act_order: bool = True
    gptq_static_groups: bool = True
    gptq_percdamp: float = Field(0.01, ge=0)
    gptq_block_size: int = Field(128, ge=1)
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel of the float model while quantizing (sdpa: ~3x faster on CPU)")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward (memory bound)")
    moe_calibrate_all_experts: bool = Field(
        False, description="mixture-of-experts: calibrate every expert on every token (default: on the tokens "
                           "routed to it); the model's output still uses top-k routing")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        return reject_renamed_keys(data, _RENAMED, cls.__name__)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be > 0 or -1 (per channel), got {self.group_size}")
        if int(self.max_shrink * self.n_grid) < 1:
            raise ValueError(f"max_shrink * n_grid = {self.max_shrink * self.n_grid} evaluates no clip factor; "
                             "raise max_shrink or n_grid")
        if self.then == "rtn":
            stray = sorted(f for f in _GPTQ_FIELDS if f in self.model_fields_set)
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply with then: gptq")

        self.base_spec()
        return self

    def base_spec(self):
        from qflow.quant.spec import QuantSpec

        return QuantSpec(bits=self.bits, group_size=self.group_size, scheme="asym_a" if self.zero_point else "sym_r",
                         scale_dtype=self.scale_dtype)

    def options(self):
        from qflow.quant.algos.awq import AWQOptions

        gptq = {"true_sequential": self.gptq_true_sequential, "act_order": self.gptq_act_order,
                "static_groups": self.gptq_static_groups, "percdamp": self.gptq_percdamp,
                "block_size": self.gptq_block_size}
        return AWQOptions(bits=self.bits, group_size=self.group_size, zero_point=self.zero_point, n_grid=self.n_grid,
                          max_shrink=self.max_shrink, n_clip_tokens=self.n_clip_tokens,
                          duo_scaling=self.duo_scaling, apply_clip=self.apply_clip,
                          n_search_tokens=self.n_search_tokens, then=self.then,
                          gptq=gptq if self.then == "gptq" else {}, scale_dtype=self.scale_dtype)


@register("quantize.awq")
class AWQ(Stage):
    """AWQ: per-channel activation-aware scales + clipping, then ASYM-A rounding (or GPTQ).

        quantize:
          uses: quantize.awq
          needs: [calibrate]
          with: {bits: 4, group_size: 64}

    Block by block (one block's activations in memory); resumable after a crash.
    Folded norm weights are stored as float deltas in the checkpoint.
    Per layer: ``layers:`` / ``ignore:`` and an optional ``plan`` input (BitAllocation).
    """

    version = 4  # 2: n_sample_token renamed n_clip_tokens; 3: fold factors recorded; 4: per-layer specs
    # what it logs (qflow lint checks gates against it); moe_*: mixture-of-experts models only
    metrics = ("mean_best_ratio", "quantize_seconds", "moe_expert_tokens_min", "moe_experts_without_tokens",
               "moe_routed_share_min")
    Config = AWQConfig
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

        return estimate_calibrated(cfg, inputs_meta, upstream, hessians=cfg.then == "gptq")

    def run(self, ctx, cfg, model, calib, plan=None):
        from qflow.quant.algos.awq import quantize_model_awq
        from qflow.quant.algos.calibrated import calibration_ids, checkpoint_meta, open_float_model
        from qflow.quant.layerspec import report_resolution, stage_layer_specs

        specs = stage_layer_specs(cfg, model, plan, stage_id=ctx.stage_id)   # before any work
        report_resolution(ctx, specs)
        net, adapter = open_float_model(cfg, model)
        ids = calibration_ids(ctx, calib, uses="quantize.awq")
        meta = checkpoint_meta(cfg, calib, ids)
        result = quantize_model_awq(ctx, net, adapter, ids, cfg.options(), base_model=str(model.base_model_dir),
                                    meta=meta, batch_size=cfg.batch_size, spec_for=specs.spec_for,
                                    layer_specs=specs.signature())
        ratios = [r["best_ratio"] for r in result.records if "best_ratio" in r]
        if ratios:
            ctx.log_metric("mean_best_ratio", sum(ratios) / len(ratios))
        method = "awq" if cfg.then == "rtn" else "awq+gptq"
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir), method=method,
                                             source=model.meta.get("source"))}
