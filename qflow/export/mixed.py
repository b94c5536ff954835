"""Can an export format hold a checkpoint's per-layer specs? Answered from ``ir.json`` alone.

A mixed checkpoint (a spec per layer: ``layers:`` overrides or an allocation plan)
maps onto each format layer by layer: compressed-tensors writes one config group
per distinct spec, GGUF one tensor type per tensor, ONNX one ``MatMulNBits`` per
linear with its own ``bits``. Where a format cannot express some layers the export
stage's ``check`` refuses before anything is written, naming those layers and the
nearest format that holds them. The rules here read only the specs (no tensors),
so preflight stays cheap; the writers keep their own per-tensor checks.

Example::

    problems = onnx_problems(Checkpoint(ir_dir))      # [] or ["3 layer(s) ... export.safetensors ..."]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.moe_adapter import MOE_MODEL_TYPES
from ..quant.layerspec import spec_text

MAX_NAMED = 6


def checkpoint_from_inputs(inputs_meta: dict[str, Any] | None, slot: str = "model"):
    """The IR ``Checkpoint`` of a cached quantized input (None for a float model or one not computed yet)."""
    ref = (inputs_meta or {}).get(slot)
    ir_dir = getattr(ref, "ir_dir", None) if ref is not None and not isinstance(ref, dict) else None
    if ir_dir is None:
        return None
    from ..quant.ir import Checkpoint

    try:
        return Checkpoint(ir_dir)
    except (OSError, ValueError):
        return None   # a damaged input is reported by the stage that reads it


def family_problems(ckpt, fmt: str, families: tuple[str, ...]) -> list[str]:
    """Why ``fmt`` cannot carry ``ckpt``'s model family (empty when it can, or the base config is unreadable)."""
    return folder_family_problems(ckpt.base_model, fmt, families)


def folder_family_problems(folder, fmt: str, families: tuple[str, ...]) -> list[str]:
    """``family_problems`` of the Hugging Face model folder ``folder`` (a float model, or an IR's base)."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return []
    family = config.get("model_type")
    if family in families:
        return []
    if family in MOE_FAMILIES:
        return [moe_export_problem(fmt, family)]
    return [f"{fmt} carries the {', '.join(families)} architecture only; the base model is {family!r} "
            f"(fix: export this model with export.safetensors)"]


# mixture-of-experts families: qflow quantizes their experts as separate linears (docs/METHODS.md §4.2);
# export.safetensors' compressed-tensors layout writes them per expert under the family's checkpoint names
# (qflow/export/moe_names.py), which transformers re-fuses on load and vLLM reads expert by expert
MOE_FAMILIES = MOE_MODEL_TYPES


def moe_export_problem(fmt: str, family: str) -> str:
    """The refusal of an export format that cannot carry mixture-of-experts ``family``, naming those that do."""
    from .gguf_writer import GGUF_FAMILIES

    gguf_moe = [f for f in GGUF_FAMILIES if f in MOE_FAMILIES]
    via_gguf = (f"export.gguf (llama.cpp's layout, for {', '.join(gguf_moe)})" if family in gguf_moe else
                f"export.gguf writes only {', '.join(gguf_moe)} of the MoE families")
    head = (f"{fmt} does not write {family!r} mixture-of-experts checkpoints (it has no per-expert layout); "
            f"fix: export it with export.safetensors, layout: compressed-tensors, which writes every expert and "
            f"loads in transformers and vLLM")
    other = f", or with {via_gguf}" if family in gguf_moe else f" ({via_gguf})"
    return head + other + ", or evaluate the IR with evaluate.lm"


def moe_problems(ckpt, fmt: str, layout: str | None = None) -> list[str]:
    """Why ``fmt`` (``layout``) cannot write ``ckpt`` when its base model is a mixture of experts (empty
    otherwise, and for export.safetensors' compressed-tensors layout)."""
    import json

    try:
        family = json.loads((Path(ckpt.base_model) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    if family not in MOE_FAMILIES or layout == "compressed-tensors":
        return []
    if layout is not None:
        return [f"layout {layout} does not write mixture-of-experts checkpoints (the base model is {family!r}: "
                "AutoAWQ / GPTQ loaders have no per-expert layout qflow can check); fix: layout: compressed-tensors"]
    return [moe_export_problem(fmt, family)]


def _listing(bad: dict[str, str]) -> str:
    items = [f"{name} ({why})" for name, why in list(bad.items())[:MAX_NAMED]]
    more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
    return ", ".join(items) + more


def safetensors_problems(ckpt, layout: str, on_unsupported: str = "error") -> list[str]:
    """Why ``layout`` cannot hold ``ckpt``'s per-layer specs (empty when it can)."""
    layers = ckpt.layers
    int_layers = {n: r for n, r in layers.items() if r.spec.format == "int"}
    problems = moe_problems(ckpt, "export.safetensors", layout)
    if on_unsupported == "error":
        lookup = {n: spec_text(r.spec) for n, r in layers.items() if r.spec.format != "int"}
        if lookup:
            problems.append(f"layout {layout} has no lookup-table (nf4/fp4) weights: {_listing(lookup)}; nearest "
                            "format that holds them: export.gguf (re-quantized, SQNR reported), or set "
                            "on_unsupported: float")
    if layout == "awq-gemm":
        if on_unsupported == "error":
            bad = {n: spec_text(r.spec) for n, r in int_layers.items()
                   if r.spec.bits != 4 or r.spec.group_size <= 0 or r.g_idx}
            if bad:
                problems.append(f"layout awq-gemm holds 4-bit grouped layers only: {_listing(bad)}; nearest format "
                                "that holds them: layout: compressed-tensors (one config group per spec)")
        groups = sorted({r.spec.group_size for r in int_layers.values()})
        if len(groups) > 1:
            problems.append(f"AutoAWQ's config has one group_size; the layers use {groups} "
                            f"({_per_spec(int_layers)}); nearest format that holds them: layout: compressed-tensors")
    elif layout == "gptq":
        keyed = sorted({(r.spec.bits, r.spec.group_size) for r in int_layers.values()})
        if len(keyed) > 1:
            problems.append(f"a GPTQ config has one bits/group_size; the layers use {keyed} "
                            f"({_per_spec(int_layers)}); nearest format that holds them: layout: compressed-tensors "
                            "(one config group per spec)")
    return problems


def _per_spec(layers: dict[str, Any]) -> str:
    groups: dict[str, list[str]] = {}
    for name, rec in layers.items():
        groups.setdefault(spec_text(rec.spec), []).append(name)
    parts = []
    for text, names in groups.items():
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        parts.append(f"{text}: {shown}")
    return "; ".join(parts)


def onnx_layer_problem(spec) -> str | None:
    """Why a layer under ``spec`` has no onnxruntime node in qflow's ONNX export (None: it has one)."""
    from .onnx_weights import NBITS_SUPPORTED

    if spec.format != "int":
        return f"{spec.format} is a lookup table; MatMulNBits holds integer codes"
    if spec.act_bits:
        if spec.act_bits != 8 or spec.bits != 8 or not spec.symmetric or spec.group_size > 0:
            return "activation quantization exports as W8A8 only (8-bit symmetric per-channel weights)"
        return None
    if spec.bits not in NBITS_SUPPORTED:
        return f"{spec.bits}-bit weights have no MatMulNBits kernel (onnxruntime runs bits {NBITS_SUPPORTED})"
    if spec.group_size <= 0:
        return "per-channel/per-tensor scales have no MatMulNBits block size"
    if spec.group_size < 16 or spec.group_size & (spec.group_size - 1):
        return f"MatMulNBits block_size must be a power of two >= 16, not {spec.group_size}"
    if spec.zero_float:
        return "float zero points (HQQ) have no exact MatMulNBits form"
    return None


def onnx_problems(ckpt) -> list[str]:
    """Why qflow's ONNX export cannot hold ``ckpt``'s per-layer specs (empty when it can)."""
    bad = {}
    for name, rec in ckpt.layers.items():
        why = onnx_layer_problem(rec.spec)
        if why:
            bad[name] = f"{spec_text(rec.spec)}: {why}"
    if not bad:
        return []
    lookup = any(ckpt.layers[n].spec.format != "int" for n in bad)
    nearest = ("export.gguf (re-quantizes lookup formats; integer codes exactly)" if lookup else
               "export.safetensors with layout: compressed-tensors (every 2-8 bit integer spec, one config "
               "group per spec) or export.gguf")
    return [f"the ONNX export cannot hold {len(bad)} layer(s): {_listing(bad)}; nearest format that holds them: "
            f"{nearest}; or re-quantize those layers with layers: overrides (e.g. bits: 4, group_size: 32)"]
