"""``quantize.rtn``: round-to-nearest weight-only quantization (the calibration-free baseline)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import BitAllocation, ModelRef, QuantizedCheckpoint
from qflow.quant.layerspec import PerLayerConfig
from qflow.recipe.validate import reject_renamed_keys
from qflow.registry import Stage, register
from qflow.specs import Regex

_RENAMED = {"symmetric": ("scheme", "write scheme: sym_f for symmetric: true, scheme: asym_z (the default) "
                                    "for symmetric: false")}


class RTNConfig(PerLayerConfig):
    """RTN knobs; ``scheme`` alone says how an integer grid is placed (docs/METHODS.md §1).

        quantize:
          uses: quantize.rtn
          with: {bits: 4, group_size: 64, scheme: asym_z,
                 layers: {"re:.*down_proj": {bits: 8}}, ignore: [model.layers.0.mlp.gate_proj]}

    ``asym_z``: asymmetric, integer zero point (GPTQ's); ``asym_a``: AWQ's RTN
    baseline; ``sym_f``/``sym_r``: symmetric, full or restricted range. ``format:
    nf4``/``fp4`` are lookup formats without a scheme. ``layers:`` may change bits,
    group_size, scheme, format, double_quant and scale_dtype per layer
    (qflow/quant/layerspec.py); ``ignore:`` leaves layers float.
    """

    layer_fields = ("bits", "group_size", "scheme", "format", "double_quant", "scale_dtype")

    bits: int = 4
    group_size: int = 128
    scheme: Literal["asym_z", "asym_a", "sym_r", "sym_f"] = Field(
        "asym_z", description="integer grid: asym_z, asym_a, sym_f or sym_r (format: int only)")
    format: Literal["int", "nf4", "fp4"] = "int"
    double_quant: bool = False
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    pad_last_group: bool = False
    targets: Regex = r"\.layers\.\d+\."
    exclude: list[Regex] = []

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        return reject_renamed_keys(data, _RENAMED, cls.__name__)

    @model_validator(mode="after")
    def _spec_ok(self):
        if self.format != "int" and "scheme" in self.model_fields_set:
            raise ValueError(f"scheme applies to format: int only; format {self.format} has none (remove scheme)")
        self.spec()  # raises ValueError with the reason
        return self

    def base_spec(self):
        return self.spec()

    def spec(self):
        from qflow.quant.spec import QuantSpec

        return QuantSpec(format=self.format, bits=self.bits, group_size=self.group_size,
                         scheme=self.scheme if self.format == "int" else None, double_quant=self.double_quant,
                         scale_dtype=self.scale_dtype, pad_last_group=self.pad_last_group)


@register("quantize.rtn")
class RTN(Stage):
    """Round-to-nearest, group-wise, weight-only (docs/METHODS.md §3).

        quantize:
          uses: quantize.rtn
          with: {bits: 4, group_size: 64, scheme: asym_z}   # ASYM-Z g64

    ``scheme: asym_a`` gives AWQ's RTN baseline; ``format: nf4`` gives QLoRA's NF4.
    Quantizes every 2-D weight inside the decoder blocks (``targets`` regex);
    embeddings and the head stay float. Per layer: ``layers:`` / ``ignore:`` and an
    optional ``plan`` input (a BitAllocation: ``inputs: {plan: allocate.plan}``);
    stage spec < plan < ``layers:`` < ``ignore:``.
    """

    version = 3  # 2: `symmetric` folded into `scheme`; 3: per-layer specs (layers, ignore, plan)
    metrics = ("bpw_quantized", "n_layers")   # what it logs (qflow lint checks gates against it)
    Config = RTNConfig
    inputs = {"model": ModelRef, "plan": BitAllocation}
    optional_inputs = frozenset({"plan"})
    outputs = {"model": QuantizedCheckpoint}

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.models.memory import estimate_streaming

        return estimate_streaming(inputs_meta, upstream)

    def check(self, cfg, inputs_meta):
        from qflow.quant.layerspec import check_layer_specs

        return check_layer_specs(cfg, inputs_meta, targets=cfg.targets, exclude=cfg.exclude)

    def run(self, ctx, cfg, model, plan=None):
        from qflow.errors import StageError
        from qflow.quant import dispatch
        from qflow.quant.ir import CheckpointWriter
        from qflow.quant.layerspec import report_resolution, stage_layer_specs
        from qflow.quant.weights import block_index, iter_linear_weights

        # every layer's spec, checked against its shape before any work
        specs = stage_layer_specs(cfg, model, plan, stage_id=ctx.stage_id, targets=cfg.targets,
                                  exclude=cfg.exclude)
        report_resolution(ctx, specs)
        names = specs.quantized
        if not names:
            raise StageError("every linear is ignored: nothing to quantize", where=f"stages.{ctx.stage_id}.with.ignore",
                             fix="narrow the ignore patterns")
        writer = CheckpointWriter(ctx.output("model"), base_model=str(model.base_model_dir), method="rtn",
                                  meta={"config": cfg.model_dump(mode="json")})
        current = None
        with ctx.progress(len(names), "rtn") as bar:
            for name, w in iter_linear_weights(model.base_model_dir, names):
                if not bool(w.isfinite().all()):
                    raise StageError(f"{name} has non-finite weights", where=str(model.base_model_dir),
                                     fix="check the source model")
                block = block_index(name)
                if current is not None and block != current:
                    writer.flush()
                current = block
                spec = specs.spec_for(name)
                scale, zero = dispatch.compute_params(w, spec)
                codes = dispatch.quantize(w, scale, zero, spec)
                writer.add_quantized(name, spec, codes, scale, zero)
                bar.update()
        ckpt = writer.close()
        ctx.log_metric("bpw_quantized", ckpt.bpw_quantized())
        ctx.log_metric("n_layers", len(ckpt.layers))
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir), method="rtn",
                                             source=model.meta.get("source"))}
