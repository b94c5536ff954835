"""``evaluate.lm``: perplexity and agreement with the float model on fixed windows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qflow.artifacts import EvalReport, ModelRef
from qflow.registry import Stage, StageConfig, register
from qflow.specs import DataSpec


class EvaluateConfig(StageConfig):
    data: DataSpec
    n_windows: int | None = Field(None, ge=1)     # None: every full window of the text
    batch_size: int = Field(4, ge=1)
    topk: int = Field(128, ge=0)                  # float top-k kept for KL (0 disables KL)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@register("evaluate.lm")
class EvaluateLM(Stage):
    """Perplexity of the model and of its float base, KL, top-1/top-5 agreement (METHODS.md §11).

        evaluate:
          uses: evaluate.lm
          needs: [quantize]
          with: {data: {source: "zoo:lee-news", seq_len: 512}, n_windows: 32}
          gates: {ppl_ratio: {max: 1.10}, top1_agree: {min: 0.8}}

    Protocol: the text tokenized once without special tokens, non-overlapping
    windows of ``seq_len`` in order (remainder dropped), the first ``n_windows``;
    PPL = exp(mean NLL over every scored token). The float model's results are
    cached once per (model, windows) and reused by every evaluation.
    """

    version = 1
    Config = EvaluateConfig
    inputs = {"model": ModelRef}
    outputs = {"report": EvalReport}

    @classmethod
    def fingerprint_sources(cls, cfg, cache_root):
        from qflow.data.tokens import text_fingerprint_source

        return {"data": text_fingerprint_source(cfg.data.source, cache_root, cfg.data.field)}

    def run(self, ctx, cfg, model):
        import json

        import torch

        from qflow.artifacts import QuantizedCheckpoint
        from qflow.data.tokens import token_windows, windows_fingerprint
        from qflow.evaluation.lm import FloatReference, compare_to_reference, float_reference, summarize
        from qflow.models.loading import load_model

        base_dir = model.model_dir
        fp_model, tok = load_model(base_dir, dtype=cfg.dtype)
        ids = token_windows(cfg.data, tok, cfg.n_windows, ctx.runs_root / "cache", where=f"stages.{ctx.stage_id}.with")
        fingerprint = windows_fingerprint(ids)
        protocol = {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "n_windows": int(ids.shape[0]),
                    "stride": cfg.data.seq_len, "bos": "none", "windows_sha256": fingerprint,
                    "tokenizer": type(tok).__name__, "dtype": cfg.dtype, "mode": "non-overlapping"}

        def compute_fp(folder):
            with ctx.progress(ids.shape[0], "float reference") as bar:
                float_reference(fp_model, ids, batch_size=cfg.batch_size, topk=cfg.topk, progress=bar.update).save(folder)

        base_id = model.meta.get("base_fingerprint") or model.meta.get("fingerprint") or str(base_dir)
        ref_dir = ctx.memo("fp_reference", {"base": base_id, "base_dir": str(base_dir), "windows": fingerprint,
                                            "topk": cfg.topk, "batch_size": cfg.batch_size, "dtype": cfg.dtype},
                           compute_fp)
        ref = FloatReference.load(ref_dir)

        if isinstance(model, QuantizedCheckpoint):
            from qflow.quant.apply import apply_checkpoint
            from qflow.quant.ir import Checkpoint

            ckpt = Checkpoint(model.ir_dir)
            act = any(r.spec.act_bits for r in ckpt.layers.values())
            q_model = apply_checkpoint(fp_model, ckpt, mode="qlinear" if act else "dequant")
        else:
            q_model = fp_model
        with ctx.progress(ids.shape[0], "evaluate") as bar:
            comparison = compare_to_reference(q_model, ids, ref, batch_size=cfg.batch_size, topk=cfg.topk,
                                              progress=bar.update)
        metrics = summarize(comparison)
        for k, v in metrics.items():
            if v != v or v in (float("inf"), float("-inf")):
                ctx.log.warning("metric %s is %s", k, v)
        ctx.log_metrics(metrics)
        out = ctx.output("report")
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "protocol": protocol}, indent=1))
        torch.save({"kl": comparison.kl, "nll": comparison.nll, "nll_fp": comparison.nll_fp}, out / "per_token.pt")
        return {"report": EvalReport(out, protocol=protocol)}
