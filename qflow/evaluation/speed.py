"""Prefill and decode throughput of the quantized model vs the float model, side by side.

The quantized model runs through the dispatcher's kernels: ``QLinear`` with
``cache_weight=False``, so every forward dequantizes its packed weights
(``dequantize_packed``: CUDA on a GPU when built, numba on CPU, torch last)
and then multiplies. On CPU there is no fused int4 GEMM: the path is
dequantize-then-matmul, so a quantized model is *slower* than its float twin
there; the numbers say what this build does, not what a fused kernel could.

One repeat = a prefill of ``prefill_tokens`` (batch 1, KV cache built) then
``decode_tokens`` greedy steps with the KV cache, timed separately. Float and
quantized repeats alternate so that load on a shared machine hits both alike;
``warmup`` short untimed repeats (64-token prefill, 4 decode steps) come first:
they compile the numba kernels and allocate every code path at a fraction of the cost. Reported: median
tokens/s, p90 seconds (nearest rank), and quantized/float ratios.

Example::

    metrics, info = measure_speed(fp_model, q_model, prompt, decode_tokens=32, repeats=3, warmup=1)
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from typing import Any, Callable

import torch

WARMUP_PREFILL = 64     # tokens of a warm-up prefill
WARMUP_DECODE = 4       # decode steps of a warm-up
CPU_PATH_NOTE = "CPU: dequantize-then-matmul (no fused int4 GEMM kernel on CPU)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kw(model) -> str:
    """transformers >= 5.2x names the KV cache ``cache``; older ones ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out) -> Any:
    for key in ("cache", "past_key_values"):
        if key in out:
            return out[key]
    raise RuntimeError("the model returned no KV cache with use_cache=True")


def _one_repeat(model, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    device = prompt.device
    kw = _cache_kw(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache = _cache_of(out)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{kw: cache})
        cache = _cache_of(out)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - t0


def nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def measure_speed(fp_model, q_model, prompt: torch.Tensor, *, decode_tokens: int, repeats: int, warmup: int,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, info): tokens/s of both models and their ratios; ``q_model=None`` times the float model only."""
    models = {"fp": fp_model} if q_model is None else {"fp": fp_model, "q": q_model}
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    with torch.inference_mode():
        for _ in range(warmup):  # short: enough to compile (numba JIT) and allocate every code path
            for model in models.values():
                _one_repeat(model, prompt[:, :WARMUP_PREFILL], min(decode_tokens, WARMUP_DECODE))
            if progress:
                progress(1)
        for _ in range(repeats):
            for key, model in models.items():
                prefill, decode = _one_repeat(model, prompt, decode_tokens)
                times[key]["prefill"].append(prefill)
                times[key]["decode"].append(decode)
            if progress:
                progress(1)
    n_prefill = int(prompt.shape[1])
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {"prefill_tokens": n_prefill, "decode_tokens": decode_tokens, "batch": 1,
                            "repeats": repeats, "warmup": warmup, "seconds": times}
    for key in models:
        suffix = "_fp" if key == "fp" else ""
        pre, dec = times[key]["prefill"], times[key]["decode"]
        metrics[f"prefill_tps{suffix}"] = n_prefill / statistics.median(pre)
        info[f"prefill_p90_seconds{suffix}"] = nearest_rank(pre, 0.9)
        if decode_tokens:
            metrics[f"decode_tps{suffix}"] = decode_tokens / statistics.median(dec)
            info[f"decode_p90_seconds{suffix}"] = nearest_rank(dec, 0.9)
    if q_model is not None:
        metrics["prefill_tps_ratio"] = metrics["prefill_tps"] / metrics["prefill_tps_fp"]
        if decode_tokens:
            metrics["decode_tps_ratio"] = metrics["decode_tps"] / metrics["decode_tps_fp"]
    return metrics, info


def kernel_path(q_model) -> dict[str, str]:
    """Which dispatcher backend the quantized model's ``QLinear`` layers run, and what that path is."""
    from qflow.quant import dispatch
    from qflow.quant.qlinear import QLinear

    layer = next((m for m in q_model.modules() if isinstance(m, QLinear)), None)
    if layer is None:
        return {"backend": "none", "path": "float model (no quantized layers)"}
    backend = dispatch.backend_for("dequantize_packed", layer.qweight)
    device = layer.qweight.device.type
    path = CPU_PATH_NOTE if device == "cpu" else f"{device}: dequantize ({backend}) then matmul"
    return {"backend": backend, "device": device, "path": path}


def prompt_ids(ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[1, n_tokens]`` from the evaluation windows (repeated if the text is shorter)."""
    flat = ids.reshape(-1)
    reps = -(-n_tokens // flat.numel())
    return flat.repeat(reps)[:n_tokens][None].clone()
