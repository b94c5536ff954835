"""Human labels of the evaluation metrics: one place for the report, the plots, the run summary, MLflow.

Every KL number says which KL it is: ``kl_*`` is the exact full-vocabulary
``KL(p_fp || p_q)``, ``kl_topk_*`` the top-k + tail-bin estimate (a lower bound).
Whole-model bits per weight say at which dtype unquantized tensors are counted.

Example::

    metric_label("kl_mean")              # "KL (exact, full vocabulary), mean, nats"
    metric_label("evaluate/kl_topk_p99") # "KL top-k estimate (lower bound), p99, nats"
"""

from __future__ import annotations

KL_EXACT = "KL (exact, full vocabulary)"
KL_TOPK = "KL top-k estimate (lower bound)"

_KL_STATS = ("mean", "median", "p99", "max")


def metric_label(name: str, float_dtype: str | None = None) -> str:
    """A short human label for a metric (``STAGE/`` prefixes ignored); the name itself when unknown.

    ``float_dtype``: the deployment dtype of unquantized tensors in the size metrics (None: runs may differ).
    """
    short = name.rsplit("/", 1)[-1]
    float_dtype = float_dtype or "their deployment dtype"
    for prefix, kind in (("kl_topk_", KL_TOPK), ("kl_", KL_EXACT)):
        if short.startswith(prefix) and short[len(prefix):] in _KL_STATS:
            return f"{kind}, {short[len(prefix):]}, nats"
    return {
        "bpw_quantized": "bits/weight, quantized layers (nominal)",
        "bpw_quantized_measured": "bits/weight, quantized layers (measured bytes)",
        "bpw_model": f"bits/weight, whole model (unquantized tensors at {float_dtype})",
        "size_bytes_deploy": f"deployment bytes, estimated (unquantized tensors at {float_dtype})",
        "size_bytes_checkpoint": "checkpoint bytes on disk (measured)",
        "compression_vs_fp16": f"compression vs float16 (deployment size, unquantized at {float_dtype})",
        "compression_vs_fp32": f"compression vs float32 (deployment size, unquantized at {float_dtype})",
        "ppl": "perplexity",
    }.get(short, short)


def metric_tags(metrics, float_dtype: str, topk: int = 0) -> dict[str, str]:
    """MLflow tags (``qflow.metric.NAME``) that say what the KL and size metrics of an evaluation mean;
    the run summary prints them under the metrics."""
    tags = {}
    if "kl_mean" in metrics:
        tags["qflow.metric.kl_mean"] = f"{KL_EXACT}: KL(p_fp || p_q) per token, nats; CI: bootstrap over windows"
    if "kl_topk_mean" in metrics:
        tags["qflow.metric.kl_topk_mean"] = (f"{KL_TOPK}: KL(p_fp || p_q) per token over the "
                                             f"float top-{topk} tokens + one tail bin, nats")
    if "bpw_model" in metrics:
        tags["qflow.metric.bpw_model"] = (f"all parameters; quantized layers as stored, unquantized tensors at "
                                          f"{float_dtype} (deployment dtype); also size_bytes_deploy, "
                                          "compression_vs_fp16/fp32")
    return tags
