"""Round trip and speed comparison of a qflow ONNX export (shared by the stage, tests and benchmarks).

* :func:`reference_logits` -- qflow's own quantized model (``load_quantized_model``:
  dequantized weights, or QLinear with activation fake-quant for W8A8) on token windows;
* :func:`roundtrip` -- KL(p_qflow || p_onnx), top-1 agreement and max |Δlogit| of an
  ONNX decoder over the same windows, plus a KV-cache check (prefill, then token by
  token, against the full forward);
* :func:`speed_compare` -- quantized vs float32 export of the same graph, timed
  side by side in one process (see :func:`qflow.export.onnx_bench.time_side_by_side`).

Example::

    ref = reference_logits(ckpt, ids)                       # list of [seq, vocab]
    rt = roundtrip(OnnxDecoder(make_session(path)), ids, ref)
    rt["kl"], rt["top1_agree"], rt["max_abs_diff"], rt["kv_max_abs_diff"]
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .onnx_bench import LogitComparison, OnnxDecoder, make_session, time_side_by_side


def reference_logits(ckpt: Any | None, ids, *, model_dir: str | Path | None = None,
                     progress: Callable[[], None] | None = None) -> list[np.ndarray]:
    """fp32 logits ``[seq, vocab]`` per window of qflow's model (the checkpoint, or the float model)."""
    import torch

    if ckpt is not None:
        from qflow.models.quantized import load_quantized_model

        act = any(r.spec.act_bits for r in ckpt.layers.values())
        model, _ = load_quantized_model(ckpt, dtype=torch.float32, mode="qlinear" if act else "dequant",
                                        base_dir=str(model_dir) if model_dir else None)
    else:
        from qflow.models.loading import load_model

        model, _ = load_model(model_dir, dtype="float32")
    out = []
    with torch.no_grad():
        for row in torch.as_tensor(ids):
            out.append(model(row[None].long()).logits[0].float().numpy())
            if progress:
                progress()
    del model
    return out


def roundtrip(decoder: OnnxDecoder, ids, reference: list[np.ndarray], *, kv_tokens: int = 8,
              progress: Callable[[], None] | None = None) -> dict[str, float]:
    """Compare the ONNX decoder with reference logits window by window (whole-sequence forward).

    The KV check decodes the last ``kv_tokens`` tokens of the first window one at a
    time after prefilling the rest (shared-buffer cache) and reports the largest
    |Δlogit| against the ONNX model's own full forward (``kv_max_abs_diff``) and
    against the reference (``kv_max_abs_diff_ref``).
    """
    ids = np.asarray(ids, dtype=np.int64)
    comp = LogitComparison()
    full0 = None
    for w, row in enumerate(ids):
        logits = decoder.forward(row[None])[0]
        comp.add(reference[w], logits)
        if w == 0:
            full0 = logits
        if progress:
            progress()
    res = {"kl": comp.kl, "kl_max": comp.kl_max, "top1_agree": comp.top1, "max_abs_diff": comp.max_abs,
           "n_tokens": comp.n}
    if kv_tokens > 0:
        row = ids[0]
        n = row.shape[0]
        k = min(kv_tokens, n - 1)
        decoder.start(n)
        steps = [decoder.step(row[None, : n - k])[0]]
        for t in range(n - k, n):
            steps.append(decoder.step(row[None, t:t + 1])[0])
        cached = np.concatenate(steps, axis=0)
        res["kv_max_abs_diff"] = float(np.abs(cached - full0).max())
        res["kv_max_abs_diff_ref"] = float(np.abs(cached - reference[0]).max())
    return res


def machine() -> dict[str, Any]:
    import os

    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    cpu = names[0] if names else cpu
    flags = next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    # VNNI decides onnxruntime's int8 kernel (u8s8 saturates without it), so W8A8 timings depend on it
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni"}) if flags else None
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "provider": "CPUExecutionProvider", "dtype": "float32", "batch": 1, "cpu_vnni": vnni}


def speed_compare(models: dict[str, str | Path], *, baseline: str = "fp32", threads: int | None = 1,
                  prompt_len: int = 512, gen_tokens: int = 64, warmup: int = 1, repeats: int = 3,
                  vocab: int | None = None, seed: int = 0, spinning: bool | None = None,
                  progress: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Prefill/decode latency of each model (name -> path) and its speedup over ``baseline``.

    All sessions live in one process with the same thread count and are timed
    interleaved; speedups are ratios of medians (``prefill_speedup``, ``decode_speedup``).
    Multi-threaded sessions default to no spinning: on a shared machine (other
    processes on the cores) spinning workers were measured 1.7x slower at decode.
    """
    if spinning is None:  # busy-waiting workers only pay off on otherwise idle cores
        spinning = threads == 1
    decoders = {name: OnnxDecoder(make_session(path, threads, spinning=spinning)) for name, path in models.items()}
    try:
        first = next(iter(decoders.values()))
        v = vocab or first.session.get_outputs()[0].shape[-1]
        if not isinstance(v, int):
            v = 32000
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, v, (1, prompt_len), dtype=np.int64)
        timings = time_side_by_side(decoders, prompt, gen_tokens, warmup=warmup, repeats=repeats, progress=progress)
    finally:
        del decoders
    out = {name: t.summary() for name, t in timings.items()}
    base = out[baseline]
    for name, s in out.items():
        s["prefill_speedup"] = base["prefill_ms"] / s["prefill_ms"]
        s["decode_speedup"] = base["decode_ms"] / s["decode_ms"]
        # paired per-repeat ratio of mean decode latency (robust to slow drifts of background load)
        pairs = [b / q for b, q in zip(timings[baseline].decode_run_s, timings[name].decode_run_s)]
        s["decode_speedup_paired"] = float(np.median(pairs)) if pairs else float("nan")
        pre = [b / q for b, q in zip(timings[baseline].prefill_s, timings[name].prefill_s)]
        s["prefill_speedup_paired"] = float(np.median(pre)) if pre else float("nan")
    return out
