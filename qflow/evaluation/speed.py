"""Prefill and decode throughput of the float model and of qflow's *reference path*, side by side.

The quantized model runs through ``QLinear`` with ``cache_weight=False``: every
forward dequantizes its packed weights (``dequantize_packed``: CUDA on a GPU when
built, numba on CPU, torch last) and then multiplies in float. This is qflow's
**reference path**, not a deployment kernel: on CPU there is no fused int4 GEMM,
so it is *slower* than the float model and says nothing about how fast an
exported model runs (``export.onnx`` times a deployment runtime). Hence the
metric names (``*_tps_refpath``) and no quantized/float "speed ratio".

One repeat = a prefill of ``prefill_tokens`` (batch 1, KV cache built, logits of
the last position only) then
``decode_tokens`` greedy steps with the KV cache, timed separately. Float and
quantized repeats alternate (their order swapped every round) so that load on a
shared machine hits both alike; ``warmup`` short untimed repeats come first (they
compile the numba kernels and allocate every code path).

Repeats are adaptive (:class:`RepeatPolicy`): rounds continue until the 95%
confidence interval of every series' median is within ``target_rel_ci`` of the
median (half-width / median), or the time budget or ``max_repeats`` runs out.
The CI is distribution-free (order statistics of a Binomial(n, 1/2), exact), so
it needs at least 6 samples; a series that stops wider than the target, or with
fewer samples, is labelled ``noisy``. Reported per series: samples, median,
its CI, the interquartile range relative to the median (spread), min and max,
and p90 only from 10 samples on (below that the nearest-rank p90 is the maximum).

Example::

    metrics, info = measure_speed(fp_model, q_model, prompt, decode_tokens=32, warmup=1,
                                  policy=RepeatPolicy(budget_seconds=30))
    info["series"]["decode_refpath"]["noisy"]
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

WARMUP_PREFILL = 64     # tokens of a warm-up prefill
WARMUP_DECODE = 4       # decode steps of a warm-up
CI_LEVEL = 0.95
MIN_CI_SAMPLES = 6      # smallest n whose order-statistic interval of the median reaches 95% coverage
MIN_P90_SAMPLES = 10    # below this the nearest-rank p90 is the maximum
REFERENCE_PATH = "qflow reference path (QLinear: dequantize every forward, then float matmul)"
CPU_PATH_NOTE = ("CPU: dequantize-then-matmul reference path (no fused int4 GEMM kernel on CPU; "
                 "slower than float; not a deployment speed)")


@dataclass(frozen=True)
class RepeatPolicy:
    """How many timed rounds: adaptive (``fixed=None``) or exactly ``fixed``.

    Adaptive: at least ``min_repeats`` rounds, then stop as soon as every series'
    median CI half-width is ``<= target_rel_ci`` of its median, or when
    ``budget_seconds`` of timed rounds have passed, or at ``max_repeats``.
    """

    min_repeats: int = MIN_CI_SAMPLES
    max_repeats: int = 100
    budget_seconds: float = 20.0
    target_rel_ci: float = 0.05
    fixed: int | None = None


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


def _one_repeat(model, prompt: torch.Tensor, decode_tokens: int,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    device = prompt.device
    kw = _cache_kw(model)
    # the prefill needs only the last position's logits (as a runtime computes them); all of them would
    # add a vocab x hidden matmul per prompt token and [1, L, vocab] floats
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}
    _sync(device)
    t0 = clock()
    out = model(input_ids=prompt, use_cache=True, **keep)
    _sync(device)
    prefill = clock() - t0
    cache = _cache_of(out)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = clock()
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{kw: cache})
        cache = _cache_of(out)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, clock() - t0


def nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def median_ci(values: list[float], level: float = CI_LEVEL) -> tuple[float, float]:
    """Distribution-free CI of the median: ``(x_(j), x_(n+1-j))`` with the largest ``j`` whose exact
    Binomial(n, 1/2) coverage ``1 - 2·P(B <= j-1)`` is ``>= level``; ``(nan, nan)`` when no ``j`` reaches it."""
    s = sorted(values)
    n = len(s)
    best = 0
    tail = 0.0                      # P(B <= j-1)
    for j in range(1, n // 2 + 1):
        tail += math.comb(n, j - 1) / 2.0 ** n
        if 1.0 - 2.0 * tail < level:
            break
        best = j
    if best == 0:
        return math.nan, math.nan
    return s[best - 1], s[n - best]


def series_stats(seconds: list[float], tokens: int, target_rel_ci: float) -> dict[str, Any]:
    """Median, CI, spread and the ``noisy`` label of one timed series (seconds per repeat)."""
    n = len(seconds)
    med = statistics.median(seconds)
    low, high = median_ci(seconds)
    rel_ci = (high - low) / (2.0 * med) if n >= MIN_CI_SAMPLES and med > 0 else math.inf
    q1, q3 = med, med
    if n >= 2:
        quartiles = statistics.quantiles(seconds, n=4, method="inclusive")
        q1, q3 = quartiles[0], quartiles[2]
    out: dict[str, Any] = {
        "samples": n, "median_seconds": med, "ci_low_seconds": low, "ci_high_seconds": high,
        "rel_ci_half_width": rel_ci, "iqr_rel": (q3 - q1) / med if med > 0 else math.nan,
        "min_seconds": min(seconds), "max_seconds": max(seconds),
        "tps": tokens / med if med > 0 else math.inf,
        # the CI of tokens/s is the CI of seconds mapped through tokens / t (monotone: bounds swap)
        "tps_ci_low": tokens / high if high == high and high > 0 else math.nan,
        "tps_ci_high": tokens / low if low == low and low > 0 else math.nan,
        "noisy": not rel_ci <= target_rel_ci,
    }
    if n >= MIN_P90_SAMPLES:
        out["p90_seconds"] = nearest_rank(seconds, 0.9)
    return out


def _converged(times: dict[str, list[float]], target: float) -> bool:
    for seconds in times.values():
        if len(seconds) < MIN_CI_SAMPLES:
            return False
        low, high = median_ci(seconds)
        if not (high - low) / (2.0 * statistics.median(seconds)) <= target:
            return False
    return True


def measure_speed(fp_model, q_model, prompt: torch.Tensor, *, decode_tokens: int, warmup: int,
                  policy: RepeatPolicy = RepeatPolicy(), progress: Callable[[int], None] | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, info): tokens/s of the float model and of the reference path; ``q_model=None`` times float only.

    Metrics: ``prefill_tps_fp``, ``decode_tps_fp``, ``prefill_tps_refpath``, ``decode_tps_refpath``
    (medians), ``speed_samples``, ``speed_noisy`` (1 when any series is noisy), ``speed_rel_ci_max``.
    ``clock`` times every repeat and the budget (``time.perf_counter``; tests pass a deterministic one).
    """
    models = {"fp": fp_model} if q_model is None else {"fp": fp_model, "refpath": q_model}
    phases = ("prefill", "decode") if decode_tokens else ("prefill",)
    times: dict[str, list[float]] = {f"{ph}_{k}": [] for k in models for ph in phases}
    rounds, stop = 0, "fixed"
    with torch.inference_mode():
        for _ in range(warmup):  # short: enough to compile (numba JIT) and allocate every code path
            for model in models.values():
                _one_repeat(model, prompt[:, :WARMUP_PREFILL], min(decode_tokens, WARMUP_DECODE))
        t_start = clock()
        while True:
            order = list(models.items())
            if rounds % 2:  # swap the order every round: drifts in load hit both models alike
                order.reverse()
            for key, model in order:
                prefill, decode = _one_repeat(model, prompt, decode_tokens, clock)
                times[f"prefill_{key}"].append(prefill)
                if decode_tokens:
                    times[f"decode_{key}"].append(decode)
            rounds += 1
            if progress:
                progress(1)
            if policy.fixed is not None:
                if rounds >= policy.fixed:
                    break
                continue
            if rounds >= policy.min_repeats and _converged(times, policy.target_rel_ci):
                stop = "converged"
                break
            if rounds >= policy.max_repeats:
                stop = "max_repeats"
                break
            if clock() - t_start >= policy.budget_seconds:
                stop = "budget"
                break
    n_prefill = int(prompt.shape[1])
    series = {name: series_stats(sec, n_prefill if name.startswith("prefill") else decode_tokens,
                                 policy.target_rel_ci) for name, sec in times.items()}
    metrics: dict[str, float] = {}
    for name, st in series.items():
        phase, key = name.split("_", 1)
        metrics[f"{phase}_tps_{key}"] = st["tps"]
    noisy = [name for name, st in series.items() if st["noisy"]]
    metrics["speed_samples"] = float(rounds)
    metrics["speed_noisy"] = float(bool(noisy))
    rel = [st["rel_ci_half_width"] for st in series.values()]
    if all(math.isfinite(r) for r in rel):
        metrics["speed_rel_ci_max"] = max(rel)
    info: dict[str, Any] = {
        "measures": REFERENCE_PATH if q_model is not None else "float model only",
        "prefill_tokens": n_prefill, "decode_tokens": decode_tokens, "batch": 1, "warmup": warmup,
        "rounds": rounds, "stop": stop, "policy": asdict(policy), "noisy_series": noisy,
        "label": _label(rounds, stop, noisy, policy), "series": series, "seconds": times,
    }
    return metrics, info


def _label(rounds: int, stop: str, noisy: list[str], policy: RepeatPolicy) -> str:
    """One line for the report and the log: how many samples, and whether the medians can be quoted."""
    target = f"{100 * policy.target_rel_ci:g}%"
    if not noisy:
        return f"{rounds} samples per series; every median's 95% CI within {target} ({stop})"
    why = (f"fewer than {MIN_CI_SAMPLES} samples give no 95% CI of the median" if rounds < MIN_CI_SAMPLES
           else f"95% CI of the median wider than {target}")
    return f"NOISY: {', '.join(noisy)} after {rounds} samples (stopped: {stop}; {why})"


def kernel_path(q_model) -> dict[str, str]:
    """Which dispatcher backend the quantized model's ``QLinear`` layers run, and what that path is."""
    from qflow.quant import dispatch
    from qflow.quant.qlinear import QLinear

    layer = next((m for m in q_model.modules() if isinstance(m, QLinear)), None)
    if layer is None:
        return {"backend": "none", "path": "float model (no quantized layers)"}
    backend = dispatch.backend_for("dequantize_packed", layer.qweight)
    device = layer.qweight.device.type
    path = (CPU_PATH_NOTE if device == "cpu"
            else f"{device}: dequantize ({backend}) then matmul, reference path (not a deployment speed)")
    return {"backend": backend, "device": device, "path": path}


def prompt_ids(ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[1, n_tokens]`` from the evaluation windows (repeated if the text is shorter)."""
    flat = ids.reshape(-1)
    reps = -(-n_tokens // flat.numel())
    return flat.repeat(reps)[:n_tokens][None].clone()
