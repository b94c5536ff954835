"""``evaluate.lm``: quality vs the float model, per-layer error, size and speed, with a pinned protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import CalibSet, EvalReport, ModelRef
from qflow.data.tokens import ReadsText
from qflow.registry import Stage, StageConfig, register
from qflow.specs import DataSpec


class EvaluateConfig(StageConfig):
    data: DataSpec
    n_windows: int | None = Field(None, ge=1)     # None: every full window of the text
    batch_size: int = Field(4, ge=1)
    # kl_* metrics: exact full-vocabulary KL(p_fp || p_q); float logits from cached float hidden states + the head
    kl_exact: bool = True
    topk: int = Field(128, ge=0)                  # float top-k kept: kl_topk_* lower-bound estimate (0: none)
    # bpw_model / size_bytes_deploy: unquantized tensors counted at this deployment dtype
    float_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bootstrap_resamples: int = Field(1000, ge=100)
    # per-layer report: calibration windows when the stage is wired to a CalibSet, else eval windows
    layer_report: bool = True
    layer_windows: int = Field(2, ge=1)
    layer_tokens: int = Field(512, ge=8)          # tokens per window for the per-layer pass
    # speed: float vs qflow's reference path (QLinear, dequantize every forward), side by side in this run;
    # rounds repeat until every median's 95% CI is within speed_target_rel_ci, or the budget runs out
    speed: bool = True
    speed_prefill_tokens: int = Field(256, ge=1)
    speed_decode_tokens: int = Field(32, ge=0)
    speed_warmup: int = Field(1, ge=0)
    speed_budget_seconds: float = Field(20.0, gt=0)
    speed_target_rel_ci: float = Field(0.05, gt=0, lt=1)
    speed_min_repeats: int = Field(6, ge=1)
    speed_max_repeats: int = Field(100, ge=1)
    speed_repeats: int | None = Field(None, ge=1)  # a fixed number of rounds (no adaptive stop)

    @model_validator(mode="after")
    def _speed_repeats_order(self):
        if self.speed_min_repeats > self.speed_max_repeats:
            raise ValueError(f"speed_min_repeats ({self.speed_min_repeats}) exceeds speed_max_repeats "
                             f"({self.speed_max_repeats}); lower the first or raise the second")
        return self


@register("evaluate.lm")
class EvaluateLM(ReadsText, Stage):
    """Perplexity and KL vs the float model with bootstrap CIs, per-layer SQNR, size, speed (docs/METHODS.md §11).

        evaluate:
          uses: evaluate.lm
          needs: [quantize]                   # add calibrate to run the per-layer pass on calibration text
          with: {data: {source: "zoo:lee-news", seq_len: 512}, n_windows: 32, speed: true,
                 kl_exact: true, topk: 128, float_dtype: float16}
          gates: {ppl_ratio: {max: 1.10}, top1_agree: {min: 0.8}}

    Protocol: the text tokenized once without special tokens, non-overlapping
    windows of ``seq_len`` in order (remainder dropped), the first ``n_windows``;
    PPL = exp(mean NLL over every scored token). The protocol and its hash go into
    ``metrics.json`` and the MLflow tag ``qflow.protocol_hash``. The float model's
    results are cached once per (model, windows) and reused by every evaluation.

    Metrics: ppl, ppl_fp, ppl_ratio, ppl_diff (+ ``_ci_low/_ci_high``: paired bootstrap
    over windows); kl_mean (+ CI), kl_median, kl_p99, kl_max: **exact full-vocabulary**
    KL(p_fp || p_q) per token in nats (``kl_exact``, on by default: the float logits are
    rebuilt chunk by chunk from the float final hidden states cached with the float reference
    and the float output head, the same numbers as a float forward at the cost of the head;
    a float forward per batch when the head cannot be split off or the cache would exceed
    2 GiB); kl_topk_mean
    (+ CI), kl_topk_median, kl_topk_p99, kl_topk_max: the **top-k estimate (lower bound)**
    over the cached float top-``topk`` tokens + a tail bin, always reported when ``topk``
    > 0 (cheap); top1_agree, top5_overlap; size (qflow/evaluation/size.py):
    size_bytes_checkpoint (measured, on disk), size_bytes_deploy (estimate: unquantized
    tensors at ``float_dtype``), bpw_quantized (nominal), bpw_quantized_measured,
    bpw_model, compression_vs_fp16/fp32; when ``speed`` is on: prefill_tps_fp, decode_tps_fp
    (float) and prefill_tps_refpath, decode_tps_refpath (qflow's dequantize-then-matmul reference
    path, not a deployment speed: no ratio is reported), speed_samples, speed_noisy,
    speed_rel_ci_max (rounds repeat until each median's 95% CI is within ``speed_target_rel_ci``,
    at most ``speed_budget_seconds``; ``speed_repeats: N`` fixes the count). Artifacts: metrics.json, layers.csv/json, layer_sqnr.png,
    kl_hist.png, report.html (also written to the run folder).
    """

    version = 4           # 3: exact KL, kl_topk_* estimate, bpw at the deployment dtype; 4: adaptive speed
                          # pass (*_refpath, no ratio), protocol summary, per-layer SQNR from recorded folds
    # what it logs (fnmatch patterns; qflow lint checks gates against them)
    metrics = ("ppl", "ppl_*", "top1_agree", "top5_overlap", "n_tokens", "dlogp_mean", "kl_*", "bpw_*", "size_bytes_*",
               "compression_vs_*", "n_params", "n_quantized_weights", "quantized_bytes", "speed_*", "prefill_*",
               "decode_*", "layer_*_sqnr_min_db")
    Config = EvaluateConfig
    inputs = {"model": ModelRef, "calib": CalibSet}
    optional_inputs = frozenset({"calib"})
    outputs = {"report": EvalReport}

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.evaluation.lm import CHUNK_ELEMENTS
        from qflow.models.memory import evaluate_stage_bytes, model_config_of

        # the float reference and the quantized model side by side; logits one chunk of positions at a time
        return evaluate_stage_bytes(model_config_of(inputs_meta, upstream), batch_size=cfg.batch_size,
                                    seq_len=cfg.data.seq_len, chunk_elements=CHUNK_ELEMENTS)

    def run(self, ctx, cfg, model, calib=None):
        import json

        import torch

        from qflow.artifacts import QuantizedCheckpoint
        from qflow.data.tokens import text_fingerprint_source, token_windows, windows_fingerprint
        from qflow.evaluation import stats
        from qflow.evaluation.lm import FloatReference, compare_to_reference, float_reference, summarize, window_means
        from qflow.evaluation.labels import metric_tags
        from qflow.evaluation.protocol import TAG, eval_protocol
        from qflow.evaluation.size import size_metrics
        from qflow.models.loading import load_model

        base_dir = model.base_model_dir
        fp_model, tok = load_model(base_dir, dtype=cfg.dtype, device=ctx.device)
        ids = token_windows(cfg.data, tok, cfg.n_windows, ctx.memo_dir, where=f"stages.{ctx.stage_id}.with")
        fingerprint = windows_fingerprint(ids)
        protocol = eval_protocol(source=cfg.data.source,
                                 text_fingerprint=text_fingerprint_source(cfg.data.source, ctx.memo_dir, cfg.data.field),
                                 seq_len=cfg.data.seq_len, n_windows=int(ids.shape[0]), windows_sha256=fingerprint,
                                 add_special_tokens=cfg.data.add_special_tokens, tokenizer=tok, kl_topk=cfg.topk,
                                 dtype=cfg.dtype, kl_exact=cfg.kl_exact)
        ctx.info["protocol"] = protocol

        def compute_fp(folder):
            with ctx.progress(ids.shape[0], "float reference") as bar:
                float_reference(fp_model, ids, batch_size=cfg.batch_size, topk=cfg.topk, progress=bar.update).save(folder)

        base_id = model.meta.get("base_fingerprint") or model.meta.get("fingerprint") or str(base_dir)
        ref_dir = ctx.memo("fp_reference", {"base": base_id, "base_dir": str(base_dir), "windows": fingerprint,
                                            "topk": cfg.topk, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
                                            "order": "ranked-topk-v5-hidden",
                                            **({"device": ctx.device} if ctx.device != "cpu" else {})},
                           compute_fp)
        ref = FloatReference.load(ref_dir)

        ckpt = None
        q_model = fp_model
        if isinstance(model, QuantizedCheckpoint):
            from qflow.models.quantized import apply_checkpoint
            from qflow.quant.ir import Checkpoint

            ckpt = Checkpoint(model.ir_dir)
            act = any(r.spec.act_bits for r in ckpt.layers.values())
            q_model, _ = load_model(base_dir, dtype=cfg.dtype, device=ctx.device)
            q_model = apply_checkpoint(q_model, ckpt, mode="qlinear" if act else "dequant")
        with ctx.progress(ids.shape[0], "evaluate") as bar:
            comparison = compare_to_reference(q_model, ids, ref, batch_size=cfg.batch_size, topk=cfg.topk,
                                              fp_model=fp_model if cfg.kl_exact else None, progress=bar.update)
        metrics = summarize(comparison)
        n_win = int(ids.shape[0])
        rng = ctx.rng("bootstrap")
        low, high = stats.ppl_diff_ci(window_means(comparison.nll, n_win).numpy(),
                                      window_means(comparison.nll_fp, n_win).numpy(), rng,
                                      n_resamples=cfg.bootstrap_resamples)
        metrics |= {"ppl_diff_ci_low": low, "ppl_diff_ci_high": high}
        for prefix, kl in (("kl", comparison.kl), ("kl_topk", comparison.kl_topk)):
            if kl is not None:
                low, high = stats.mean_ci(window_means(kl, n_win).numpy(), rng, n_resamples=cfg.bootstrap_resamples)
                metrics |= {f"{prefix}_mean_ci_low": low, f"{prefix}_mean_ci_high": high}

        size, size_info = size_metrics(base_dir, ckpt, float_dtype=cfg.float_dtype)
        metrics |= size

        rows, layer_source = [], ""
        if ckpt is not None and cfg.layer_report and ckpt.layers:
            rows, layer_source = self._layer_report(ctx, cfg, fp_model, q_model, ckpt, ids, calib)

        speed_info = None
        if cfg.speed:
            speed, speed_info = self._speed(ctx, cfg, fp_model, q_model, ckpt, ids)
            metrics |= speed
            ctx.info["tags"] = {"qflow.speed.path": speed_info["path"]}

        protocol["calibration"] = self._calibration(ckpt, calib)
        protocol["summary"] = (f"protocol {protocol['hash']}: {protocol['n_windows']} x {protocol['seq_len']}-token "
                               f"windows of {protocol['source']} (evaluation); calibration: {protocol['calibration']}")
        ctx.log.info("%s", protocol["summary"])

        for k, v in metrics.items():
            if v != v or v in (float("inf"), float("-inf")):
                ctx.log.warning("metric %s is %s", k, v)
        ctx.log_metrics(metrics)
        ctx.info["tags"] = {**ctx.info.get("tags", {}), TAG: protocol["hash"], "qflow.protocol": protocol["summary"],
                            **metric_tags(metrics, cfg.float_dtype, cfg.topk)}

        out = ctx.output("report")
        doc = {"metrics": metrics, "protocol": protocol, "protocol_hash": protocol["hash"],
               "protocol_summary": protocol["summary"], "size": size_info,
               "speed": speed_info, "layers": {"inputs": layer_source, "n_layers": len(rows)}}
        (out / "metrics.json").write_text(json.dumps(doc, indent=1, default=str))
        torch.save({"kl": comparison.kl, "kl_topk": comparison.kl_topk, "nll": comparison.nll,
                    "nll_fp": comparison.nll_fp}, out / "per_token.pt")
        self._report(ctx, out, model, metrics, protocol, rows, layer_source, comparison, speed_info, size_info)
        return {"report": EvalReport(out, protocol=protocol, protocol_hash=protocol["hash"])}

    # ---- parts ------------------------------------------------------------------

    @staticmethod
    def _calibration(ckpt, calib) -> str:
        """What the checkpoint was calibrated on (its meta), else the wired calibration set, in words."""
        import json

        meta = ckpt.meta if ckpt is not None else {}
        if meta.get("calib_shape"):
            n, length = meta["calib_shape"][:2]
            return f"{n} x {length}-token windows of {meta.get('calib_source') or 'unrecorded text'}"
        if ckpt is not None:
            return "none (calibration-free method)"
        if calib is not None and (calib.path / "info.json").is_file():
            info = json.loads((calib.path / "info.json").read_text())
            return f"{info.get('n_samples')} x {info.get('seq_len')}-token windows of {info.get('source')} (not used)"
        return "none (float model)"

    @staticmethod
    def _layer_report(ctx, cfg, fp_model, q_model, ckpt, ids, calib):
        import torch

        from qflow.evaluation.layers import layer_report, summary_metrics, write_tables

        if calib is not None and (calib.path / "ids.pt").is_file():
            source_ids = torch.load(calib.path / "ids.pt", weights_only=True)
            source = "calibration windows"
        else:
            source_ids, source = ids, "evaluation windows"
        sample = source_ids[:cfg.layer_windows, :cfg.layer_tokens]
        source = f"{source} ({sample.shape[0]} x {sample.shape[1]} tokens)"
        with ctx.progress(int(sample.shape[0]), f"per-layer error ({len(ckpt.layers)} layers)") as bar:
            rows = layer_report(fp_model, q_model, ckpt, sample, progress=bar.update)
        ctx.log_metrics(summary_metrics(rows))
        for path in write_tables(rows, ctx.output("report"), source=source):
            ctx.log_artifact(path)
        return rows, source

    @staticmethod
    def _speed(ctx, cfg, fp_model, q_model, ckpt, ids):
        from qflow.evaluation.speed import RepeatPolicy, kernel_path, measure_speed, prompt_ids
        from qflow.quant.qlinear import QLinear

        if ckpt is not None:
            # the dispatcher's kernels on every forward: QLinear, no cached dequantized weight
            from qflow.models.quantized import apply_checkpoint

            if any(isinstance(m, QLinear) for m in q_model.modules()):
                for m in q_model.modules():
                    if isinstance(m, QLinear):
                        m.cache_weight, m._weight = False, None
            else:
                q_model = apply_checkpoint(q_model, ckpt, mode="qlinear", cache_weight=False)
        path = kernel_path(q_model) if ckpt is not None else {"backend": "none", "path": "float model only"}
        prompt = prompt_ids(ids, cfg.speed_prefill_tokens).to(next(fp_model.parameters()).device)
        policy = RepeatPolicy(min_repeats=cfg.speed_min_repeats, max_repeats=cfg.speed_max_repeats,
                              budget_seconds=cfg.speed_budget_seconds, target_rel_ci=cfg.speed_target_rel_ci,
                              fixed=cfg.speed_repeats)
        desc = f"speed [{path['path']}; kernels: {path['backend']}]"
        with ctx.progress(policy.fixed, desc) as bar:
            metrics, info = measure_speed(fp_model, q_model if ckpt is not None else None, prompt,
                                          decode_tokens=cfg.speed_decode_tokens, warmup=cfg.speed_warmup,
                                          policy=policy, progress=bar.update)
        (ctx.log.warning if metrics["speed_noisy"] else ctx.log.info)("speed: %s", info["label"])
        info = {"path": path["path"], "label": info.pop("label"), **info, **path, "device": ctx.device,
                "dtype": cfg.dtype}
        return metrics, info

    @staticmethod
    def _report(ctx, out, model, metrics, protocol, rows, layer_source, comparison, speed_info, size_info):
        import shutil

        from qflow.evaluation.run_report import write_run_report

        method = model.meta.get("method") or type(model).__name__
        files = write_run_report(out, title=f"{ctx.stage_id}: {ctx.uses} ({method})", metrics=metrics,
                                 protocol=protocol, layer_rows=rows, layer_source=layer_source,
                                 kl=comparison.kl.numpy() if comparison.kl is not None else None,
                                 kl_topk=comparison.kl_topk.numpy() if comparison.kl_topk is not None else None,
                                 speed=speed_info, size=size_info)
        for path in [out / "metrics.json", *files.values()]:
            ctx.log_artifact(path)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        target = ctx.run_dir / "report.html"
        if target.exists():  # a second evaluate stage in the same run
            target = ctx.run_dir / f"report-{ctx.stage_id}.html"
        shutil.copy2(files["html"], target)
