"""``quantize.rtn``: round-to-nearest weight-only quantization (the calibration-free baseline)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import ModelRef, QuantizedCheckpoint
from qflow.recipe.validate import reject_renamed_keys
from qflow.registry import Stage, StageConfig, register
from qflow.specs import Regex

_RENAMED = {"symmetric": ("scheme", "write scheme: sym_f for symmetric: true, scheme: asym_z (the default) "
                                    "for symmetric: false")}


class RTNConfig(StageConfig):
    """RTN knobs; ``scheme`` alone says how an integer grid is placed (docs/METHODS.md §1).

        quantize:
          uses: quantize.rtn
          with: {bits: 4, group_size: 64, scheme: asym_z}

    ``asym_z``: asymmetric, integer zero point (GPTQ's); ``asym_a``: AWQ's RTN
    baseline; ``sym_f``/``sym_r``: symmetric, full or restricted range. ``format:
    nf4``/``fp4`` are lookup formats without a scheme.
    """

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
    embeddings and the head stay float.
    """

    version = 2  # 2: `symmetric` folded into `scheme`
    Config = RTNConfig
    inputs = {"model": ModelRef}
    outputs = {"model": QuantizedCheckpoint}

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.models.memory import estimate_streaming

        return estimate_streaming(inputs_meta, upstream)

    def run(self, ctx, cfg, model):
        from qflow.errors import StageError
        from qflow.quant import dispatch
        from qflow.quant.ir import CheckpointWriter
        from qflow.quant.weights import block_index, iter_linear_weights, linear_names

        spec = cfg.spec()
        names = linear_names(model.base_model_dir, cfg.targets, cfg.exclude)
        if not names:
            raise StageError(f"no linear weights match targets {cfg.targets!r} in {model.base_model_dir}",
                             where=f"stages.{ctx.stage_id}.with.targets", fix="adjust the targets regex")
        from safetensors import safe_open  # shapes first: reject before any work

        from qflow.quant.weights import weight_files
        files = weight_files(model.base_model_dir)
        for name in names:
            with safe_open(str(files[name + ".weight"]), framework="pt") as h:
                out, cols = h.get_slice(name + ".weight").get_shape()
            problem = spec.check_shape(out, cols)
            if problem:
                raise StageError(f"{name}: {problem}", where=f"stages.{ctx.stage_id}.with.group_size",
                                 fix="choose a group size that divides the layer width")
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
                scale, zero = dispatch.compute_params(w, spec)
                codes = dispatch.quantize(w, scale, zero, spec)
                writer.add_quantized(name, spec, codes, scale, zero)
                bar.update()
        ckpt = writer.close()
        ctx.log_metric("bpw_quantized", ckpt.bpw_quantized())
        ctx.log_metric("n_layers", len(ckpt.layers))
        return {"model": QuantizedCheckpoint(ctx.output("model"), base_model=str(model.base_model_dir), method="rtn",
                                             source=model.meta.get("source"))}
