"""``model.load``: resolve a model source to a local float Hugging Face folder."""

from __future__ import annotations

from typing import Literal

from qflow.artifacts import ModelRef
from qflow.registry import Stage, StageConfig, register


@register("model.load")
class ModelLoad(Stage):
    """Resolve the recipe's model (added implicitly from the recipe's ``model:`` section).

        model: {source: "zoo:smollm2-135m"}          # or hf:org/name@rev, gguf:PATH, ./folder

    GGUF sources are dequantized to float once; the folder is reused by every run.
    Weights holding NaN or Inf are refused here, naming the tensors, before any
    other stage runs (``qflow/models/finite.py``).
    """

    version = 1
    metrics = ()   # what it logs (qflow lint checks gates against it)
    recipe_section = "model"

    class Config(StageConfig):
        source: str
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    inputs = {}
    outputs = {"model": ModelRef}

    @classmethod
    def fingerprint_sources(cls, cfg, cache_root):
        from qflow.models.sources import fingerprint_model_source

        return {"model": fingerprint_model_source(cfg.source, cache_root)}

    def run(self, ctx, cfg):
        from qflow.models.sources import resolve_model

        from qflow.models.finite import check_finite_weights

        resolved = resolve_model(cfg.source, ctx.memo_dir)
        check_finite_weights(resolved.path, where=f"stages.{ctx.stage_id} (model: {{source: {cfg.source}}})")
        ctx.log.info("model %s -> %s", cfg.source, resolved.path)
        return {"model": ModelRef(resolved.path, external=True, source=cfg.source,
                                  fingerprint=resolved.fingerprint, dtype=cfg.dtype)}
