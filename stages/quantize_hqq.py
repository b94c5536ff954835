"""``quantize.hqq``: Half-Quadratic Quantization, calibration-free (docs/METHODS.md §7)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import BitAllocation, ModelRef, QuantizedCheckpoint
from qflow.quant.layerspec import PerLayerConfig
from qflow.registry import Stage, register
from qflow.specs import Regex


class HQQConfig(PerLayerConfig):
    """HQQ knobs (mobiusml/hqq defaults).

        quantize:
          uses: quantize.hqq
          with: {bits: 4, group_size: 64, layers: {"re:.*down_proj": {bits: 8}}}

    Only the zero point is optimized (ASYM-H, stored as fp16). ``zero_float: false``
    rounds it to an integer for formats that need one (loses part of the gain).
    ``layers:`` may change bits and group_size per layer; ``ignore:`` leaves layers float.
    """

    layer_fields = ("bits", "group_size")

    bits: int = Field(4, description="weight bits (2, 3, 4, 8)")
    group_size: int = Field(64, description="columns per group; -1 = per output channel")
    lp_norm: float = Field(0.7, gt=0, le=1, description="p of the l_p reconstruction loss")
    beta: float = Field(10.0, gt=0)
    kappa: float = Field(1.01, ge=1)
    iters: int = Field(20, ge=1)
    early_stop: bool = True
    zero_float: bool = True
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    targets: Regex = Field(r"\.layers\.\d+\.", description="regex on weight names: which linears")
    exclude: list[Regex] = Field(default_factory=list, description="regexes of module names left float")

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be > 0 or -1 (per channel), got {self.group_size}")
        if not self.early_stop and self.iters > 1000:
            raise ValueError("iters > 1000 without early_stop is almost certainly a typo")

        self.base_spec()
        return self

    def base_spec(self):
        from qflow.quant.spec import QuantSpec

        return QuantSpec(bits=self.bits, group_size=self.group_size, scheme="asym_h", zero_float=self.zero_float,
                         scale_dtype=self.scale_dtype)

    def options(self):
        from qflow.quant.algos.hqq_model import HQQOptions

        return HQQOptions(bits=self.bits, group_size=self.group_size, lp_norm=self.lp_norm, beta=self.beta,
                          kappa=self.kappa, iters=self.iters, early_stop=self.early_stop,
                          zero_float=self.zero_float, scale_dtype=self.scale_dtype)


@register("quantize.hqq")
class HQQ(Stage):
    """HQQ: data-free zero-point optimization under an l_p (p<1) loss, one linear at a time.

        quantize:
          uses: quantize.hqq
          with: {bits: 4, group_size: 64}

    Needs no calibration set; streams weights from the float folder; resumable.
    Per layer: ``layers:`` / ``ignore:`` and an optional ``plan`` input (BitAllocation).
    """

    version = 2  # 2: per-layer specs (layers, ignore, plan)
    metrics = ("err_reduction", "quantize_seconds")   # what it logs (qflow lint checks gates against it)
    Config = HQQConfig
    inputs = {"model": ModelRef, "plan": BitAllocation}
    optional_inputs = frozenset({"plan"})
    outputs = {"model": QuantizedCheckpoint}

    def check(self, cfg, inputs_meta):
        from qflow.models.adapters import check_group_size, model_config_from_inputs

        from qflow.quant.layerspec import check_layer_specs

        return (check_group_size(model_config_from_inputs(inputs_meta), cfg.group_size, where="group_size")
                + check_layer_specs(cfg, inputs_meta, targets=cfg.targets, exclude=cfg.exclude))

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.models.memory import estimate_streaming

        return estimate_streaming(inputs_meta, upstream)

    def run(self, ctx, cfg, model, plan=None):
        from qflow.errors import StageError
        from qflow.quant.algos.hqq_model import quantize_model_hqq
        from qflow.quant.layerspec import report_resolution, stage_layer_specs

        specs = stage_layer_specs(cfg, model, plan, stage_id=ctx.stage_id, targets=cfg.targets, exclude=cfg.exclude)
        report_resolution(ctx, specs)
        names = specs.quantized
        if not names:
            raise StageError("every linear is ignored: nothing to quantize", where=f"stages.{ctx.stage_id}.with.ignore",
                             fix="narrow the ignore patterns")
        result = quantize_model_hqq(ctx, model.base_model_dir, cfg.options(), names,
                                    meta={"config": cfg.model_dump(mode="json")}, spec_for=specs.spec_for)
        errs = [(r["err_minmax"], r["err_final"]) for r in result.records if r.get("err_minmax")]
        if errs:
            ctx.log_metric("err_reduction", 1 - sum(f for _, f in errs) / sum(m for m, _ in errs))
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir), method="hqq",
                                             source=model.meta.get("source"))}
