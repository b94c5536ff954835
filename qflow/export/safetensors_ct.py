"""Export the IR as a Hugging Face folder in a quantized safetensors layout.

    report = export_hf_folder(Checkpoint(ir_dir), out_dir, layout="compressed-tensors")

``out_dir`` receives ``config.json`` (the base model's config plus
``quantization_config`` and a ``qflow`` section), ``model.safetensors`` (or
shards + index), the tokenizer files and ``generation_config.json`` of the base
model. Layouts (docs/METHODS.md §2):

``compressed-tensors``  ``pack-quantized`` (§2.5): vLLM and transformers load it
``awq-gemm``            AutoAWQ GEMM (§2.3), ``quant_method: awq``, ``version: gemm``
``gptq``                GPTQ v1 (§2.4) ``quant_method: gptq`` (``checkpoint_format: gptq``);
                        ``gptq_v2`` when zero points of 0 must be kept exactly

Every quantized layer is mapped by :mod:`qflow.export.mapping` and then decoded
again by :mod:`qflow.export.readers`; a layer reported ``exact`` is checked to
decode to the IR's dequantized weight bit for bit (a mismatch is a bug and
raises). ``rounded`` layers report their SQNR against the IR.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qflow.errors import StageError
from qflow.quant.sqnr import sqnr_db

from . import mapping, readers

LAYOUTS = ("compressed-tensors", "awq-gemm", "gptq")
MAX_SHARD_BYTES = 4 * 2**30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class ExportError(StageError):
    """The export cannot be written as asked (the message says why and what to change)."""


def model_dtype(base_dir: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def linear_module_names(config_dir: Path) -> list[str]:
    """Names of every ``nn.Linear`` in the model (built on the meta device: no weights)."""
    import torch
    from transformers import AutoConfig

    from qflow.models.encoders import auto_model_class

    from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

    remote = remote_code_allowed()   # only the command line's --trust-remote-code, never a recipe
    with remote_code_refusal(str(config_dir)):
        config = AutoConfig.from_pretrained(config_dir, local_files_only=True, trust_remote_code=remote)
        with torch.device("meta"):
            model = auto_model_class(config).from_config(config, trust_remote_code=remote)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _torch(arr: np.ndarray, dtype: str | None = None):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype is not None and t.is_floating_point():
        t = t.to(getattr(torch, dtype))
    return t


def _map_layer(layer: mapping.IRLayer, layout: str, dtype: str, on_inexact: str, gptq_format: str) -> mapping.Mapped:
    if layout == "compressed-tensors":
        return mapping.to_compressed_tensors(layer, dtype, on_inexact)
    if layout == "awq-gemm":
        return mapping.to_awq_gemm(layer, on_inexact)
    fmt = gptq_format
    if fmt == "auto":
        fmt = "gptq"
        if not layer.spec.symmetric and layer.spec.format == "int":
            _, z = layer.per_channel_params()
            if np.any(np.rint(z) < 1):
                fmt = "gptq_v2"
    return mapping.to_gptq(layer, fmt, on_inexact)


def _decode(mapped: mapping.Mapped, layout: str) -> np.ndarray:
    t = mapped.tensors
    if mapped.status == "float":
        return t["weight"]
    if layout == "compressed-tensors":
        return readers.decode_compressed_tensors(t, mapped.scheme["weights"], mapped.scheme["format"])
    if layout == "awq-gemm":
        return readers.decode_awq_gemm(t, mapped.scheme["group_size"])
    return readers.decode_gptq(t, mapped.scheme["bits"], v1=mapped.scheme["checkpoint_format"] == "gptq")


def _gptq_auto_format(ckpt) -> str:
    """``gptq`` (v1) unless some asymmetric group has zero point 0, which v1 cannot store."""
    for name, rec in ckpt.layers.items():
        if rec.spec.format == "int" and not rec.spec.symmetric:
            _, _, zero = ckpt.params(name)
            if bool((zero.round() < 1).any()):
                return "gptq_v2"
    return "gptq"


def _map_checked(ckpt, name: str, layout: str, dtype: str, on_unsupported: str, on_inexact: str,
                 gptq_format: str) -> tuple[mapping.Mapped, float]:
    """Map one layer, decode it back, check exactness; returns (mapped, SQNR vs the IR in dB)."""
    rec = ckpt.layers[name]
    layer = mapping.load_ir_layer(ckpt, name)
    ir_w = layer.dequantized()
    try:
        try:
            m = _map_layer(layer, layout, dtype, "error" if on_inexact in ("error", "float") else "round",
                           gptq_format)
        except mapping.Inexact as err:
            if on_inexact == "error":
                raise ExportError(f"{err}; set on_inexact: round (report the extra error) or float") from err
            m = mapping.to_float(layer, str(err))
    except mapping.Unsupported as err:
        if on_unsupported != "float":
            raise ExportError(f"{name} ({_spec_text(rec.spec)}) cannot be written in the {layout} layout: {err}. "
                              "Set on_unsupported: float to keep such layers as float weights, or choose "
                              "another layout") from err
        m = mapping.to_float(layer, str(err))
    decoded = _decode(m, layout)
    q = sqnr_db(ir_w, decoded)
    if m.status in ("exact", "float") and not np.array_equal(decoded.astype(np.float32), ir_w):
        raise RuntimeError(f"qflow bug: {name} maps {m.status} to {layout} but does not decode to the IR weight "
                           f"(SQNR {q:.1f} dB)")
    return m, q


def _router_as_float(ckpt, name: str) -> tuple[mapping.Mapped, float]:
    """A quantized MoE router (``moe_quantize_router``) written as its dequantized weight: transformers
    and vLLM build routers as float modules, so no loader reads quantized router tensors."""
    m = mapping.to_float(mapping.load_ir_layer(ckpt, name), "MoE routers load as float modules in transformers "
                                                             "and vLLM; the IR's dequantized weight is written")
    return m, math.inf


def plan_layers(ckpt, layout: str, dtype: str = "float32", gptq_format: str = "auto",
                names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """How each IR layer (or each of ``names``) maps onto ``layout``, without writing:
    {name: {status, notes, sqnr_db}}; ``status`` is exact, rounded or unsupported.
    """
    if layout == "gptq" and gptq_format == "auto":
        gptq_format = _gptq_auto_format(ckpt)
    out = {}
    for name in names or ckpt.layers:
        try:
            m, q = _map_checked(ckpt, name, layout, dtype, "error", "round", gptq_format)
            out[name] = {"status": m.status, "notes": m.notes, "sqnr_db": q}
        except ExportError as err:
            out[name] = {"status": "unsupported", "notes": [str(err)], "sqnr_db": None}
    return out


def export_hf_folder(ckpt, out_dir: str | Path, *, layout: str = "compressed-tensors", dtype: str = "auto",
                     on_unsupported: str = "error", on_inexact: str = "round", gptq_format: str = "auto",
                     qflow_meta: dict[str, Any] | None = None,
                     progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write ``ckpt`` (a ``qflow.quant.ir.Checkpoint``) as an HF folder; returns the mapping report.

    ``on_unsupported``: ``error`` (default) or ``float`` (write the dequantized weight
    as a plain Linear, listed as unquantized). ``on_inexact``: ``round`` (default; the
    extra error is reported), ``error``, or ``float``. ``gptq_format``: ``auto`` (v1
    unless a zero point of 0 needs v2), ``gptq`` (v1; zeros of 0 clamped to 1) or
    ``gptq_v2``. Layers are mapped and written one at a time, in the base model's order.
    """
    from qflow import __version__
    from qflow.models.shards import ShardWriter

    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(ckpt.base_model)
    dtype = model_dtype(base, dtype)
    qflow_meta = dict(qflow_meta or {})
    if layout == "gptq" and gptq_format == "auto":
        gptq_format = _gptq_auto_format(ckpt)

    layer_specs = {n: r.spec.model_dump(mode="json") for n, r in ckpt.layers.items()}
    meta = {"format": "pt", "qflow_version": __version__, "qflow_layout": layout,
            "qflow_recipe_key": str(qflow_meta.get("recipe_key") or ""),
            "qflow_method": ckpt.method, "qflow_layers": json.dumps(layer_specs, sort_keys=True, separators=(",", ":"))}
    writer = ShardWriter(out_dir, max_bytes=MAX_SHARD_BYTES, metadata=meta)
    report_layers, schemes, notes = _write_tensors(writer, ckpt, layout, dtype, on_unsupported, on_inexact,
                                                   gptq_format, layer_specs, progress)
    missing = sorted(set(ckpt.layers) - set(report_layers))
    if missing:
        raise ExportError(f"the base model {base} has no weight for IR layers {missing[:3]}")
    shard_files = writer.close()

    quantized = {n: s for n, s in schemes.items() if s is not None}
    linears = linear_module_names(base)
    from .moe_names import base_family, export_name, is_moe

    family = base_family(ckpt)
    if is_moe(family):   # experts and routers are no nn.Linear in transformers 5: named as the files name them
        from qflow.quant.weights import linear_names

        linears = [export_name(n, family) for n in dict.fromkeys(linears + linear_names(base))]
        quantized = {export_name(n, family): s for n, s in quantized.items()}
    unquantized_linears = [n for n in linears if n not in quantized]
    qcfg = _quantization_config(layout, quantized, unquantized_linears)

    counts = {s: sum(r["status"] == s for r in report_layers.values()) for s in ("exact", "rounded", "float")}
    _write_config(out_dir, base, dtype, qcfg, {
        "version": __version__, "layout": layout, "method": ckpt.method,
        "recipe_key": qflow_meta.get("recipe_key"), "base_model": str(base),
        **{k: v for k, v in qflow_meta.items() if k != "recipe_key"},
        "mapping": counts,
        "layers": {n: {"spec": r["spec"], "status": r["status"]} for n, r in report_layers.items()}})
    for fname in TOKENIZER_FILES:
        if (base / fname).is_file():
            shutil.copy2(base / fname, out_dir / fname)
    finite = [r["sqnr_db"] for r in report_layers.values() if math.isfinite(r["sqnr_db"])]
    return {"layout": layout, "dtype": dtype, "files": shard_files, "layers": report_layers,
            "n_exact": counts["exact"], "n_rounded": counts["rounded"], "n_float": counts["float"],
            "min_sqnr_db": min(finite) if finite else math.inf, "notes": notes,
            "unquantized": unquantized_linears, "quantization_config": qcfg}


def _write_tensors(writer, ckpt, layout: str, dtype: str, on_unsupported: str, on_inexact: str, gptq_format: str,
                   layer_specs: dict[str, Any], progress: Callable[[], None] | None):
    """Every base-model tensor into ``writer`` in the base's order, IR layers mapped to ``layout``.

    Returns (per-layer report, scheme per layer (None: written float), notes).
    """
    import torch

    from qflow.quant.expert_names import is_router

    from .moe_names import base_family, export_name, is_moe, logical_base_tensors

    report_layers: dict[str, dict[str, Any]] = {}
    schemes: dict[str, dict[str, Any] | None] = {}
    notes: list[str] = []
    family = base_family(ckpt)
    if is_moe(family):   # per-expert tensors under the family's checkpoint names (qflow/export/moe_names.py)
        tensors = ((export_name(name, family), module, read) for name, module, read in logical_base_tensors(ckpt))
    else:
        tensors = ((key, module, lambda key=key, h=h: mapping.float_tensor(ckpt, key, h))
                   for key, module, h in mapping.base_tensors(ckpt))
    for key, module, read in tensors:
        if module is not None:
            if is_moe(family) and is_router(module):
                m, q = _router_as_float(ckpt, module)
            else:
                m, q = _map_checked(ckpt, module, layout, dtype, on_unsupported, on_inexact, gptq_format)
            stored = export_name(module, family)
            for suffix, arr in m.tensors.items():
                store = None
                if (suffix == "weight" and m.status == "float") or suffix == "weight_scale":
                    store = dtype  # compressed-tensors scales live in the model dtype
                writer.add(f"{stored}.{suffix}", _torch(arr, store))
            schemes[module] = m.scheme if m.status != "float" else None
            notes += m.notes
            report_layers[module] = {"status": m.status, "spec": layer_specs[module], "sqnr_db": q, "notes": m.notes}
            if progress:
                progress()
            continue
        t = read()
        if t.is_floating_point():
            t = t.to(getattr(torch, dtype))
        writer.add(key, t)
    return report_layers, schemes, notes


def _write_config(out_dir: Path, base: Path, dtype: str, quantization_config: dict[str, Any],
                  qflow_section: dict[str, Any]) -> None:
    """The base model's config.json with the export's dtype, ``quantization_config`` and ``qflow`` section."""
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    cfg["quantization_config"] = quantization_config
    cfg["qflow"] = qflow_section
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _spec_text(spec) -> str:
    if spec.format != "int":
        return f"{spec.format} g{spec.group_size}"
    return f"int{spec.bits} g{spec.group_size} {spec.scheme}{' zero_float' if spec.zero_float else ''}"


def _quantization_config(layout: str, quantized: dict[str, dict[str, Any]],
                         unquantized: list[str]) -> dict[str, Any]:
    if layout == "compressed-tensors":
        return _ct_config(quantized, unquantized)
    if layout == "awq-gemm":
        group_sizes = {s["group_size"] for s in quantized.values()}
        if len(group_sizes) > 1:
            raise ExportError(f"AutoAWQ's config has one group_size; the layers use {sorted(group_sizes)}. "
                              "Use layout: compressed-tensors for mixed group sizes")
        return {"quant_method": "awq", "bits": 4, "group_size": group_sizes.pop() if group_sizes else 128,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": unquantized or None}
    keyed = {(s["bits"], s["group_size"]) for s in quantized.values()}
    if len(keyed) > 1:
        raise ExportError(f"a GPTQ config has one bits/group_size; the layers use {sorted(keyed)}. "
                          "Use layout: compressed-tensors for mixed precision")
    bits, group_size = keyed.pop() if keyed else (4, 128)
    formats = {s["checkpoint_format"] for s in quantized.values()} or {"gptq"}
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
            "sym": all(s["sym"] for s in quantized.values()),
            "desc_act": any(s["desc_act"] for s in quantized.values()),
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
            "checkpoint_format": formats.pop(), "model_file_base_name": "model"}
    in_blocks = [n for n in unquantized if ".layers." in n]
    if in_blocks:  # GPTQModel's per-module exclusion
        import re

        qcfg["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in in_blocks}
    return qcfg


def _ct_config(quantized: dict[str, dict[str, Any]], unquantized: list[str]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    for name, scheme in quantized.items():
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, scheme)
        members.setdefault(key, []).append(name)
    config_groups = {}
    single = len(groups) == 1
    for i, (key, scheme) in enumerate(groups.items()):
        weights = {k: v for k, v in scheme["weights"].items()}
        weights.setdefault("observer", "minmax")
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else members[key],
            "weights": weights,
            "input_activations": scheme["input_activations"],
            "output_activations": None,
            "format": scheme["format"],
        }
    formats = {s["format"] for s in groups.values()}
    try:
        from importlib.metadata import version

        ct_version = version("compressed-tensors")
    except Exception:  # noqa: BLE001 - informational only
        ct_version = None
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(unquantized),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": ct_version,
    }
