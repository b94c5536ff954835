"""Mixture-of-experts blocks with one ``nn.Linear`` per expert (docs/METHODS.md §4.2).

transformers 5 keeps all experts of a Mixtral / Qwen2-MoE / Qwen3-MoE block in two
3-D parameters (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``)
and the router as a bare weight. qflow quantizes linears, so :func:`unfuse_experts`
replaces each sparse block by :class:`UnfusedSparseMoe`, whose modules carry the
names of the original checkpoints:

* ``mlp.gate``: the router, an ``nn.Linear [E, H]`` (kept float by default);
* ``mlp.experts.E.{gate,up,down}_proj``: expert ``E``'s projections;
* ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate`` (Qwen2-MoE), unchanged.

Its forward is the fused one op for op (same routing arithmetic, experts visited in
increasing order, the same ``index_add_``), so logits agree to rounding (a test
holds them to 1e-5 relative). An expert's linears see only the tokens routed to it:
calibration hooks on them collect per-expert statistics. With
``calibrate_all_experts`` every expert also runs on every token (only the routed
tokens' results enter the output), so its hooks see all tokens.

Example::

    model = MixtralForCausalLM(config)
    unfuse_experts(model)                          # in place; returns the number of blocks converted
    model.model.layers[0].mlp.experts[3].down_proj # nn.Linear(I, H)
    set_calibrate_all_experts(model, True)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import StageError
from .moe_adapter import MOE_MODEL_TYPES


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedSparseMoe(nn.Module):
    """A sparse MoE block with a linear router and per-expert linears (see the module doc).

    ``weights_in_logits_dtype``: Qwen casts the top-k weights back to the logits'
    dtype, Mixtral keeps them in fp32 (the same in an fp32 model, not in bf16).
    """

    def __init__(self, gate: nn.Linear, experts: nn.ModuleList, *, top_k: int, normalize_top_k: bool,
                 weights_in_logits_dtype: bool, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        if shared_expert is not None:
            self.shared_expert = shared_expert
            self.shared_expert_gate = shared_expert_gate
        self.top_k = int(top_k)
        self.normalize_top_k = bool(normalize_top_k)
        self.weights_in_logits_dtype = bool(weights_in_logits_dtype)
        self.calibrate_all_experts = False
        self.routed_tokens: torch.Tensor | None = None   # per-expert counter while counting is on

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def has_shared_expert(self) -> bool:
        return hasattr(self, "shared_expert")

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights ``[n, k]``, expert indices ``[n, k]``) of router ``logits [n, E]``."""
        probs = F.softmax(logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_top_k:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        if self.weights_in_logits_dtype:
            top_value = top_value.to(logits.dtype)
        return top_value, top_index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = shape[-1]
        # the router and shared expert get the [batch, seq, hidden] input, as a dense linear would
        # (calibration hooks then see whole sequences); experts get their tokens' rows
        logits = self.gate(hidden_states).reshape(-1, self.num_experts)
        flat = hidden_states.reshape(-1, hidden)
        weights, index = self.route(logits)
        out = torch.zeros_like(flat)
        with torch.no_grad():
            mask = F.one_hot(index, num_classes=self.num_experts).permute(2, 1, 0)   # [E, k, n]
        if self.routed_tokens is not None:
            self.routed_tokens += mask.sum(dim=(1, 2)).to(self.routed_tokens.device)
        for e, expert in enumerate(self.experts):
            top_k_pos, token_idx = torch.where(mask[e])
            if self.calibrate_all_experts:
                y = expert(flat)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                y = expert(flat[token_idx])
            y = y * weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        if self.has_shared_expert:
            shared = F.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
            out = out + shared.reshape(-1, hidden)
        return out.reshape(shape)


def is_fused_moe(module: nn.Module) -> bool:
    """A transformers 5 sparse block: ``experts`` with 3-D ``gate_up_proj``/``down_proj`` and a ``gate`` router."""
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    return (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3
            and isinstance(getattr(gate, "weight", None), torch.Tensor) and not isinstance(gate, nn.Linear))


def _unfuse_block(mlp: nn.Module, model_type: str, where: str) -> UnfusedSparseMoe:
    experts, router = mlp.experts, mlp.gate
    layout = {k: getattr(experts, k, d) for k, d in (("is_transposed", False), ("is_concatenated", True),
                                                     ("has_bias", False), ("has_gate", True))}
    if layout != {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}:
        raise StageError(f"{where}: expert layout {layout} is not the [gate; up] concatenation qflow unfuses",
                         where="qflow.models.moe", fix="quantize a Mixtral / Qwen2-MoE / Qwen3-MoE model")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    n_experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    dtype, device = gate_up.dtype, gate_up.device
    meta = device.type == "meta"
    gate = nn.Linear(hidden, n_experts, bias=False, dtype=router.weight.dtype, device=device)
    units = nn.ModuleList(ExpertMLP(hidden, inter, experts.act_fn, dtype=dtype, device=device)
                          for _ in range(n_experts))
    if not meta:
        with torch.no_grad():
            gate.weight.copy_(router.weight)
            for e, unit in enumerate(units):
                unit.gate_proj.weight.copy_(gate_up[e, :inter])
                unit.up_proj.weight.copy_(gate_up[e, inter:])
                unit.down_proj.weight.copy_(down[e])
    if model_type == "mixtral":
        normalize, cast = True, False
    else:   # qwen2_moe, qwen3_moe
        normalize, cast = bool(getattr(router, "norm_topk_prob", False)), True
    return UnfusedSparseMoe(gate, units, top_k=router.top_k, normalize_top_k=normalize,
                            weights_in_logits_dtype=cast, shared_expert=getattr(mlp, "shared_expert", None),
                            shared_expert_gate=getattr(mlp, "shared_expert_gate", None))


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused sparse block of ``model`` (in place) by an :class:`UnfusedSparseMoe`.

    Returns the number of blocks converted (0 for a dense model, or a fused family
    qflow has no adapter for: that is refused by ``get_adapter``). Works on a model
    built on the meta device too (the linears are then meta tensors to load later).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        return 0
    converted = 0
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not is_fused_moe(mlp):
            continue
        if model_type not in MOE_MODEL_TYPES:   # left as it is; get_adapter refuses the family by name
            return 0
        layer.mlp = _unfuse_block(mlp, model_type, f"model.layers.{i}.mlp")
        converted += 1
    return converted


def moe_blocks(model: nn.Module) -> Iterator[tuple[int, UnfusedSparseMoe]]:
    """``(layer index, block)`` of every unfused sparse block."""
    for i, layer in enumerate(getattr(getattr(model, "model", None), "layers", None) or []):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, UnfusedSparseMoe):
            yield i, mlp


def set_calibrate_all_experts(model: nn.Module, value: bool) -> int:
    """Make every expert see every token during calibration passes (True) or only its routed ones."""
    n = 0
    for _, block in moe_blocks(model):
        block.calibrate_all_experts = bool(value)
        n += 1
    return n


@contextlib.contextmanager
def count_routed_tokens(block: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Count, per expert, the tokens the router sends it during the ``with`` body.

    ``block`` is a decoder block (or any module holding an UnfusedSparseMoe); the yielded
    dict is filled on exit: ``{"mlp": [tokens of expert 0, ...]}`` (relative module name).
    """
    found = {name: mod for name, mod in block.named_modules() if isinstance(mod, UnfusedSparseMoe)}
    counts: dict[str, list[int]] = {}
    for mod in found.values():
        mod.routed_tokens = torch.zeros(mod.num_experts, dtype=torch.long)
    try:
        yield counts
    finally:
        for name, mod in found.items():
            counts[name] = [int(c) for c in mod.routed_tokens]
            mod.routed_tokens = None
