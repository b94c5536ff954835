"""``export.onnx``: an onnxruntime decoder (KV cache) carrying qflow's quantized weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import ExportedModel, ModelRef
from qflow.registry import Stage, StageConfig, register
from qflow.specs import DataSpec

_COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


class ExportOnnxConfig(StageConfig):
    """``export.onnx`` knobs.

        export:
          uses: export.onnx
          needs: [quantize]
          with: {accuracy_level: 4, repeats: 3}
    """

    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits accuracy_level of model.onnx (0: fp32 activations, exact int weights; "
                       "4: int8 activations, fastest on CPU). The other of {0, 4} is written as model_acc{N}.onnx")
    fuse_qkv: bool = Field(True, description="one packed q|k|v projection feeding GroupQueryAttention")
    fuse_gate_up: bool = Field(True, description="one packed gate|up projection")
    max_positions: int | None = Field(None, ge=16, description="rotary cache length (default: the model's "
                                                                "max_position_embeddings)")
    # round trip against qflow's own quantized model
    data: DataSpec = DataSpec(source="zoo:lee-news", seq_len=512)
    n_windows: int = Field(2, ge=1, description="evaluation windows for the logits round trip")
    kv_tokens: int = Field(8, ge=0, description="tokens decoded one by one in the KV-cache check")
    # timing: quantized vs float32 export of the same graph
    benchmark: bool = True
    prompt_len: int = Field(512, ge=1)
    gen_tokens: int = Field(64, ge=1)
    warmup: int = Field(1, ge=0, description="untimed runs per model first (prefill + 8 decode steps each)")
    repeats: int = Field(3, ge=1, description="timed repeats; decode medians use every timed step")
    threads_multi: int = Field(0, ge=0, description="intra-op threads of the multi-threaded run (0: all cores)")
    multi_threaded: bool = True
    spinning_multi: bool = Field(False, description="let onnxruntime's worker threads spin in the multi-threaded "
                                                    "run (faster on idle cores, slower on a shared machine)")
    keep_float: bool = Field(False, description="keep the float32 export in the output (fp32/)")


def _onnx_families() -> tuple[str, ...]:
    """Base model families export.onnx builds graphs for (Llama decoders, BERT-family encoders)."""
    from qflow.models.encoders import ENCODER_MODEL_TYPES

    return ("llama",) + tuple(ENCODER_MODEL_TYPES)


@register("export.onnx")
class ExportOnnx(Stage):
    """ONNX decoder for onnxruntime with qflow's own quantized weights (docs/METHODS.md §2.6).

        export:
          uses: export.onnx
          needs: [quantize]
          with: {accuracy_level: 4}

    Writes ``model.onnx`` + ``model.onnx.data`` (one external-data file), a second
    graph at the other accuracy level sharing that data file, the tokenizer and
    config, and ``export.json``. Each quantized linear becomes a
    ``com.microsoft.MatMulNBits`` (codes, scales, zero points converted exactly from
    the IR; block_size = group size, a power of two >= 16); SmoothQuant W8A8 layers
    become qflow's own int8 activation codes and a uint8 x uint8 ``MatMulInteger``
    (exact on every x86 CPU; ``export.json`` ``w8a8_matmul`` says why). Attention is
    ``com.microsoft.GroupQueryAttention`` with an explicit KV cache
    (``past_key_values.N.key/value`` -> ``present.N.key/value``).

    A BERT-family encoder (bert, roberta, xlm-roberta) is written as a plain encoder graph instead
    (qflow/export/onnx_encoder.py: ``input_ids``, ``attention_mask`` -> ``last_hidden_state`` and, with
    an MLM head, ``logits``; no KV cache, no timing pass); its round trip runs padded sentence batches
    of ``data`` (``8 * n_windows`` sentences) and adds ``roundtrip_embed_cos_min``.

    Metrics: ``roundtrip_kl`` / ``roundtrip_top1_agree`` / ``roundtrip_max_abs_diff``
    against qflow's quantized model at accuracy level 0 (and ``*_acc4``),
    ``roundtrip_kv_max_abs_diff``; ``prefill_speedup_vs_fp32`` /
    ``decode_speedup_vs_fp32`` single-threaded at the faster accuracy level (``*_mt``:
    multi-threaded) and absolute milliseconds.
    """

    version = 1
    # sizes, linear kinds, the round trip per accuracy level (_accN), and with benchmark the timings per
    # graph (NAME: fp32, quant, w8a8, accN; _mt multi-threaded) and the faster graph's speedups
    metrics = ("onnx_bytes", "onnx_data_bytes", "n_linear_*",
               "roundtrip_kl", "roundtrip_kl_acc*", "roundtrip_kl_max", "roundtrip_kl_max_acc*",
               "roundtrip_top1_agree", "roundtrip_top1_agree_acc*", "roundtrip_max_abs_diff",
               "roundtrip_max_abs_diff_acc*", "roundtrip_kv_max_abs_diff",
               "prefill_ms_*", "decode_ms_*", "prefill_p90_ms_*", "decode_p90_ms_*",
               "prefill_speedup_vs_fp32*", "decode_speedup_vs_fp32*", "faster_accuracy_level")
    Config = ExportOnnxConfig
    inputs = {"model": ModelRef}
    outputs = {"export": ExportedModel}
    requires_packages = ("onnx", "onnxruntime")

    def check(self, cfg, inputs_meta):
        from qflow.export.mixed import checkpoint_from_inputs, folder_family_problems, onnx_problems

        ckpt = checkpoint_from_inputs(inputs_meta)   # per-layer specs: refused before anything is written
        if ckpt is None:   # a float model already on disk: its family (a mixture of experts has no ONNX graph)
            ref = (inputs_meta or {}).get("model")
            folder = getattr(ref, "base_model_dir", None) if ref is not None and not isinstance(ref, dict) else None
            return folder_family_problems(folder, "export.onnx", _onnx_families()) if folder is not None else []
        return folder_family_problems(ckpt.base_model, "export.onnx", _onnx_families()) + onnx_problems(ckpt)

    @classmethod
    def fingerprint_sources(cls, cfg, cache_root):
        from qflow.data.tokens import text_fingerprint_source

        return {"data": text_fingerprint_source(cfg.data.source, cache_root, cfg.data.field)}

    def run(self, ctx, cfg, model):
        import json
        import shutil

        from qflow.artifacts import QuantizedCheckpoint

        from qflow.errors import StageError
        from qflow.export.mixed import folder_family_problems

        # again here (a recipe's check may have met the input before it existed): nothing is written for a
        # family the graph builder does not know, mixtures of experts included
        problems = folder_family_problems(model.base_model_dir, "export.onnx", _onnx_families())
        if problems:
            raise StageError("; ".join(problems), where=f"stages.{ctx.stage_id}",
                             fix="export this model with the format the message names")
        out = ctx.output("export")
        ckpt = None
        if isinstance(model, QuantizedCheckpoint):
            from qflow.quant.ir import Checkpoint

            ckpt = Checkpoint(model.ir_dir)
            from qflow.errors import StageError
            from qflow.export.mixed import onnx_problems

            problems = onnx_problems(ckpt)
            if problems:
                raise StageError("; ".join(problems), where=f"stages.{ctx.stage_id}",
                                 fix="export these layers with the format named, or change their specs")
        base_dir = model.base_model_dir
        from qflow.models.encoders import is_encoder

        if is_encoder(json.loads((base_dir / "config.json").read_text())):   # bert / roberta: no KV cache
            return _run_encoder(ctx, cfg, model, ckpt, base_dir, out)
        info = _write_graphs(ctx, cfg, ckpt, base_dir, out)
        for name in _COPY_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, out / name)

        metrics: dict[str, float] = {"onnx_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
                                     "onnx_data_bytes": info.data_path.stat().st_size}
        for kind, n in info.linear_kinds.items():
            metrics[f"n_linear_{kind}"] = n
        if info.linear_kinds.get("w8a8"):
            ctx.log.info("W8A8 integer matmul: %s", info.to_json()["w8a8_matmul"]["why"])
        protocol = _roundtrip(ctx, cfg, ckpt, base_dir, info, metrics)
        timing: dict = {}
        if cfg.benchmark and ckpt is None:
            ctx.log.info("float model: no quantized graph to time against the float32 export")
        if cfg.benchmark and ckpt is not None:
            timing = _timing(ctx, cfg, ckpt, base_dir, out, info, metrics)

        ctx.log_metrics(metrics)
        return _finish(out, cfg, model, ckpt, info, metrics, protocol, timing)


def _settings(cfg):
    from qflow.export.onnx_graph import ExportSettings

    return ExportSettings(accuracy_level=cfg.accuracy_level, fuse_qkv=cfg.fuse_qkv, fuse_gate_up=cfg.fuse_gate_up)


def _write_graphs(ctx, cfg, ckpt, base_dir, out):
    """model.onnx (+ the other accuracy level's graph); a float model's graph stands for both levels."""
    from qflow.errors import StageError
    from qflow.export.onnx_graph import OnnxExportError, build_onnx, export_quantized

    settings = _settings(cfg)
    other = 0 if cfg.accuracy_level != 0 else 4
    try:
        ctx.log.info("writing the ONNX graph (%s)", "quantized" if ckpt else "float")
        if ckpt is not None:
            return export_quantized(base_dir, out, ckpt, accuracy_level=cfg.accuracy_level, other_level=other,
                                    settings=settings, max_positions=cfg.max_positions)
        info = build_onnx(base_dir, out, mode="float", settings=settings, max_positions=cfg.max_positions)
        info.variants = {0: info.model_path, 4: info.model_path}
        return info
    except OnnxExportError as err:
        raise StageError(err.what, where=f"stages.{ctx.stage_id}", fix=err.fix) from err


def _roundtrip(ctx, cfg, ckpt, base_dir, info, metrics: dict) -> dict:
    """Logits of each written graph vs qflow's own model, into ``metrics``; returns the protocol."""
    from transformers import AutoTokenizer

    from qflow.data.tokens import token_windows, windows_fingerprint
    from qflow.export.onnx_bench import OnnxDecoder, make_session
    from qflow.export.onnx_check import reference_logits, roundtrip

    from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

    with remote_code_refusal(str(base_dir)):   # only the command line's --trust-remote-code, never a recipe
        tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True, trust_remote_code=remote_code_allowed())
    ids = token_windows(cfg.data, tok, cfg.n_windows, ctx.memo_dir, where=f"stages.{ctx.stage_id}.with")
    has_nbits = bool(info.linear_kinds.get("nbits"))
    levels = sorted(set(info.variants)) if has_nbits else [0]   # accuracy_level only acts on MatMulNBits
    with ctx.progress(len(ids) * (1 + len(levels)), "round trip") as bar:
        ref = reference_logits(ckpt, ids, model_dir=base_dir, progress=bar.update)
        rts: dict[int, dict] = {}
        by_path: dict[str, int] = {}
        for level in levels:
            path = str(info.variants[level])
            if path in by_path:
                rts[level] = rts[by_path[path]]
                continue
            by_path[path] = level
            dec = OnnxDecoder(make_session(path, threads=0, spinning=False))
            rts[level] = roundtrip(dec, ids, ref, kv_tokens=cfg.kv_tokens if level == 0 else 0,
                                   progress=bar.update)
            del dec
    del ref
    for level, rt in rts.items():
        sfx = "" if level == 0 else f"_acc{level}"
        metrics[f"roundtrip_kl{sfx}"] = rt["kl"]
        metrics[f"roundtrip_kl_max{sfx}"] = rt["kl_max"]
        metrics[f"roundtrip_top1_agree{sfx}"] = rt["top1_agree"]
        metrics[f"roundtrip_max_abs_diff{sfx}"] = rt["max_abs_diff"]
        if "kv_max_abs_diff" in rt:
            metrics["roundtrip_kv_max_abs_diff"] = rt["kv_max_abs_diff"]
    return {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "n_windows": int(ids.shape[0]),
            "windows_sha256": windows_fingerprint(ids),
            "reference": "qflow load_quantized_model fp32 (eager attention)" if ckpt else "float model"}


def _timing(ctx, cfg, ckpt, base_dir, out, info, metrics: dict) -> dict:
    """Quantized graphs vs a float32 export of the same graph, timed side by side; speed metrics into ``metrics``."""
    import shutil

    from qflow.export.onnx_check import machine, speed_compare
    from qflow.export.onnx_graph import build_onnx

    fp_dir = (out / "fp32") if cfg.keep_float else (ctx.scratch / "fp32")
    if fp_dir.exists():
        shutil.rmtree(fp_dir)
    ctx.log.info("writing the float32 export for the speed comparison")
    fp_info = build_onnx(base_dir, fp_dir, ckpt=ckpt, mode="float", settings=_settings(cfg),
                         max_positions=cfg.max_positions)
    models = {"fp32": fp_info.model_path}
    if info.linear_kinds.get("nbits"):
        models |= {f"acc{lv}": p for lv, p in sorted(info.variants.items())}
    else:
        models["w8a8" if info.linear_kinds.get("w8a8") else "quant"] = info.model_path
    runs = [("st", 1)] + ([("mt", cfg.threads_multi or None)] if cfg.multi_threaded else [])
    timing: dict = {}
    with ctx.progress(len(runs) * (cfg.warmup + cfg.repeats) * len(models), "timing") as bar:
        for label, threads in runs:
            timing[label] = speed_compare(models, threads=threads, prompt_len=cfg.prompt_len,
                                          gen_tokens=cfg.gen_tokens, warmup=cfg.warmup, repeats=cfg.repeats,
                                          seed=ctx.seed, spinning=True if threads == 1 else cfg.spinning_multi,
                                          progress=bar.update)
    best = min((n for n in models if n != "fp32"), key=lambda n: timing["st"][n]["decode_ms"])
    metrics.update(_speed_metrics(timing, best))
    if not cfg.keep_float:
        shutil.rmtree(fp_dir, ignore_errors=True)
    timing["protocol"] = {"prompt_len": cfg.prompt_len, "gen_tokens": cfg.gen_tokens, "warmup": cfg.warmup,
                          "repeats": cfg.repeats, "faster": best, "threads_multi": cfg.threads_multi or "all",
                          "kv_cache": "shared buffer (IOBinding)", **machine()}
    return timing


def _speed_metrics(timing: dict, best: str) -> dict[str, float]:
    """Per-model latencies and speedups (``_mt``: multi-threaded); the headline speedups are ``best``'s."""
    metrics: dict[str, float] = {}
    for label, res in timing.items():
        sfx = "" if label == "st" else "_mt"
        for name, s in res.items():
            metrics[f"prefill_ms_{name}{sfx}"] = s["prefill_ms"]
            metrics[f"decode_ms_{name}{sfx}"] = s["decode_ms"]
            metrics[f"decode_p90_ms_{name}{sfx}"] = s["decode_p90_ms"]
            metrics[f"prefill_p90_ms_{name}{sfx}"] = s["prefill_p90_ms"]
            if name != "fp32":
                metrics[f"prefill_speedup_vs_fp32_{name}{sfx}"] = s["prefill_speedup"]
                metrics[f"decode_speedup_vs_fp32_{name}{sfx}"] = s["decode_speedup"]
        metrics[f"prefill_speedup_vs_fp32{sfx}"] = res[best]["prefill_speedup"]
        metrics[f"decode_speedup_vs_fp32{sfx}"] = res[best]["decode_speedup"]
    if best.startswith("acc"):
        metrics["faster_accuracy_level"] = int(best[3:])
    return metrics


def _run_encoder(ctx, cfg, model, ckpt, base_dir, out):
    """A BERT-family encoder (qflow/export/onnx_encoder.py): model.onnx at ``accuracy_level`` (+ the other
    level's graph), round trip on padded sentence batches of ``data``; no timing pass."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from qflow.data.sources import load_text
    from qflow.errors import StageError
    from qflow.evaluation import embed
    from qflow.export.onnx_bench import make_session
    from qflow.export.onnx_encoder import build_encoder_onnx, encoder_roundtrip
    from qflow.export.onnx_graph import OnnxExportError, write_accuracy_variant
    from qflow.export.verify import reference_model
    from qflow.models.encoders import max_tokens
    from qflow.models.loading import load_model

    try:
        info = build_encoder_onnx(base_dir, out, ckpt=ckpt, accuracy_level=cfg.accuracy_level)
    except OnnxExportError as err:
        raise StageError(err.what, where=f"stages.{ctx.stage_id}", fix=err.fix) from err
    other = 0 if cfg.accuracy_level != 0 else 4
    info.variants = {cfg.accuracy_level: info.model_path}
    if info.linear_kinds.get("nbits"):
        info.variants[other] = write_accuracy_variant(info.model_path, out / f"model_acc{other}.onnx", other)
    for name in _COPY_FILES + ("vocab.txt", "merges.txt", "vocab.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    from qflow.recipe.safety import remote_code_allowed

    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True, trust_remote_code=remote_code_allowed())
    config = json.loads((base_dir / "config.json").read_text())
    limit = min(cfg.data.seq_len, max_tokens(config) or cfg.data.seq_len)
    texts = embed.sentences(load_text(cfg.data.source, field=cfg.data.field, cache_dir=ctx.memo_dir), 8 * cfg.n_windows)
    batches = embed.sentence_batches(texts, tok, max_tokens=limit, batch_size=8)
    reference = reference_model(ckpt)[0] if ckpt is not None else load_model(base_dir)[0]
    metrics: dict[str, float] = {"onnx_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
                                 "onnx_data_bytes": info.data_path.stat().st_size}
    for kind, n in info.linear_kinds.items():
        metrics[f"n_linear_{kind}"] = n
    with ctx.progress(len(info.variants), "round trip") as bar:
        for level, path in sorted(info.variants.items()):
            sfx = "" if level == 0 else f"_acc{level}"
            rt = encoder_roundtrip(make_session(path, threads=0, spinning=False), reference, batches)
            metrics |= {f"{k}{sfx}": v for k, v in rt.items()}
            bar.update(1)
    if cfg.benchmark:
        ctx.log.info("export.onnx times decoders only: the encoder graph is not timed")
    ctx.log_metrics(metrics)
    protocol = {"source": cfg.data.source, "n_sentences": len(texts), "max_tokens": limit,
                "batches_sha256": embed.batches_fingerprint(batches),
                "reference": "qflow load_quantized_model fp32 (eager attention)" if ckpt else "float model"}
    return _finish(out, cfg, model, ckpt, info, metrics, protocol, {})


def _finish(out, cfg, model, ckpt, info, metrics, protocol, timing):
    """Write ``export.json`` (export info, metrics, round-trip protocol, timing) and return the stage output."""
    import json

    report = {"export": info.to_json(), "metrics": metrics, "roundtrip_protocol": protocol, "timing": timing,
              "source_checkpoint": str(model.path), "method": getattr(ckpt, "method", None)}
    (out / "export.json").write_text(json.dumps(report, indent=1, default=str))
    return {"export": ExportedModel(out, format="onnx", model_file=info.model_path.name,
                                    data_file=info.data_path.name, accuracy_level=cfg.accuracy_level,
                                    variants={str(k): v.name for k, v in info.variants.items()},
                                    method=getattr(ckpt, "method", None))}
