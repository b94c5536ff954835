"""Read a float HF folder's weights lazily, one tensor at a time (no model build).

Example::

    for name, w in iter_linear_weights(folder, targets=r"\\.layers\\.\\d+\\."):
        ...   # name = "model.layers.0.self_attn.q_proj", w = fp32 [out, in]
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

DEFAULT_TARGETS = r"\.layers?\.\d+\."   # decoders: model.layers.N; BERT encoders: encoder.layer.N


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in mapping.items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    if not out:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    return out


def tensor_index(folder: Path):
    """``{tensor name: TensorRef}`` of a float folder under qflow's names (mixture-of-experts
    checkpoints: one entry per expert projection, whatever the stored layout; qflow/quant/expert_names.py)."""
    from .expert_names import tensor_index as index

    return index(folder, weight_files(folder))


def linear_names(folder: Path, targets: str = DEFAULT_TARGETS, exclude: list[str] | None = None) -> list[str]:
    """Module names of 2-D ``*.weight`` tensors matching ``targets`` (decoder linears), in natural order."""
    pattern = re.compile(targets)
    excl = [re.compile(e) for e in exclude or []]
    names = []
    for k, ref in tensor_index(folder).items():
        if not k.endswith(".weight") or not pattern.search(k) or len(ref.shape) != 2:
            continue
        module = k[: -len(".weight")]
        if module.rsplit(".", 1)[-1].endswith("norm"):   # cohere's per-head q/k LayerNorms are 2-D, not linears
            continue
        if not any(e.search(module) for e in excl):
            names.append(module)
    return sorted(names, key=_natural_key)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def iter_linear_weights(folder: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    index = tensor_index(folder)
    for name in names:
        yield name, index[name + ".weight"].read().float()


def block_index(name: str) -> int | None:
    m = re.search(r"\.layers?\.(\d+)\.", name)
    return int(m.group(1)) if m else None
