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
    """Llama-layout decoder (also Mistral, Qwen2): pre-norm attention + gated MLP.

    Subclasses for other families (qflow/models/families.py) change the class
    attributes below; sites, groups and shared inputs are derived from them.
    """

    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    # relative names, in execution order inside a block
    qkv_linears: ClassVar[tuple[str, ...]] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_linear: ClassVar[str] = "self_attn.o_proj"
    gate_up_linears: ClassVar[tuple[str, ...]] = ("mlp.gate_proj", "mlp.up_proj")
    down_linear: ClassVar[str] = "mlp.down_proj"
    # the op whose (last) output rows are the values / the MLP's up projection (v->o, up->down sites)
    v_rows: ClassVar[str] = "self_attn.v_proj"
    up_rows: ClassVar[str] = "mlp.up_proj"
    # norms feeding the attention / MLP inputs (None: the input is the raw residual stream, not foldable)
    input_norm: ClassVar[str | None] = "input_layernorm"
    post_attn_norm: ClassVar[str | None] = "post_attention_layernorm"
    # norms applied to a half's output before the residual add (Gemma 2/3, OLMo 2); never fold targets
    attn_post_norm: ClassVar[str | None] = None
    mlp_post_norm: ClassVar[str | None] = None
    # AWQ clip search skips these substrings (llm-awq; AutoAWQ adds query/key/Wqkv)
    clip_skip_markers: ClassVar[tuple[str, ...]] = ("q_", "k_", "query", "key", "Wqkv")

    @property
    def attn_linears(self) -> tuple[str, ...]:
        return self.qkv_linears + (self.o_linear,)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return self.gate_up_linears + (self.down_linear,)

    @property
    def shared_inputs(self) -> dict[str, str]:
        """Linears whose input is the same tensor as another's (the canonical one, the first of its group)."""
        out = {}
        for group in (self.qkv_linears, self.gate_up_linears):
            out.update({name: group[0] for name in group[1:]})
        return out

    def __init__(self, model: "nn.Module"):
        self.model = model
        self.config = model.config
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers"):
            raise StageError(f"{type(model).__name__} has no .model.layers ({model.config.model_type})",
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

    def v_o_foldable(self, block: "nn.Module") -> bool:
        """Site v->o exists when the value rows map one-to-one onto o_proj's input columns (no GQA)."""
        o = block.get_submodule(self.o_linear)
        v = block.get_submodule(self.v_rows)
        if self.v_rows in self.qkv_linears and len(self.qkv_linears) == 1:  # fused qkv: v is the last rows
            heads = int(self.config.num_attention_heads)
            kv = int(getattr(self.config, "num_key_value_heads", None) or heads)
            return kv == heads and v.weight.shape[0] == 3 * o.weight.shape[1]
        return tuple(v.weight.shape) == tuple(o.weight.shape)

    def attention_sites(self, block: "nn.Module") -> list[ScaleSite]:
        """Sites 1 (norm -> q/k/v, where a norm precedes them) and 2 (v -> o, when foldable) of docs/METHODS.md §4."""
        sites = []
        if self.input_norm is not None:
            sites.append(ScaleSite("attn_in", self.input_norm, self.qkv_linears, "self_attn",
                                   self.qkv_linears[0], loss_kwargs=True))
        if self.v_o_foldable(block):
            sites.append(ScaleSite("v_o", self.v_rows, (self.o_linear,), self.o_linear, self.o_linear))
        return sites

    def awq_sites(self, block: "nn.Module") -> list[ScaleSite]:
        """docs/METHODS.md §4 sites 1-4; site 2 (v->o) only when v_proj and o_proj have equal shapes;
        sites 1 and 3 only where a norm precedes the linears (a post-norm family has none)."""
        sites = self.attention_sites(block)
        if self.post_attn_norm is not None:
            sites.append(ScaleSite("mlp_in", self.post_attn_norm, self.gate_up_linears, "mlp",
                                   self.gate_up_linears[0]))
        sites.append(ScaleSite("up_down", self.up_rows, (self.down_linear,), self.down_linear, self.down_linear))
        for site in sites:
            self._require(block, [site.prev, site.loss_module, *site.linears])
        return sites

    def smooth_sites(self, block: "nn.Module") -> list[SmoothSite]:
        """docs/METHODS.md §6: only norm-preceded inputs (qkv, gate/up) are smoothed."""
        sites = []
        if self.input_norm is not None:
            sites.append(SmoothSite("attn_in", self.input_norm, self.qkv_linears))
        if self.post_attn_norm is not None:
            sites.append(SmoothSite("mlp_in", self.post_attn_norm, self.gate_up_linears))
        for site in sites:
            self._require(block, [site.norm, *site.linears])
        return sites

    def sequential_groups(self, block: "nn.Module | None" = None) -> list[list[str]]:
        """GPTQ true-sequential sub-steps: [k,v,q] -> [o] -> [up,gate] -> [down] (reversed input groups)."""
        groups = [list(self.qkv_linears[1:]) + [self.qkv_linears[0]], [self.o_linear],
                  list(reversed(self.gate_up_linears)), [self.down_linear]]
        if block is not None:
            self._require(block, [n for g in groups for n in g])
        return groups

    def clip_skipped(self, name: str) -> bool:
        """AWQ clip search skips query/key projections (their error is rescaled by softmax)."""
        leaf = name.rsplit(".", 1)[-1]
        return any(marker in leaf for marker in self.clip_skip_markers)

    def is_router(self, name: str) -> bool:
        """True for a mixture-of-experts router linear: left float unless a spec says otherwise."""
        return False

    def routed(self, name: str) -> bool:
        """True for a linear that sees only the tokens a router sends it (an expert: a pass may give it none)."""
        return False

    # ---- residual halves (lets GPTQ reuse the attention half) ------------
    # True when block(h) == mlp_half(attention_half(h)) op for op (tests check bit-equality)
    splits_residual: ClassVar[bool] = True
    # the linear each half ends with: self_attn(x) == o_proj(<its input>), mlp(x) == down_proj(<its input>)
    @property
    def attn_out_linear(self) -> str:
        return self.o_linear

    @property
    def mlp_out_linear(self) -> str:
        return self.down_linear

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


def register_adapter(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Make ``cls`` the adapter for each of its ``model_types``."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


for _cls in (ArchAdapter, MistralAdapter, Qwen2Adapter):
    register_adapter(_cls)

from . import families as _families  # noqa: E402,F401  (registers the other families; needs ArchAdapter)
from . import moe_adapter as _moe_adapter  # noqa: E402,F401  (Mixtral, Qwen2-MoE, Qwen3-MoE)
from . import encoders as _encoders  # noqa: E402,F401  (registers bert/roberta; needs ArchAdapter)


def known_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def _block_modules(block: "nn.Module") -> str:
    """The block's named sub-modules with their types, for an error message (``self_attn.qkv: Linear, ...``)."""
    names = [f"{name}: {type(mod).__name__}" for name, mod in block.named_modules() if name and name.count(".") <= 1]
    return ", ".join(names[:24]) + (", ..." if len(names) > 24 else "")


def check_block_layout(adapter: ArchAdapter, block: "nn.Module") -> None:
    """Refuse a block that lacks any module the adapter names, before any work.

    Every linear, norm and AWQ / SmoothQuant site module must exist; the message
    names the family, what is missing and the modules the block does have.
    """
    from torch import nn

    wanted = list(adapter.linear_names())
    wanted += [n for n in (adapter.input_norm, adapter.post_attn_norm) if n is not None]
    wanted += [n for n in (adapter.attn_post_norm, adapter.mlp_post_norm) if n is not None]
    missing = []
    for name in wanted:
        try:
            block.get_submodule(name)
        except AttributeError:
            missing.append(name)
    family = adapter.config.model_type
    if missing:
        matched = "none" if len(missing) == len(wanted) else f"{len(wanted) - len(missing)} of {len(wanted)}"
        raise StageError(f"the {family} adapter ({type(adapter).__name__}): {type(block).__name__} lacks "
                         f"{', '.join(missing)}; it has {_block_modules(block)} (names matched: {matched})",
                         where="qflow.models.adapters",
                         fix=f"load a standard transformers {family} model, or add an adapter for this layout "
                             "in qflow/models/families.py")
    bad = [f"{n} ({type(block.get_submodule(n)).__name__})" for n in adapter.linear_names()
           if not isinstance(block.get_submodule(n), nn.Linear)]
    if bad:
        raise StageError(f"the {family} adapter expects plain nn.Linear layers; found {', '.join(bad)}",
                         where="qflow.models.adapters",
                         fix="quantize a float model (not one already quantized or wrapped)")
    adapter.awq_sites(block)
    adapter.smooth_sites(block)
    adapter.sequential_groups(block)


def get_adapter(model: "nn.Module") -> ArchAdapter:
    """The adapter for ``model`` by ``config.model_type``; StageError for unknown families or layouts.

    Block 0 is checked against the adapter's names here, so a mismatch fails before any work.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = _ADAPTERS.get(model_type or "")
    if cls is None:
        hint = _families.UNSUPPORTED.get(model_type or "", "quantize a supported family or add an "
                                         "ArchAdapter subclass in qflow/models/families.py")
        raise StageError(f"no architecture adapter for model_type {model_type!r}; known: "
                         f"{', '.join(known_model_types())}", where="qflow.models.adapters", fix=hint)
    adapter = cls(model)
    if adapter.n_blocks() == 0:
        raise StageError("the model has zero decoder blocks", where="adapter")
    check_block_layout(adapter, adapter.blocks()[0])
    return adapter


def norm_weight_offset(norm: "nn.Module") -> float:
    """``c`` in ``norm(x) = n(x)·(c + w) [+ b]``: 0 for LayerNorm / Llama's RMSNorm, 1 for Gemma's.

    Read off the module itself (two probe calls with ``w = 0`` and ``w = 1``; the
    weight is restored), cached per norm class. A fold of scales ``s`` into the norm
    is then ``w' = (c + w)/s - c`` (docs/METHODS.md §4). StageError when the output
    is not affine in ``w`` with ``c`` in {0, 1}.
    """
    import torch

    cls = type(norm)
    if cls in _NORM_OFFSETS:
        return _NORM_OFFSETS[cls]
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dim() != 1:
        raise StageError(f"cannot fold scales into {cls.__name__} (no 1-D weight)", where="adapter",
                         fix="add the norm type to the architecture adapter")
    x = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    saved = weight.data.clone()
    try:
        with torch.no_grad():
            weight.data.zero_()
            y0 = norm(x).double()
            weight.data.fill_(1.0)
            y1 = norm(x).double()
    finally:
        weight.data.copy_(saved)
    unit = y1 - y0                       # n(x)
    bias = getattr(norm, "bias", None)
    rest = y0 - (bias.detach().double() if bias is not None else 0.0)   # n(x)·c
    c = float((rest * unit).sum() / (unit * unit).sum().clamp(min=1e-30))
    offset = round(c)
    if offset not in (0, 1) or abs(c - offset) > 1e-2:
        raise StageError(f"{cls.__name__} is not n(x)·(c + w) with c in {{0, 1}} (c = {c:.3g}); "
                         "scales cannot be folded into it", where="adapter",
                         fix="add the norm convention to the architecture adapter")
    _NORM_OFFSETS[cls] = float(offset)
    return float(offset)


_NORM_OFFSETS: dict[type, float] = {}


# ---- cheap checks from config.json (no torch, no model build) -------------

def config_linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{relative linear name: (out, in)}`` of one decoder block, from a Llama-layout config.json."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    experts = {}
    if config.get("moe_intermediate_size") or config.get("num_local_experts"):   # docs/METHODS.md §4.2
        moe = int(config.get("moe_intermediate_size") or inter)
        experts = {"mlp.experts.0.gate_proj": (moe, hidden), "mlp.experts.0.down_proj": (hidden, moe)}
        if config.get("shared_expert_intermediate_size"):
            shared = int(config["shared_expert_intermediate_size"])
            experts.update({"mlp.shared_expert.gate_proj": (shared, hidden), "mlp.shared_expert.down_proj": (hidden, shared)})
    return experts | {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
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
