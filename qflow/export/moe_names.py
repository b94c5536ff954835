"""Mixture-of-experts tensors as the loaders of exported checkpoints name them (docs/METHODS.md §4.2).

qflow's IR names every expert projection ``model.layers.N.mlp.experts.E.{gate,up,down}_proj``
(qflow/quant/expert_names.py), whatever layout the base folder stores. An exported
Hugging Face folder carries one tensor set per expert under the family's own checkpoint
names, which transformers 5 re-fuses into its 3-D ``experts.gate_up_proj`` /
``experts.down_proj`` while loading (its conversion mapping for mixtral and qwen2_moe,
which also serves qwen3_moe) and which vLLM loads expert by expert:

* Mixtral: ``block_sparse_moe.experts.E.w1`` (gate), ``.w3`` (up), ``.w2`` (down) and the
  router ``block_sparse_moe.gate``;
* Qwen2-MoE / Qwen3-MoE: ``mlp.experts.E.{gate,up,down}_proj``, router ``mlp.gate``,
  ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate`` (qflow's names already).

A fused base folder (transformers' ``save_original_format=False``) is written back in
that per-expert form, so every export has the same names whatever the base stored.

Example::

    for name, layer, read in logical_base_tensors(ckpt):
        key = export_name(name, "mixtral")     # model.layers.0.block_sparse_moe.experts.3.w2.weight
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from ..models.moe_adapter import MOE_MODEL_TYPES

_TO_MIXTRAL = ((re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj\."), r".block_sparse_moe.experts.\1.w1."),
               (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj\."), r".block_sparse_moe.experts.\1.w3."),
               (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj\."), r".block_sparse_moe.experts.\1.w2."),
               (re.compile(r"\.mlp\.gate\."), ".block_sparse_moe.gate."))


def base_family(ckpt) -> str | None:
    """``model_type`` of the IR's base model (None when its config is unreadable)."""
    try:
        return json.loads((Path(ckpt.base_model) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def is_moe(family: str | None) -> bool:
    return family in MOE_MODEL_TYPES


def export_name(name: str, family: str | None) -> str:
    """The checkpoint name of qflow tensor (or module) ``name`` in ``family``'s own layout.

    ``name`` may be a module (``...experts.3.down_proj``) or a tensor (``....weight``,
    ``....weight_packed``): the suffix is kept.
    """
    if family != "mixtral":
        return name
    probe = name + "."
    for pattern, repl in _TO_MIXTRAL:
        probe = pattern.sub(repl, probe)
    return probe[:-1]


def logical_base_tensors(ckpt) -> Iterator[tuple[str, str | None, Callable[[], Any]]]:
    """Every tensor of the base model under qflow's names: ``(name, IR layer or None, read)``.

    File by file in the base's order; a fused 3-D expert tensor gives one entry per expert
    and projection. ``read()`` returns the float tensor, the IR's float delta where it
    has one (an AWQ-folded norm or router).
    """
    from safetensors import safe_open

    from ..quant.weights import tensor_index

    index = tensor_index(Path(ckpt.base_model))
    by_file: dict[Path, list[tuple[str, Any]]] = {}
    for name, ref in index.items():
        by_file.setdefault(ref.path, []).append((name, ref))
    for path, entries in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name, ref in entries:
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if name in ckpt.floats:
                    def read(name=name):
                        return ckpt.float_tensor(name)
                else:
                    def read(ref=ref, handle=handle):
                        return ref.read(handle)
                yield name, (module if module in ckpt.layers else None), read
