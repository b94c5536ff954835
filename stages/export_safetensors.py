"""``export.safetensors``: the IR as a Hugging Face folder (compressed-tensors, AutoAWQ GEMM or GPTQ)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import ExportedModel, QuantizedCheckpoint
from qflow.registry import Stage, StageConfig, register
from qflow.export.verify import DEFAULT_VERIFY_DATA
from qflow.specs import DataSpec


class ExportSafetensorsConfig(StageConfig):
    layout: Literal["compressed-tensors", "awq-gemm", "gptq"] = "compressed-tensors"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"     # auto: the base model's dtype
    on_unsupported: Literal["error", "float"] = "error"
    on_inexact: Literal["round", "error", "float"] = "round"
    gptq_format: Literal["auto", "gptq", "gptq_v2"] = "auto"
    path: str | None = None                   # also place the folder here (atomically; qflow/export/atomic.py)
    overwrite: bool = False                   # allow a path holding files qflow did not write (they are kept)
    verify_data: DataSpec = DEFAULT_VERIFY_DATA
    verify_windows: int = Field(2, ge=0)      # 0: skip the logits round trip
    reader: Literal["auto", "qflow", "compressed-tensors"] = "auto"


@register("export.safetensors")
class ExportSafetensors(Stage):
    """Write the quantized checkpoint as a loadable Hugging Face folder (docs/METHODS.md §2.3-2.5).

        export:
          uses: export.safetensors
          needs: [quantize]
          with: {layout: compressed-tensors, dtype: float16, path: ./out/llama-awq}

    ``compressed-tensors`` (default) writes ``pack-quantized`` -- what vLLM and
    transformers load; ``awq-gemm`` and ``gptq`` write AutoAWQ GEMM / GPTQ v1
    (``gptq_v2`` when zero points of 0 must be kept). qflow's integer codes are
    written as they are; every layer is reported ``exact`` (the layout decodes to
    the IR's weight bit for bit), ``rounded`` (HQQ's fractional zeros rounded,
    scales not representable in the layout's dtype, GPTQ v1 zeros of 0 clamped:
    the SQNR vs the IR is reported) or ``float`` (``on_unsupported: float``: nf4/fp4
    or shapes the layout lacks, written dequantized). config.json carries
    ``quantization_config`` and a ``qflow`` section (version, recipe key, per-layer
    specs); the safetensors metadata holds the same.

    ``path:`` also places a copy of the folder there, with a ``.qflow-export.json``
    marker listing the files qflow wrote. The path must be absent, an empty
    folder or a previous qflow export; anything else is refused before the
    first stage runs unless ``overwrite: true``, and even then qflow replaces
    only the files it writes and its previous marker lists (qflow/export/atomic.py).

    Round trip: the folder is reloaded (by the compressed-tensors library when it
    is installed and the layout is compressed-tensors, else by qflow's own
    reader) and its logits compared with qflow's quantized model on
    ``verify_windows`` windows: ``roundtrip_kl``, ``roundtrip_top1_agree``,
    ``roundtrip_max_abs_diff`` (0 when every layer maps exactly and dtype is the
    model's).
    """

    version = 1
    # layers per fidelity, folder size, worst rounded layer's SQNR; with verify_windows the logits round trip
    metrics = ("n_exact_layers", "n_rounded_layers", "n_float_layers", "size_bytes", "min_layer_sqnr_db",
               "roundtrip_kl", "roundtrip_top1_agree", "roundtrip_max_abs_diff")
    Config = ExportSafetensorsConfig
    inputs = {"model": QuantizedCheckpoint}
    outputs = {"export": ExportedModel}

    def on_hit(self, cfg, outputs, *, key, stage_id):
        """A cached export still owes the user its copy at ``path``: placed again when a killed run left
        it half-placed or the user removed or changed it (qflow/export/atomic.py::ensure_placed)."""
        from qflow.artifacts import ARTIFACT_FILE
        from qflow.export.atomic import placed_on_hit

        return placed_on_hit(outputs["export"].path, cfg, stage_key=key, stage_id=stage_id, fmt="safetensors",
                             skip=(ARTIFACT_FILE,))

    def check(self, cfg, inputs_meta):
        from qflow.export.mixed import checkpoint_from_inputs, safetensors_problems

        ckpt = checkpoint_from_inputs(inputs_meta)   # per-layer specs: refused before anything is written
        problems = safetensors_problems(ckpt, cfg.layout, cfg.on_unsupported) if ckpt is not None else []
        if not cfg.path:
            return problems
        from qflow.export.atomic import target_problem

        problem = target_problem(cfg.path, is_dir=True, overwrite=cfg.overwrite)
        return problems + ([f"with.path: {problem}"] if problem else [])

    @classmethod
    def fingerprint_sources(cls, cfg, cache_root):
        from qflow.export.verify import verify_fingerprint_sources

        return verify_fingerprint_sources(cfg.verify_data, cfg.verify_windows, cache_root)

    def run(self, ctx, cfg, model):
        import json
        import math

        from qflow.errors import StageError
        from qflow.export.safetensors_ct import ExportError, export_hf_folder
        from qflow.quant.ir import Checkpoint

        ckpt = Checkpoint(model.ir_dir)
        from qflow.export.mixed import safetensors_problems

        problems = safetensors_problems(ckpt, cfg.layout, cfg.on_unsupported)
        if problems:
            raise StageError("; ".join(problems), where=f"stages.{ctx.stage_id}.with.layout",
                             fix="use the layout named, or change those layers' specs")
        out = ctx.output("export")
        with ctx.progress(len(ckpt.layers), f"export {cfg.layout}") as bar:
            try:
                report = export_hf_folder(ckpt, out, layout=cfg.layout, dtype=cfg.dtype,
                                          on_unsupported=cfg.on_unsupported, on_inexact=cfg.on_inexact,
                                          gptq_format=cfg.gptq_format,
                                          qflow_meta={"recipe_key": ctx.key, "stage": ctx.stage_id},
                                          progress=bar.update)
            except ExportError as err:
                raise StageError(str(err), where=f"stages.{ctx.stage_id}.with") from err
        ctx.log.info("%s export: %d layers exact, %d rounded, %d float (dtype %s)", cfg.layout, report["n_exact"],
                     report["n_rounded"], report["n_float"], report["dtype"])
        for note in report["notes"][:20]:
            ctx.log.warning("%s", note)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        metrics = {"n_exact_layers": report["n_exact"], "n_rounded_layers": report["n_rounded"],
                   "n_float_layers": report["n_float"], "size_bytes": size}
        if math.isfinite(report["min_sqnr_db"]):
            metrics["min_layer_sqnr_db"] = report["min_sqnr_db"]
        ctx.log_metrics(metrics)

        reader = "skipped"
        if cfg.verify_windows:
            reader = self._roundtrip(ctx, cfg, ckpt, out)
        report_file = ctx.scratch / "export_report.json"
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps({k: v for k, v in report.items()}, indent=1, default=str))
        ctx.log_artifact(report_file)
        placed = None
        if cfg.path:
            from qflow.export.atomic import place

            placed = str(place(out, cfg.path, overwrite=cfg.overwrite, where=f"stages.{ctx.stage_id}.with.path",
                               record={"format": "safetensors", "stage": ctx.stage_id, "stage_key": ctx.key}))
            ctx.log.info("export placed at %s", placed)
        ctx.info["tags"] = {"export_layout": cfg.layout, "export_reader": reader.split(" (")[0]}
        return {"export": ExportedModel(out, format="safetensors", layout=cfg.layout, dtype=report["dtype"],
                                        recipe_key=ctx.key, reader=reader, placed=placed,
                                        mapping={"exact": report["n_exact"], "rounded": report["n_rounded"],
                                                 "float": report["n_float"]})}

    def _roundtrip(self, ctx, cfg, ckpt, out) -> str:
        from qflow.export import readers
        from qflow.export.verify import compare_logits, verify_setup

        ref, tok, ids = verify_setup(ckpt, cfg.verify_data, cfg.verify_windows, ctx.memo_dir)
        use_ct = cfg.reader == "compressed-tensors" or (
            cfg.reader == "auto" and cfg.layout == "compressed-tensors" and readers.compressed_tensors_available())
        if use_ct:
            if not readers.compressed_tensors_available():
                from qflow.errors import StageError

                raise StageError("reader: compressed-tensors needs the compressed-tensors package",
                                 where=f"stages.{ctx.stage_id}.with.reader",
                                 fix="pip install compressed-tensors, or use reader: qflow")
            exported, _, how = readers.load_with_compressed_tensors(out)
        else:
            exported, _ = readers.load_exported_model(out)
            how = "qflow reader"
        ctx.log.info("round trip: reloaded with %s", how)
        with ctx.progress(ids.shape[0], "round trip") as bar:
            metrics = compare_logits(ref, exported, ids, progress=bar.update)
        ctx.log_metrics(metrics)
        ctx.log.info("round trip on %d windows of %d tokens: KL %.3g, top-1 %.4f, max |dlogit| %.3g",
                     ids.shape[0], ids.shape[1], metrics["roundtrip_kl"], metrics["roundtrip_top1_agree"],
                     metrics["roundtrip_max_abs_diff"])
        return how
