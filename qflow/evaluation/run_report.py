"""The per-run evaluation report: headline table, protocol, size, speed, per-layer chart, KL histogram.

Example::

    files = write_run_report(out, title="evaluate (quantize.rtn)", metrics=m, protocol=p,
                             layer_rows=rows, kl=kl, speed=speed_info, size=size_info)
    files["html"]   # out / "report.html"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import html as H
from .labels import metric_label
from .layers import worst_layers
from .plots import kl_histogram, sqnr_chart

# (metric, label); None: the label from qflow.evaluation.labels (KL kind, float dtype of the size convention)
HEADLINE = (
    ("ppl", "perplexity"), ("ppl_fp", "perplexity, float"), ("ppl_ratio", "perplexity ratio"),
    ("ppl_diff", "perplexity difference"), ("ppl_diff_ci_low", "  95% CI low"), ("ppl_diff_ci_high", "  95% CI high"),
    ("kl_mean", None), ("kl_mean_ci_low", "  95% CI low"), ("kl_mean_ci_high", "  95% CI high"),
    ("kl_median", None), ("kl_p99", None), ("kl_max", None),
    ("kl_topk_mean", None), ("kl_topk_mean_ci_low", "  95% CI low"), ("kl_topk_mean_ci_high", "  95% CI high"),
    ("kl_topk_median", None), ("kl_topk_p99", None), ("kl_topk_max", None),
    ("top1_agree", "top-1 agreement"), ("top5_overlap", "top-5 overlap"),
    ("bpw_quantized", None), ("bpw_quantized_measured", None), ("bpw_model", None),
    ("size_bytes_deploy", None), ("size_bytes_checkpoint", None),
    ("compression_vs_fp16", None), ("compression_vs_fp32", None),
    ("prefill_tps_fp", "prefill tokens/s, float"),
    ("prefill_tps_refpath", "prefill tokens/s, qflow reference path (dequantize-then-matmul; not deployment)"),
    ("decode_tps_fp", "decode tokens/s, float"),
    ("decode_tps_refpath", "decode tokens/s, qflow reference path (dequantize-then-matmul; not deployment)"),
    ("speed_samples", "speed samples per series"), ("speed_noisy", "speed medians noisy (1 = yes)"),
)
SPEED_COLUMNS = ("series", "samples", "tps", "tps_ci_low", "tps_ci_high", "median_seconds", "rel_ci_half_width",
                 "iqr_rel", "min_seconds", "max_seconds", "p90_seconds", "noisy")


def write_run_report(folder: Path, *, title: str, metrics: dict[str, float], protocol: dict[str, Any],
                     layer_rows: list[dict[str, Any]], layer_source: str, kl, speed: dict[str, Any] | None,
                     size: dict[str, Any], kl_topk=None) -> dict[str, Path]:
    """Write the PNGs and ``report.html`` into ``folder``; returns their paths by kind.

    ``kl``: per-token exact full-vocabulary KL; ``kl_topk``: the top-k estimate (drawn only without ``kl``).
    """
    files: dict[str, Path] = {}
    parts = []
    float_dtype = (size or {}).get("float_dtype", "float16")
    labels = [(name, label if label is not None else metric_label(name, float_dtype)) for name, label in HEADLINE]
    rows = [(label.strip() if not label.startswith("  ") else "\u2003" + label.strip(), name, metrics[name])
            for name, label in labels if name in metrics]
    notes = ["CIs: paired bootstrap over windows (1000 resamples, seeded)."]
    if "kl_mean" in metrics:
        notes.append("KL (exact, full vocabulary): KL(p_fp || p_q) = sum over the whole vocabulary of "
                     "p_fp (log p_fp - log p_q) per scored token, in nats, float model first; the float logits "
                     "are the float head applied to the float model's cached final hidden states (or a float forward "
                     "per window batch when those are not cached).")
    if "kl_topk_mean" in metrics:
        notes.append("KL top-k estimate (lower bound): the same KL over the float model's top-k tokens plus one "
                     "tail bin; it never exceeds the exact KL.")
    if "bpw_model" in metrics:
        notes.append(f"Whole-model bits/weight and compression: quantized layers as stored, unquantized tensors "
                     f"at {float_dtype} (the deployment dtype, stage option float_dtype), whatever the base folder "
                     f"stores; size_bytes_checkpoint is measured on disk.")
    parts.append(H.section("Headline metrics", H.table(("metric", "name", "value"), rows),
                           *(H.note(n) for n in notes)))
    parts.append(H.section("Protocol", H.note(protocol.get("summary", "")),
                           H.table(("field", "value"), [(k, v) for k, v in protocol.items() if k != "summary"]),
                           H.note("Numbers are comparable only between runs with the same protocol hash.")))
    if size:
        parts.append(H.section("Size", H.note(size.get("convention", "")),
                               H.table(("field", "value"), [(k, v) for k, v in size.items()])))
    if speed:
        series = speed.get("series", {})
        speed_rows = [(k, v) for k, v in speed.items() if k not in ("seconds", "series")]
        parts.append(H.section(
            "Speed (float vs qflow reference path)", H.note(speed.get("path", "")), H.note(speed.get("label", "")),
            H.table(SPEED_COLUMNS, [(name, *(st.get(c, "") for c in SPEED_COLUMNS[1:])) for name, st in series.items()]),
            H.table(("field", "value"), speed_rows)))
    else:
        parts.append(H.section("Speed", H.note("not measured (speed: false)")))
    if layer_rows:
        files["layer_sqnr"] = sqnr_chart(layer_rows, folder / "layer_sqnr.png")
        worst = worst_layers(layer_rows)
        parts.append(H.section(
            "Per-layer error",
            H.note(f"Output SQNR per quantized linear, network order, colored by bits; bars: isolated "
                   f"(float input), dots: accumulated (quantized model's own activations). Inputs: {layer_source}."),
            H.image(files["layer_sqnr"], "per-layer SQNR"),
            H.note("Worst 10 layers by isolated output SQNR:"),
            H.table(("rank", "layer", "bits", "weight SQNR dB", "isolated SQNR dB", "isolated cos",
                     "accumulated SQNR dB", "accumulated cos"),
                    [(r["worst_rank"], r["layer"], r["bits"], r["weight_sqnr_db"], r["isolated_sqnr_db"],
                      r["isolated_cos"], r["accumulated_sqnr_db"], r["accumulated_cos"]) for r in worst])))
    exact = kl is not None
    files["kl_hist"] = kl_histogram(kl if exact else kl_topk, folder / "kl_hist.png", metrics,
                                    kind="exact" if exact else "topk")
    title = "KL divergence per token (exact, full vocabulary)" if exact else \
        "KL divergence per token (top-k estimate, lower bound)"
    parts.append(H.section(title, H.image(files["kl_hist"], "KL histogram")))
    files["html"] = H.write_page(folder / "report.html", title, parts)
    return files
