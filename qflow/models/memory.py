"""Peak-memory estimates of the quantize and evaluate stages, before anything runs.

    config = model_config_of(inputs_meta, upstream)    # config.json of the model
    calibrated_stage_bytes(config, n_samples=32, seq_len=512, hessians=True)

The figures are rough upper estimates of the resident set, from the model's
config alone: what the process keeps (the Python/torch runtime, the weights it
holds) plus the largest working set of one step. Stages call these from
``Stage.estimate_peak_bytes``; ``qflow run --dry-run`` prints them, the runner
warns before a stage whose estimate exceeds the available memory, and
``qflow run -m -j N`` runs at most as many points at once as the available
memory holds.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..artifacts import ModelRef
from ..registry import Upstream
from .adapters import model_config_from_inputs

RUNTIME_BYTES = 600 * 2**20  # python + torch + transformers + numba + compiled kernels on CPU
F32 = 4


def _dims(config: dict[str, Any]) -> dict[str, int] | None:
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 32000)
    attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * inter
    hessian = 3 * max(hidden, inter) ** 2     # GPTQ's Hessians of the widest sub-step
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if experts:   # mixture of experts (METHODS.md §4.2): E gated MLPs, a shared one, the router
        moe_inter = int(config.get("moe_intermediate_size") or inter)
        shared = int(config.get("shared_expert_intermediate_size") or 0)
        mlp = 3 * hidden * (experts * moe_inter + shared) + experts * hidden
        hessian = max(hessian, (experts + 1) * hidden ** 2, experts * moe_inter ** 2 + shared ** 2)
    return {"hidden": hidden, "layers": layers, "heads": heads, "inter": inter, "vocab": vocab,
            "block": attn + mlp + 2 * hidden, "tied": bool(config.get("tie_word_embeddings", False)),
            "hessian": hessian}


def model_params(config: dict[str, Any]) -> int | None:
    """Parameter count of a Llama-layout decoder from its config.json (None when it is not one)."""
    d = _dims(config)
    if d is None:
        return None
    embed = d["vocab"] * d["hidden"]
    return d["layers"] * d["block"] + embed * (1 if d["tied"] else 2) + d["hidden"]


def calibrated_stage_bytes(config: dict[str, Any] | None, *, n_samples: int, seq_len: int,
                           hessians: bool = False, batch_size: int = 8) -> int | None:
    """A block-wise calibration-based stage (AWQ, GPTQ, SmoothQuant) with blocks loaded one at a time.

    Non-block weights + one block (weights, a working copy) + the block's calibration
    activations (inputs, outputs, the widest captured linear input) + one mini-batch's
    attention scores + GPTQ's Hessians of one sub-step.
    """
    d = _dims(config or {})
    if d is None:
        return None
    embed = d["vocab"] * d["hidden"] * (1 if d["tied"] else 2)
    tokens = n_samples * seq_len
    activations = tokens * (3 * d["hidden"] + d["inter"])
    scores = min(batch_size, n_samples) * d["heads"] * seq_len * seq_len * 2
    hess = d["hessian"] if hessians else 0
    return RUNTIME_BYTES + F32 * (embed + 2 * d["block"] + activations + scores + hess)


def streaming_stage_bytes(config: dict[str, Any] | None) -> int | None:
    """A stage that reads one weight at a time (RTN, HQQ): the runtime plus the widest weight's copies."""
    d = _dims(config or {})
    if d is None:
        return None
    widest = d["hidden"] * max(d["inter"], d["hidden"])  # the decoder linears; embeddings stay float
    return RUNTIME_BYTES + F32 * 4 * widest


def whole_model_bytes(config: dict[str, Any] | None, *, copies: int = 1, batch_size: int = 1,
                      seq_len: int = 512, logit_copies: int = 3) -> int | None:
    """``copies`` fp32 models in memory at once plus ``logit_copies`` fp32 tensors of one batch's
    logits (logits, log-softmax, the float reference's, top-k work for KL...)."""
    params = model_params(config or {})
    d = _dims(config or {})
    if params is None or d is None:
        return None
    logits = batch_size * seq_len * d["vocab"] * logit_copies
    return RUNTIME_BYTES + F32 * (copies * params + logits)


def evaluate_stage_bytes(config: dict[str, Any] | None, *, batch_size: int, seq_len: int,
                         chunk_elements: int) -> int | None:
    """``evaluate.lm``: the float and the quantized model (fp32) side by side, one window batch's
    activations (hidden states of both models, the widest MLP input, one layer's attention scores) and
    one chunk of ``chunk_elements`` logits with its working set (three fp32 and five fp64 copies:
    both logits, log-softmaxes, exact-KL terms). The logits of a whole batch never exist
    (``qflow/evaluation/lm.py``), so the vocabulary enters only through the weights and the chunk."""
    params = model_params(config or {})
    d = _dims(config or {})
    if params is None or d is None:
        return None
    tokens = batch_size * seq_len
    activations = tokens * (6 * d["hidden"] + 2 * d["inter"]) + batch_size * d["heads"] * seq_len * seq_len
    chunk = chunk_elements * (3 + 2 * 5)
    return RUNTIME_BYTES + F32 * (2 * params + activations + chunk)


def calibration_shape(inputs_meta: dict[str, Any], slot: str = "calib") -> tuple[int, int] | None:
    """(n_samples, seq_len) of the calibration set feeding ``slot``: from the cached CalibSet's
    metadata, else from the planned calibrate stage's config (``{"planned": config}``)."""
    ref = (inputs_meta or {}).get(slot)
    if ref is None:
        return None
    if isinstance(ref, dict):
        planned = ref.get("planned") or {}
        n, seq = planned.get("n_samples"), (planned.get("data") or {}).get("seq_len")
    else:
        meta = getattr(ref, "meta", None) or {}
        n, seq = meta.get("n_samples"), meta.get("seq_len")
    return (int(n), int(seq)) if n and seq else None


def model_config_of(inputs_meta: dict[str, Any] | None, upstream: Sequence[Upstream] = ()) -> dict[str, Any] | None:
    """``config.json`` of the model a stage works on: from its ``model`` input once that is an artifact,
    else from the nearest model among the outputs of the stages upstream (None before any has run)."""
    ref = (inputs_meta or {}).get("model")
    if ref is not None and not (isinstance(ref, dict) and "planned" in ref):
        config = model_config_from_inputs({"model": ref})
        if config:
            return config
    for stage in upstream:
        for artifact in stage.outputs.values():
            if isinstance(artifact, ModelRef):
                config = model_config_from_inputs({"model": artifact})
                if config:
                    return config
    return None


def estimate_calibrated(cfg: Any, inputs_meta: dict[str, Any], upstream: Sequence[Upstream],
                        *, hessians: bool = False) -> int | None:
    """``Stage.estimate_peak_bytes`` of a block-wise calibration-based quantize stage."""
    shape = calibration_shape(inputs_meta)
    if shape is None:
        return None
    return calibrated_stage_bytes(model_config_of(inputs_meta, upstream), n_samples=shape[0], seq_len=shape[1],
                                  hessians=hessians, batch_size=getattr(cfg, "batch_size", 8))


def estimate_streaming(inputs_meta: dict[str, Any], upstream: Sequence[Upstream]) -> int | None:
    """``Stage.estimate_peak_bytes`` of a stage that quantizes one weight at a time (RTN, HQQ)."""
    return streaming_stage_bytes(model_config_of(inputs_meta, upstream))
