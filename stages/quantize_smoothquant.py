"""``quantize.smoothquant``: W8A8 with outlier smoothing (mit-han-lab/smoothquant, docs/METHODS.md §6)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import BitAllocation, CalibSet, ModelRef, QuantizedCheckpoint
from qflow.quant.layerspec import PerLayerConfig
from qflow.registry import Stage, register


class SmoothQuantConfig(PerLayerConfig):
    """SmoothQuant knobs.

        quantize:
          uses: quantize.smoothquant
          needs: [calibrate]
          with: {alpha: 0.5}

    Repo README alphas: Llama-2-7B/13B 0.85, Llama-3 0.85, Mistral 0.8; ``smooth_lm`` default 0.5.
    Weights int8 SYM-R per output channel; activations int8 SYM-R per token, dynamic
    (fake-quantized by QLinear at evaluation). ``smooth: false`` gives plain W8A8.
    Per layer only ``ignore:`` (left float; smoothed weights kept as float deltas):
    W8A8 is one integer GEMM format, so per-layer bits or groups are refused
    (``layers:`` entries, or plan entries other than null).
    """

    layer_fields = ()

    alpha: float = Field(0.5, ge=0, le=1, description="migration strength")
    weight_bits: int = Field(8, description="weight bits (8; 4 for experiments)")
    act_bits: Literal[4, 8] = 8
    weight_granularity: Literal["channel", "tensor"] = "channel"
    act_granularity: Literal["token", "tensor"] = "token"
    smooth: bool = Field(True, description="false: quantize W8A8 without smoothing (baseline)")
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel of the float model while quantizing (sdpa: ~3x faster on CPU)")
    batch_size: int = Field(8, ge=1, description="sequences per forward when statistics must be recomputed")

    @model_validator(mode="after")
    def _cross_checks(self):
        if not self.smooth and "alpha" in self.model_fields_set:
            raise ValueError("alpha has no effect with smooth: false")

        self.base_spec()
        return self

    def base_spec(self):
        from qflow.quant.spec import QuantSpec

        return QuantSpec(bits=self.weight_bits, group_size=-1 if self.weight_granularity == "channel" else 0,
                         scheme="sym_r", act_bits=self.act_bits, act_granularity=self.act_granularity,
                         scale_dtype=self.scale_dtype)

    def options(self):
        from qflow.quant.algos.smoothquant_model import SmoothQuantOptions

        return SmoothQuantOptions(alpha=self.alpha, weight_bits=self.weight_bits, act_bits=self.act_bits,
                                  weight_granularity=self.weight_granularity, act_granularity=self.act_granularity,
                                  smooth=self.smooth, scale_dtype=self.scale_dtype)


@register("quantize.smoothquant")
class SmoothQuant(Stage):
    """SmoothQuant: fold per-channel scales into the norms, then W8A8 on every decoder linear.

        quantize:
          uses: quantize.smoothquant
          needs: [calibrate]
          with: {alpha: 0.5}

    Uses the calibration set's ``max_abs`` statistics (recomputed from ``ids.pt`` when absent).
    ``ignore:`` (or null entries of an optional ``plan`` input) leaves linears float.
    """

    version = 3  # 2: the checkpoint records its fold factors (ir.json "folds"); 3: ignore / plan input
    metrics = ("quantize_seconds",)   # what it logs (qflow lint checks gates against it)
    Config = SmoothQuantConfig
    inputs = {"model": ModelRef, "calib": CalibSet, "plan": BitAllocation}
    optional_inputs = frozenset({"plan"})
    outputs = {"model": QuantizedCheckpoint}

    def check(self, cfg, inputs_meta):
        from qflow.models.adapters import check_group_size, model_config_from_inputs

        from qflow.quant.layerspec import check_layer_specs

        return check_group_size(model_config_from_inputs(inputs_meta), -1) + check_layer_specs(cfg, inputs_meta)

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.models.memory import estimate_calibrated

        return estimate_calibrated(cfg, inputs_meta, upstream)

    def run(self, ctx, cfg, model, calib, plan=None):
        from qflow.quant.algos.smoothquant_model import collect_act_max, quantize_model_smoothquant
        from qflow.quant.algos.calibrated import calibration_ids, checkpoint_meta, open_float_model
        from qflow.quant.layerspec import report_resolution, stage_layer_specs

        specs = stage_layer_specs(cfg, model, plan, stage_id=ctx.stage_id)   # before any work
        report_resolution(ctx, specs)
        net, adapter = open_float_model(cfg, model)
        names = [f"{adapter.block_name(i)}.{site.linears[0]}" for i, b in enumerate(adapter.blocks())
                 for site in adapter.smooth_sites(b)]
        if not names:   # e.g. OLMo 2: no norm precedes any linear (docs/METHODS.md §4.1)
            ctx.log.warning("%s has no smoothing site (no norm precedes its linears): W8A8 without smoothing",
                            net.config.model_type)
        act_max = {}
        stats_path = calib.path / "stats.safetensors"
        if stats_path.is_file():
            from safetensors import safe_open

            with safe_open(str(stats_path), framework="pt") as f:
                keys = set(f.keys())
                act_max = {n: f.get_tensor(f"{n}.max_abs") for n in names if f"{n}.max_abs" in keys}
        if len(act_max) < len(names):
            ctx.log.info("calibration statistics incomplete; recomputing max|x| from ids.pt")
            ids = calibration_ids(ctx, calib, uses="quantize.smoothquant")
            net, adapter = open_float_model(cfg, model, lazy=False)  # a full forward needs every block
            act_max = collect_act_max(net, adapter, ids, batch_size=cfg.batch_size, names=names)
        meta = checkpoint_meta(cfg, calib)
        quantize_model_smoothquant(ctx, net, adapter, act_max, cfg.options(), base_model=str(model.base_model_dir),
                                   meta=meta, floats=specs.floats)
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir),
                                             method="smoothquant", source=model.meta.get("source"))}
