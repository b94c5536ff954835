"""``evaluate.embed``: an encoder (BERT family) vs its float original: sentence embeddings, masked-LM, size."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import EvalReport, ModelRef
from qflow.data.tokens import ReadsText
from qflow.registry import Stage, StageConfig, register
from qflow.specs import DataSpec


class EvaluateEmbedConfig(StageConfig):
    data: DataSpec                                # text split into sentences; data.seq_len = max tokens per sentence
    n_sentences: int = Field(256, ge=2)
    min_words: int = Field(5, ge=1)               # shorter sentences are skipped
    batch_size: int = Field(16, ge=1)
    mlm: Literal["auto", "on", "off"] = "auto"    # auto: when the checkpoint has a masked-LM head
    mask_rate: float = Field(0.15, gt=0, lt=1)
    mask_seed: int = 0
    float_dtype: Literal["float16", "bfloat16", "float32"] = "float16"   # size: unquantized tensors' dtype
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bootstrap_resamples: int = Field(1000, ge=100)


@register("evaluate.embed")
class EvaluateEmbed(ReadsText, Stage):
    """Compare a BERT-family encoder with its float original (docs/PROTOCOL.md "Encoders").

        evaluate:
          uses: evaluate.embed
          needs: [quantize]
          with: {data: {source: "zoo:lee-news", seq_len: 128}, n_sentences: 256, mlm: auto}
          gates: {embed_cos_mean: {min: 0.99}, mlm_kl_mean: {max: 0.1}}

    Protocol: the text's first ``n_sentences`` sentences of at least ``min_words`` words,
    tokenized with the encoder's tokenizer and its special tokens, truncated to
    ``data.seq_len`` tokens, padded per batch. Sentence embedding = mean pooling of the
    last hidden states over the attention mask (sentence-transformers' default).

    Metrics: embed_cos_mean (+ ``_ci_low/_ci_high``, bootstrap over sentences),
    embed_cos_min, embed_cos_p01 (1st percentile): cosine(float, quantized) per
    sentence; embed_pairsim_mae: mean |Δ cos| over sentence pairs; with a masked-LM head
    (``mlm``): mlm_kl_mean (+ CI over masked tokens), mlm_kl_median, mlm_kl_p99,
    mlm_kl_max (exact full-vocabulary KL(p_fp || p_q), nats, at ``mask_rate`` of each
    sentence's non-special tokens replaced by the mask token, positions seeded by
    ``mask_seed``), mlm_top1_agree, mlm_acc_fp, mlm_acc_q, mlm_n_masked; n_sentences,
    n_tokens; size and bpw as evaluate.lm (qflow/evaluation/size.py).
    """

    version = 1
    metrics = ("embed_*", "mlm_*", "n_sentences", "n_tokens", "bpw_*", "size_bytes_*", "compression_vs_*",
               "n_params", "n_quantized_weights", "quantized_bytes")
    Config = EvaluateEmbedConfig
    inputs = {"model": ModelRef}
    outputs = {"report": EvalReport}

    def check(self, cfg, inputs_meta):
        from qflow.models.adapters import model_config_from_inputs
        from qflow.models.encoders import has_mlm_head, is_encoder, max_tokens

        problems = list(super().check(cfg, inputs_meta))
        config = model_config_from_inputs(inputs_meta)
        if not config:
            return problems
        family = config.get("model_type")
        if not is_encoder(config):
            problems.append(f"evaluate.embed evaluates BERT-family encoders; the model is {family!r} "
                            "(fix: use evaluate.lm for a causal language model)")
            return problems
        limit = max_tokens(config)
        if limit is not None and cfg.data.seq_len > limit:
            problems.append(f"with.data.seq_len {cfg.data.seq_len} exceeds the {family} model's {limit} positions "
                            f"(fix: seq_len <= {limit})")
        if cfg.mlm == "on" and not has_mlm_head(config):
            problems.append(f"with.mlm: on, but the checkpoint ({', '.join(config.get('architectures') or ['?'])}) "
                            "has no masked-LM head (fix: mlm: auto or off)")
        return problems

    def run(self, ctx, cfg, model):
        import hashlib
        import json

        import torch

        from qflow.artifacts import QuantizedCheckpoint
        from qflow.data.sources import load_text
        from qflow.data.tokens import text_fingerprint_source
        from qflow.errors import StageError
        from qflow.evaluation import embed
        from qflow.evaluation.protocol import TAG, tokenizer_fingerprint
        from qflow.evaluation.size import size_metrics
        from qflow.models.encoders import has_mlm_head
        from qflow.models.loading import load_model

        where = f"stages.{ctx.stage_id}.with"
        problems = self.check(cfg, {"model": model})
        if problems:
            raise StageError("; ".join(problems), where=where)
        base_dir = model.base_model_dir
        fp_model, tok = load_model(base_dir, dtype=cfg.dtype, device="cpu")
        texts = embed.sentences(load_text(cfg.data.source, field=cfg.data.field, cache_dir=ctx.memo_dir),
                                cfg.n_sentences, min_words=cfg.min_words)
        if len(texts) < cfg.n_sentences:
            raise StageError(f"{cfg.data.source} holds {len(texts)} sentences of >= {cfg.min_words} words, "
                             f"{cfg.n_sentences} requested", where=f"{where}.n_sentences",
                             fix=f"lower n_sentences to at most {len(texts)} or use a longer text")
        batches = embed.sentence_batches(texts, tok, max_tokens=cfg.data.seq_len, batch_size=cfg.batch_size)
        use_mlm = cfg.mlm == "on" or (cfg.mlm == "auto" and has_mlm_head(fp_model.config))
        masked = embed.mask_batches(batches, tok, rate=cfg.mask_rate, seed=cfg.mask_seed) if use_mlm else None

        ckpt, q_model = None, fp_model
        if isinstance(model, QuantizedCheckpoint):
            from qflow.models.quantized import apply_checkpoint
            from qflow.quant.ir import Checkpoint

            ckpt = Checkpoint(model.ir_dir)
            act = any(r.spec.act_bits for r in ckpt.layers.values())
            q_model, _ = load_model(base_dir, dtype=cfg.dtype, device="cpu")
            q_model = apply_checkpoint(q_model, ckpt, mode="qlinear" if act else "dequant")
        with ctx.progress(len(texts), "evaluate encoder") as bar:
            res = embed.compare_encoders(fp_model, q_model, batches, masked, progress=bar.update)
        metrics = embed.summarize_embed(res, ctx.rng("bootstrap"), n_resamples=cfg.bootstrap_resamples)
        size, size_info = size_metrics(base_dir, ckpt, float_dtype=cfg.float_dtype)
        metrics |= size

        protocol = {"kind": "encoder", "source": cfg.data.source,
                    "text_fingerprint": text_fingerprint_source(cfg.data.source, ctx.memo_dir, cfg.data.field),
                    "sentences_sha256": embed.batches_fingerprint(batches),
                    "masked_sha256": embed.batches_fingerprint(masked) if masked else None,
                    "n_sentences": len(texts), "min_words": cfg.min_words, "max_tokens": cfg.data.seq_len,
                    "pooling": "mean over attention mask", "mask_rate": cfg.mask_rate if masked else None,
                    "mask_seed": cfg.mask_seed if masked else None, "tokenizer": type(tok).__name__,
                    "tokenizer_vocab_sha256": tokenizer_fingerprint(tok), "dtype": cfg.dtype,
                    "kl_definition": "mlm_kl_*: exact full-vocabulary KL(p_fp || p_q), nats per masked token"}
        protocol["hash"] = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]
        ctx.info["protocol"] = protocol
        ctx.log_metrics(metrics)
        ctx.info["tags"] = {TAG: protocol["hash"]}
        ctx.log.info("embeddings: cos mean %.6f (min %.6f) over %d sentences%s", metrics["embed_cos_mean"],
                     metrics["embed_cos_min"], len(texts),
                     f"; MLM KL {metrics['mlm_kl_mean']:.4g} over {int(metrics['mlm_n_masked'])} masked tokens"
                     if "mlm_kl_mean" in metrics else "")

        out = ctx.output("report")
        doc = {"metrics": metrics, "protocol": protocol, "protocol_hash": protocol["hash"], "size": size_info}
        (out / "metrics.json").write_text(json.dumps(doc, indent=1, default=str))
        torch.save({"cos": res.cos, "kl": res.kl}, out / "per_sentence.pt")
        ctx.log_artifact(out / "metrics.json")
        return {"report": EvalReport(out, protocol=protocol, protocol_hash=protocol["hash"])}
