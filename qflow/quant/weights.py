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


def linear_names(folder: Path, targets: str = DEFAULT_TARGETS, exclude: list[str] | None = None) -> list[str]:
    """Module names of 2-D ``*.weight`` tensors matching ``targets`` (decoder linears), in file order."""
    from safetensors import safe_open

    pattern = re.compile(targets)
    excl = [re.compile(e) for e in exclude or []]
    names = []
    files = weight_files(folder)
    for f in dict.fromkeys(files.values()):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if not k.endswith(".weight") or not pattern.search(k):
                    continue
                module = k[: -len(".weight")]
                if any(e.search(module) for e in excl):
                    continue
                if len(h.get_slice(k).get_shape()) == 2:
                    names.append(module)
    return sorted(names, key=_natural_key)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def iter_linear_weights(folder: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = weight_files(folder)
    for name in names:
        with safe_open(str(files[name + ".weight"]), framework="pt") as h:
            yield name, h.get_tensor(name + ".weight").float()


def block_index(name: str) -> int | None:
    m = re.search(r"\.layers?\.(\d+)\.", name)
    return int(m.group(1)) if m else None
