"""Architecture adapters: where a model family keeps its blocks, norms, linears and scaling sites.

Algorithms (AWQ, GPTQ, SmoothQuant, HQQ) never name a module themselves; they
ask the adapter. Supporting a new family means adding an adapter here, not
editing an algorithm.

Example::

    adapter = get_adapter(model)                 # by config.model_type
    for i, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_name(i)           # "model.layers.3"
        for site in adapter.awq_sites(block):    # docs/METHODS.md §4 table
            ...

Names returned by an adapter are *relative to a decoder block*
(``self_attn.q_proj``), except ``block_name`` which gives the absolute prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import StageError

if TYPE_CHECKING:  # keep torch out of module import for light callers
    from torch import nn


@dataclass(frozen=True)
class ScaleSite:
    """One AWQ scaling site (docs/METHODS.md §4, step 2).

    ``prev`` is the op the inverse scale folds into (a norm or a linear), ``linears``
    the linears whose input columns are scaled, ``loss_module`` the module whose
    output the search compares, ``input_of`` the linear whose cached input is ``x``.
    ``loss_kwargs`` says whether ``loss_module`` needs the block's kwargs (attention).
    """

    name: str
    prev: str
    linears: tuple[str, ...]
    loss_module: str
    input_of: str
    loss_kwargs: bool = False


@dataclass(frozen=True)
class SmoothSite:
    """One SmoothQuant site (docs/METHODS.md §6): a norm and the linears reading its output."""

    name: str
    norm: str
    linears: tuple[str, ...]


class ArchAdapter:
    """Llama-layout decoder (also Mistral, Qwen2): pre-norm attention + gated MLP."""

    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    # relative names, in execution order inside a block
    attn_linears: ClassVar[tuple[str, ...]] = ("self_attn.q_proj", "self_attn.k_proj",
                                                "self_attn.v_proj", "self_attn.o_proj")
    mlp_linears: ClassVar[tuple[str, ...]] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    input_norm: ClassVar[str] = "input_layernorm"
    post_attn_norm: ClassVar[str] = "post_attention_layernorm"
    # linears whose input is the same tensor as another's (the canonical one)
    shared_inputs: ClassVar[dict[str, str]] = {"self_attn.k_proj": "self_attn.q_proj",
                                               "self_attn.v_proj": "self_attn.q_proj",
                                               "mlp.up_proj": "mlp.gate_proj"}
    # AWQ clip search skips these substrings (llm-awq; AutoAWQ adds query/key/Wqkv)
    clip_skip_markers: ClassVar[tuple[str, ...]] = ("q_", "k_", "query", "key", "Wqkv")

    def __init__(self, model: "nn.Module"):
        self.model = model
        self.config = model.config
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers"):
            raise StageError(f"{type(model).__name__} has no .model.layers",
                             where="adapter", fix="load the model as a *ForCausalLM with a decoder stack")
        self.base = base

    # ---- stack ----------------------------------------------------------
    @property
    def block_prefix(self) -> str:
        return "model.layers"

    def blocks(self, model: "nn.Module | None" = None) -> "nn.ModuleList":
        return (model or self.model).model.layers

    def block_name(self, index: int) -> str:
        return f"{self.block_prefix}.{index}"

    def n_blocks(self) -> int:
        return len(self.blocks())

    def embeddings(self) -> "nn.Module":
        return self.base.embed_tokens

    def rotary(self) -> "nn.Module | None":
        return getattr(self.base, "rotary_emb", None)

    def final_norm(self) -> "nn.Module":
        return self.base.norm

    # ---- one block ------------------------------------------------------
    def linear_names(self, block: "nn.Module | None" = None) -> list[str]:
        """Relative names of the block's linears in execution order; error if a name is missing."""
        names = list(self.attn_linears + self.mlp_linears)
        if block is not None:
            self._require(block, names)
        return names

    def linears(self, block: "nn.Module") -> dict[str, "nn.Linear"]:
        from torch import nn

        out = {}
        for name in self.linear_names(block):
            mod = block.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise StageError(f"{name} is {type(mod).__name__}, expected nn.Linear", where="adapter",
                                 fix="this adapter expects a float model with plain nn.Linear layers")
            out[name] = mod
        if not out:
            raise StageError("no linear layers matched in the decoder block", where="adapter")
        return out

    def canonical_input(self, name: str) -> str:
        """The linear whose cached input equals ``name``'s input (itself if none)."""
        return self.shared_inputs.get(name, name)

    def awq_sites(self, block: "nn.Module") -> list[ScaleSite]:
        """docs/METHODS.md §4 sites 1-4; site 2 (v->o) only when v_proj and o_proj have equal shapes."""
        sites = [ScaleSite("attn_in", self.input_norm, self.attn_linears[:3], "self_attn",
                           "self_attn.q_proj", loss_kwargs=True)]
        v = block.get_submodule("self_attn.v_proj")
        o = block.get_submodule("self_attn.o_proj")
        if tuple(v.weight.shape) == tuple(o.weight.shape):
            sites.append(ScaleSite("v_o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj",
                                   "self_attn.o_proj"))
        sites.append(ScaleSite("mlp_in", self.post_attn_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp",
                               "mlp.gate_proj"))
        sites.append(ScaleSite("up_down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "mlp.down_proj"))
        for site in sites:
            self._require(block, [site.prev, site.loss_module, *site.linears])
        return sites

    def smooth_sites(self, block: "nn.Module") -> list[SmoothSite]:
        """docs/METHODS.md §6: only norm-preceded inputs (qkv, gate/up) are smoothed."""
        sites = [SmoothSite("attn_in", self.input_norm, self.attn_linears[:3]),
                 SmoothSite("mlp_in", self.post_attn_norm, ("mlp.gate_proj", "mlp.up_proj"))]
        for site in sites:
            self._require(block, [site.norm, *site.linears])
        return sites

    def sequential_groups(self, block: "nn.Module | None" = None) -> list[list[str]]:
        """GPTQ true-sequential sub-steps: [k,v,q] -> [o] -> [up,gate] -> [down]."""
        groups = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                  ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]
        if block is not None:
            self._require(block, [n for g in groups for n in g])
        return groups

    def clip_skipped(self, name: str) -> bool:
        """AWQ clip search skips query/key projections (their error is rescaled by softmax)."""
        leaf = name.rsplit(".", 1)[-1]
        return any(marker in leaf for marker in self.clip_skip_markers)

    # ---- residual halves (lets GPTQ reuse the attention half) ------------
    # True when block(h) == mlp_half(attention_half(h)) op for op (tests check bit-equality)
    splits_residual: ClassVar[bool] = True
    # the linear each half ends with: self_attn(x) == o_proj(<its input>), mlp(x) == down_proj(<its input>)
    attn_out_linear: ClassVar[str] = "self_attn.o_proj"
    mlp_out_linear: ClassVar[str] = "mlp.down_proj"

    def attention_half(self, block: "nn.Module", hidden: Any, kwargs: dict[str, Any]) -> Any:
        """``h + self_attn(input_norm(h))`` (the residual stream entering the MLP half)."""
        normed = block.get_submodule(self.input_norm)(hidden)
        out = block.self_attn(hidden_states=normed, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        return hidden + out

    def mlp_half(self, block: "nn.Module", hidden: Any) -> Any:
        return hidden + block.mlp(block.get_submodule(self.post_attn_norm)(hidden))

    # ---- helpers --------------------------------------------------------
    def _require(self, block: "nn.Module", names: list[str]) -> None:
        missing = []
        for name in names:
            try:
                block.get_submodule(name)
            except AttributeError:
                missing.append(name)
        if missing:
            raise StageError(f"decoder block {type(block).__name__} lacks {', '.join(missing)} "
                             f"(adapter for {self.model_types[0]})", where="adapter",
                             fix="use a model of a supported architecture or add an adapter in qflow/models/adapters.py")


class MistralAdapter(ArchAdapter):
    model_types = ("mistral",)


class Qwen2Adapter(ArchAdapter):
    """Qwen2: Llama layout with q/k/v biases (folds divide the bias too)."""

    model_types = ("qwen2",)


_ADAPTERS: dict[str, type[ArchAdapter]] = {}
for _cls in (ArchAdapter, MistralAdapter, Qwen2Adapter):
    for _t in _cls.model_types:
        _ADAPTERS[_t] = _cls


def known_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model: "nn.Module") -> ArchAdapter:
    """The adapter for ``model`` by ``config.model_type``; StageError for unknown families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = _ADAPTERS.get(model_type or "")
    if cls is None:
        raise StageError(f"no architecture adapter for model_type {model_type!r}; known: "
                         f"{', '.join(known_model_types())}", where="qflow.models.adapters",
                         fix="quantize a supported family or add an ArchAdapter subclass")
    adapter = cls(model)
    if adapter.n_blocks() == 0:
        raise StageError("the model has zero decoder blocks", where="adapter")
    return adapter


# ---- cheap checks from config.json (no torch, no model build) -------------

def config_linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{relative linear name: (out, in)}`` of one decoder block, from a Llama-layout config.json."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    return {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
            "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def model_config_from_inputs(inputs_meta: dict[str, Any], slot: str = "model") -> dict[str, Any] | None:
    """The ``config.json`` of the model feeding ``slot`` (an artifact, a dict with a path, or a path), or None."""
    import json
    from pathlib import Path

    ref = (inputs_meta or {}).get(slot)
    if ref is None:
        return None
    folder = None
    if hasattr(ref, "base_model_dir"):
        folder = ref.base_model_dir
    elif isinstance(ref, dict):
        meta = ref.get("meta", ref)
        folder = meta.get("model_dir") or meta.get("base_model") or ref.get("path")
    elif isinstance(ref, (str, Path)):
        folder = ref
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_group_size(config: dict[str, Any] | None, group_size: int, *, pad_last_group: bool = False,
                     where: str = "group_size") -> list[str]:
    """Problems quantizing this architecture's linears with ``group_size`` (empty when fine or unknown)."""
    if not config:
        return []
    problems = []
    model_type = config.get("model_type")
    if model_type not in _ADAPTERS:
        problems.append(f"model_type {model_type!r} has no architecture adapter; known: {', '.join(known_model_types())}")
        return problems
    if group_size <= 0 or pad_last_group:
        return problems
    try:
        shapes = config_linear_shapes(config)
    except (KeyError, TypeError, ValueError):
        return problems
    bad = sorted({cols for _, cols in shapes.values() if cols % group_size})
    if bad:
        widths = sorted({cols for _, cols in shapes.values()})
        ok = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        hint = f"use {where} in {ok}" if ok else f"use {where}: -1 (per channel)"
        problems.append(f"{where} {group_size} does not divide the input width(s) {bad} of "
                        f"{model_type} linears; {hint}")
    return problems
