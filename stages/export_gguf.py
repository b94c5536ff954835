"""``export.gguf``: the IR as a llama.cpp GGUF file."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import ExportedModel, QuantizedCheckpoint
from qflow.registry import Stage, StageConfig, register
from qflow.export.verify import DEFAULT_VERIFY_DATA
from qflow.specs import DataSpec


class ExportGGUFConfig(StageConfig):
    mode: Literal["exact", "compact"] = "exact"
    requant_type: Literal["auto", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32"] = "auto"
    float_type: Literal["F32", "F16"] = "F32"       # embeddings / output head
    tokenizer_pre: str | None = None                 # llama.cpp pre-tokenizer name (HF tokenizers only)
    filename: str = "model.gguf"
    path: str | None = None                          # also place the file here (atomically; qflow/export/atomic.py)
    overwrite: bool = False                          # allow replacing a file at path that qflow did not write
    verify_data: DataSpec = DEFAULT_VERIFY_DATA
    verify_windows: int = Field(2, ge=0)             # 0: skip the logits round trip
    llama_cpp: bool = True                           # also compare llama.cpp's logits when llama_cpp is installed


@register("export.gguf")
class ExportGGUF(Stage):
    """Write the quantized checkpoint as a llama.cpp GGUF (docs/METHODS.md §2.7).

        export:
          uses: export.gguf
          needs: [quantize]
          with: {mode: exact, path: ./out/model-q4.gguf}

    Quantized linears are written from qflow's codes in the smallest block type
    that holds them exactly -- Q4_0 (symmetric <= 4 bit), Q4_1 (asymmetric when
    fp16 ``m = -z*s`` is exact), Q5_0 (asymmetric 4-bit, 5-bit), Q5_1, Q8_0
    (symmetric 8-bit, 6-bit) -- with scales constant per 32-block (any group
    that is a multiple of 32, per channel, per tensor). ``mode: compact`` prefers
    Q4_1 with ``m`` rounded to fp16 over an exact Q5_0. HQQ's fractional zeros
    go to Q4_1/Q5_1 with ``m`` rounded ("approx"); nf4/fp4, groups below 32 and
    unaligned act-order are re-quantized from float (``requant_type``) -- each
    such tensor is logged with its SQNR vs the IR (metric ``min_sqnr_db``).
    Metadata: llama.cpp's llama architecture (Llama, Mixtral) or qwen2moe / qwen3moe
    (Qwen2-MoE, Qwen3-MoE: experts stacked as ``ffn_*_exps``, shared expert ``*_shexp``,
    expert widths; refused where llama.cpp's fixed routing differs), tokenizer (copied from the base GGUF for
    zoo:/gguf: models, else built from the HF tokenizer), ``qflow.*`` keys
    (version, recipe key, per-layer specs).

    ``path:`` also places a copy of the file there, with a sidecar
    ``<file>.qflow-export.json`` recording its sha256. An existing file there is
    replaced only when that record matches it (a previous qflow export) or with
    ``overwrite: true``; otherwise the run is refused before the first stage.

    Round trip: the file is read back with ``gguf.GGUFReader`` and every tensor
    dequantized (exactly-mapped and F32 tensors must be bit-identical, else the
    stage fails; ``roundtrip_max_abs_diff`` is the largest weight difference vs
    the IR), then converted to a transformers model with qflow's own GGUF loader
    and its logits compared with qflow's quantized model (``roundtrip_kl``,
    ``roundtrip_top1_agree``, ``roundtrip_logits_max_abs_diff``); llama.cpp's
    logits too (``llama_cpp_*``) when ``llama_cpp`` is importable.
    """

    version = 1
    # tensors per fidelity, file size, read-back max |IR - file|, worst approximate tensor's SQNR; with
    # verify_windows the logits round trip (KL, top-1, max |dlogit|), with llama_cpp the same through llama.cpp
    metrics = ("n_exact_tensors", "n_approx_tensors", "n_requantized_tensors", "n_float_tensors", "size_bytes",
               "roundtrip_max_abs_diff", "min_sqnr_db", "roundtrip_kl", "roundtrip_top1_agree",
               "roundtrip_logits_max_abs_diff", "llama_cpp_kl", "llama_cpp_top1_agree", "llama_cpp_max_abs_diff")
    Config = ExportGGUFConfig
    inputs = {"model": QuantizedCheckpoint}
    outputs = {"export": ExportedModel}

    def on_hit(self, cfg, outputs, *, key, stage_id):
        """A cached export still owes the user its copy at ``path``: placed again when a killed run left
        it half-placed or the user removed or changed it (qflow/export/atomic.py::ensure_placed)."""
        from qflow.export.atomic import placed_on_hit

        return placed_on_hit(outputs["export"].path / cfg.filename, cfg, stage_key=key, stage_id=stage_id, fmt="gguf")

    def check(self, cfg, inputs_meta):
        from qflow.export.mixed import checkpoint_from_inputs, family_problems

        ckpt = checkpoint_from_inputs(inputs_meta)
        from qflow.export.gguf_writer import GGUF_FAMILIES, base_config_problems

        problems = family_problems(ckpt, "export.gguf", GGUF_FAMILIES) if ckpt is not None else []
        if ckpt is not None and not problems:   # the family's variants llama.cpp cannot run (before any work)
            problems = base_config_problems(ckpt)
        if not cfg.path:
            return problems
        from qflow.export.atomic import target_problem

        problem = target_problem(cfg.path, is_dir=False, overwrite=cfg.overwrite)
        return problems + ([f"with.path: {problem}"] if problem else [])

    @classmethod
    def fingerprint_sources(cls, cfg, cache_root):
        from qflow.export.verify import verify_fingerprint_sources

        return verify_fingerprint_sources(cfg.verify_data, cfg.verify_windows, cache_root)

    def run(self, ctx, cfg, model):
        import json
        import math

        from qflow.errors import StageError
        from qflow.export.gguf_writer import GGUFExportError, export_gguf, read_back
        from qflow.quant.ir import Checkpoint

        if "/" in cfg.filename or not cfg.filename.endswith(".gguf"):
            raise StageError(f"filename {cfg.filename!r} must be a plain name ending in .gguf",
                             where=f"stages.{ctx.stage_id}.with.filename", fix="e.g. filename: model-q4.gguf")
        ckpt = Checkpoint(model.ir_dir)
        out = ctx.output("export")
        target = out / cfg.filename
        tmp = out / (cfg.filename + ".partial")
        with ctx.progress(len(ckpt.layers), "export gguf") as bar:
            try:
                report = export_gguf(ckpt, tmp, mode=cfg.mode, requant_type=cfg.requant_type,
                                     float_type=cfg.float_type, tokenizer_pre=cfg.tokenizer_pre,
                                     qflow_meta={"recipe_key": ctx.key}, progress=bar.update)
            except GGUFExportError as err:
                tmp.unlink(missing_ok=True)
                raise StageError(str(err), where=f"stages.{ctx.stage_id}") from err
        tmp.replace(target)
        report["path"] = str(target)
        ctx.log.info("GGUF %s: %s; %d tensors exact, %d approx, %d re-quantized, %d float; tokenizer %s",
                     cfg.filename, report["types"], report["n_exact_tensors"], report["n_approx_tensors"],
                     report["n_requantized_tensors"], report["n_float_tensors"], report["tokenizer"])
        for name, t in report["tensors"].items():
            if t["status"] in ("approx", "requantized"):
                ctx.log.warning("%s -> %s %s (%s): SQNR vs IR %.1f dB", name, t["type"], t["status"], t["note"],
                                t["sqnr_db"])
        back = read_back(target, ckpt, report)
        metrics = {"n_exact_tensors": report["n_exact_tensors"], "n_approx_tensors": report["n_approx_tensors"],
                   "n_requantized_tensors": report["n_requantized_tensors"],
                   "n_float_tensors": report["n_float_tensors"], "size_bytes": report["bytes"],
                   "roundtrip_max_abs_diff": back["roundtrip_max_abs_diff"]}
        if math.isfinite(report["min_sqnr_db"]):
            metrics["min_sqnr_db"] = report["min_sqnr_db"]
        ctx.log_metrics(metrics)
        if cfg.verify_windows:
            self._roundtrip(ctx, cfg, ckpt, target)
        report_file = ctx.scratch / "export_report.json"
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps(report, indent=1, default=str))
        ctx.log_artifact(report_file)
        placed = None
        if cfg.path:
            from qflow.export.atomic import place

            placed = str(place(target, cfg.path, overwrite=cfg.overwrite, where=f"stages.{ctx.stage_id}.with.path",
                               record={"format": "gguf", "stage": ctx.stage_id, "stage_key": ctx.key}))
            ctx.log.info("export placed at %s", placed)
        return {"export": ExportedModel(out, format="gguf", filename=cfg.filename, recipe_key=ctx.key,
                                        types=report["types"], placed=placed)}

    def _roundtrip(self, ctx, cfg, ckpt, target) -> None:
        import shutil

        from qflow.export.verify import compare_logits, verify_setup
        from qflow.models.loading import load_model
        from qflow.models.gguf_import import convert_gguf

        ref, tok, ids = verify_setup(ckpt, cfg.verify_data, cfg.verify_windows, ctx.memo_dir)
        folder = ctx.scratch / "gguf-as-hf"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            convert_gguf(target, folder, source=f"gguf:{target}")
            loaded, gguf_tok = load_model(folder, dtype="float32")
            text = "The quick brown fox jumps over the lazy dog.\n\nQuantization: 4-bit, g128."
            ids_gguf = gguf_tok(text, add_special_tokens=False)["input_ids"]
            if ids_gguf != tok(text, add_special_tokens=False)["input_ids"]:
                ctx.log.warning("the GGUF's tokenizer (as transformers reads it) splits text differently from the "
                                "base model's")
            with ctx.progress(ids.shape[0], "round trip") as bar:
                metrics = compare_logits(ref, loaded, ids, progress=bar.update)
            # roundtrip_max_abs_diff is the tensor read-back's; the logits get their own name here
            metrics["roundtrip_logits_max_abs_diff"] = metrics.pop("roundtrip_max_abs_diff")
            ctx.log_metrics(metrics)
            ctx.log.info("round trip via qflow's GGUF loader: KL %.3g, top-1 %.4f, max |dlogit| %.3g",
                         metrics["roundtrip_kl"], metrics["roundtrip_top1_agree"],
                         metrics["roundtrip_logits_max_abs_diff"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if cfg.llama_cpp:
            self._llama_cpp_roundtrip(ctx, ref, ids, target)

    def _llama_cpp_roundtrip(self, ctx, ref, ids, target) -> None:
        from qflow.export.gguf_writer import llama_cpp_logits
        from qflow.export.verify import ReplayedLogits, compare_logits

        logits = llama_cpp_logits(target, ids)
        if logits is None:
            ctx.log.info("llama_cpp is not installed: skipping the llama.cpp logits check "
                         "(pip install llama-cpp-python to enable it)")
            return
        m = compare_logits(ref, ReplayedLogits(logits), ids)
        ctx.log_metrics({"llama_cpp_kl": m["roundtrip_kl"], "llama_cpp_top1_agree": m["roundtrip_top1_agree"],
                         "llama_cpp_max_abs_diff": m["roundtrip_max_abs_diff"]})
        ctx.log.info("llama.cpp: KL %.3g, top-1 %.4f", m["roundtrip_kl"], m["roundtrip_top1_agree"])
