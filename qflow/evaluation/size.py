"""Size and bits per weight of a model or a quantized checkpoint (docs/METHODS.md §11 "Size / bpw").

Convention: a deployed model holds its quantized layers as stored (codes, scales,
zeros, g_idx) and every other floating-point tensor (embeddings, norms, head,
unquantized linears; tied tensors once) at the **deployment dtype** ``float_dtype``
(float16 unless the stage says otherwise), whatever dtype the base folder stores
(a float32 folder would otherwise inflate ``bpw_model`` by ~1.5x). Non-float tensors
count at their stored size.

* ``size_bytes_deploy``: estimated deployment bytes under that convention.
* ``size_bytes_checkpoint``: measured bytes on disk of what was evaluated — the
  quantized checkpoint's IR folder (packed codes, scales, zeros, g_idx, changed
  float tensors, index); for a float model, its ``*.safetensors`` files. (An export
  stage's own ``size_bytes`` is the measured size of that export's files.)
* ``bpw_quantized``: nominal spec accounting over quantized layers
  (``Checkpoint.bpw_quantized``: bits + scale/zero bits per group [+ g_idx]);
  ``bpw_quantized_measured`` = 8 · stored bytes of those layers / their weights.
* mixed checkpoints (a spec per layer): both bpw figures are totals over every
  quantized layer (total bits / total quantized weights), not means of per-layer
  bpw; ``info["quantized_specs"]`` breaks them down per distinct spec.
* ``bpw_model`` = 8 · size_bytes_deploy / all parameters; ``compression_vs_fp16`` /
  ``_fp32`` = (2 or 4 bytes · all parameters) / size_bytes_deploy.

Example::

    metrics, info = size_metrics(base_dir, Checkpoint(ir_dir), float_dtype="float16")
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DEPLOY_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def safetensors_index(model_dir: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "numel", "nbytes"}}`` over every ``*.safetensors`` file (headers only)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = {"dtype": info["dtype"], "numel": math.prod(info["shape"]), "nbytes": end - start}
    return out


def size_metrics(model_dir: Path, ckpt=None, *, float_dtype: str = "float16") -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, info) for the float model in ``model_dir``, or for ``ckpt`` applied over it."""
    if float_dtype not in DEPLOY_BYTES:
        raise ValueError(f"float_dtype must be one of {sorted(DEPLOY_BYTES)}, got {float_dtype!r}")
    index = safetensors_index(model_dir)
    if not index:
        return {}, {"size": f"no *.safetensors files in {model_dir}: size not measured"}
    n_params = sum(t["numel"] for t in index.values())
    stored_dtypes: dict[str, int] = {}
    deploy_bytes = 0
    quantized = {f"{name}.weight" for name in (ckpt.layers if ckpt is not None else {})}
    for name, t in index.items():
        if name in quantized:
            continue
        deploy_bytes += t["numel"] * DEPLOY_BYTES[float_dtype] if t["dtype"] in _FLOAT_DTYPES else t["nbytes"]
        stored_dtypes[t["dtype"]] = stored_dtypes.get(t["dtype"], 0) + t["numel"]
    metrics: dict[str, float] = {"n_params": float(n_params)}
    info: dict[str, Any] = {
        "convention": (f"deployment size: quantized layers as stored, unquantized float tensors at {float_dtype} "
                       f"(stage option float_dtype), other tensors as stored"),
        "float_dtype": float_dtype,
        "unquantized_stored_dtypes": stored_dtypes}
    if ckpt is not None:
        missing = sorted(quantized - set(index))
        if missing:
            info["size_warning"] = f"{len(missing)} quantized weights not found in the base files (e.g. {missing[0]})"
        breakdown = spec_breakdown(ckpt)
        q_bytes = int(sum(row["bytes"] for row in breakdown.values()))   # == ckpt.quantized_bytes(), read once
        n_q = ckpt.n_quantized_weights()
        deploy_bytes += q_bytes
        info["quantized_specs"] = breakdown
        metrics |= {"size_bytes_checkpoint": float(ckpt.size_bytes()), "quantized_bytes": float(q_bytes),
                    "n_quantized_weights": float(n_q), "bpw_quantized": ckpt.bpw_quantized(),
                    "bpw_quantized_measured": 8.0 * q_bytes / max(n_q, 1)}
    else:
        metrics["size_bytes_checkpoint"] = float(sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")))
    metrics |= {"size_bytes_deploy": float(deploy_bytes), "bpw_model": 8.0 * deploy_bytes / n_params,
                "compression_vs_fp16": 2.0 * n_params / deploy_bytes,
                "compression_vs_fp32": 4.0 * n_params / deploy_bytes}
    return metrics, info


def spec_breakdown(ckpt) -> dict[str, dict[str, float]]:
    """Per distinct spec of ``ckpt``: layers, weights, stored bytes, nominal and measured bpw."""
    from qflow.quant.layerspec import spec_text

    out: dict[str, dict[str, float]] = {}
    for name, rec in ckpt.layers.items():
        row = out.setdefault(spec_text(rec.spec), {"layers": 0, "weights": 0, "bytes": 0, "bits": 0.0})
        n = rec.out_features * rec.in_features
        row["layers"] += 1
        row["weights"] += n
        row["bytes"] += ckpt.layer_bytes(name)
        row["bits"] += rec.bpw() * n
    for row in out.values():
        row["bpw"] = row.pop("bits") / max(row["weights"], 1)
        row["bpw_measured"] = 8.0 * row["bytes"] / max(row["weights"], 1)
    return out
