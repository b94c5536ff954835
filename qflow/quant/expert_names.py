"""Per-expert tensor names of a mixture-of-experts checkpoint, whatever layout the files use.

qflow names every expert projection like any linear (docs/METHODS.md §4.2):
``model.layers.N.mlp.experts.E.{gate,up,down}_proj`` and the router ``model.layers.N.mlp.gate``.
A model folder may store them three ways, all mapped onto those names here:

* Qwen-MoE's own (transformers' ``save_pretrained`` default): already these names;
* Mixtral's own: ``block_sparse_moe.experts.E.w1|w3|w2`` (gate, up, down) and ``block_sparse_moe.gate``;
* transformers 5's fused layout (``save_original_format=False``): ``mlp.experts.gate_up_proj``
  ``[E, 2I, H]`` (gate rows first) and ``mlp.experts.down_proj`` ``[E, H, I]``; one expert's
  projection is then a slice of a 3-D tensor, read without loading the others.

Example::

    index = tensor_index(folder)                       # name -> TensorRef
    ref = index["model.layers.0.mlp.experts.3.up_proj.weight"]
    w = ref.read()                                     # [I, H] (rows I: 2I of expert 3)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# the routers qflow leaves float by default (the quantize stages' moe_quantize_router)
ROUTER_PATTERN = re.compile(r"\.mlp\.(gate|shared_expert_gate)$")
EXPERT_PATTERN = re.compile(r"\.mlp\.experts\.(\d+)\.")

_MIXTRAL_RENAMES = ((re.compile(r"\.block_sparse_moe\."), ".mlp."),
                    (re.compile(r"\.experts\.(\d+)\.w1\."), r".experts.\1.gate_proj."),
                    (re.compile(r"\.experts\.(\d+)\.w3\."), r".experts.\1.up_proj."),
                    (re.compile(r"\.experts\.(\d+)\.w2\."), r".experts.\1.down_proj."))
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def is_router(module: str) -> bool:
    """True for a router linear (``...mlp.gate``, Qwen's ``...mlp.shared_expert_gate``)."""
    return bool(ROUTER_PATTERN.search(module))


def expert_of(module: str) -> int | None:
    """The expert index in ``...mlp.experts.E.gate_proj``, or None for any other module."""
    m = EXPERT_PATTERN.search(module)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorRef:
    """Where one (logical) tensor lives: ``file[key]``, or rows ``rows`` of ``file[key][expert]``."""

    path: Path
    key: str
    shape: tuple[int, ...]
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def read(self, handle=None):
        """The tensor (a slice read of a fused expert tensor); ``handle``: an open ``safe_open`` of ``path``."""
        from safetensors import safe_open

        if handle is None:
            with safe_open(str(self.path), framework="pt") as h:
                return self.read(h)
        if self.expert is None:
            return handle.get_tensor(self.key)
        part = handle.get_slice(self.key)
        if self.rows is None:
            return part[self.expert]
        return part[self.expert, self.rows[0]:self.rows[1]]


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def logical_name(key: str, model_type: str | None) -> str:
    """The qflow name of a stored tensor name (Mixtral's ``w1/w2/w3`` renamed; others unchanged)."""
    if model_type == "mixtral":
        for pattern, repl in _MIXTRAL_RENAMES:
            key = pattern.sub(repl, key)
    return key


def tensor_index(folder: str | Path, files: dict[str, Path]) -> dict[str, TensorRef]:
    """``{qflow tensor name: TensorRef}`` for every tensor of ``files`` (stored name -> file).

    Dense models map every name to itself. Fused 3-D expert tensors become one entry
    per expert and projection.
    """
    from safetensors import safe_open

    folder = Path(folder)
    model_type = _model_type(folder)
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    out: dict[str, TensorRef] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as h:
            for key in keys:
                shape = tuple(int(d) for d in h.get_slice(key).get_shape())
                fused = _FUSED.match(key)
                if fused and len(shape) == 3:
                    prefix, kind = fused.group("prefix"), fused.group("kind")
                    for e in range(shape[0]):
                        if kind == "down_proj":
                            out[f"{prefix}.{e}.down_proj.weight"] = TensorRef(path, key, shape[1:], e)
                        else:
                            inter = shape[1] // 2
                            out[f"{prefix}.{e}.gate_proj.weight"] = TensorRef(path, key, (inter, shape[2]), e,
                                                                              (0, inter))
                            out[f"{prefix}.{e}.up_proj.weight"] = TensorRef(path, key, (inter, shape[2]), e,
                                                                            (inter, 2 * inter))
                    continue
                out[logical_name(key, model_type)] = TensorRef(path, key, shape)
    return out
