"""The architecture adapter of Mixtral, Qwen2-MoE and Qwen3-MoE (docs/METHODS.md §4.2).

Attention is the Llama layout (Qwen3-MoE adds q/k norms after the projections, not
fold targets). The MLP half is an :class:`~qflow.models.moe.UnfusedSparseMoe` (the
model must have been unfused: ``load_model`` and ``load_model_lazy`` do it), whose
linears are listed like any other:

* ``mlp.gate`` (router) and, for Qwen2-MoE, ``mlp.shared_expert_gate``: float unless the
  stage sets ``moe_quantize_router``; they read the post-attention norm's output, so an
  AWQ / SmoothQuant fold into that norm scales their columns too (exact);
* ``mlp.experts.E.{gate,up,down}_proj``: each expert's inputs are the tokens routed to
  it (``routed``: a pass may give it none); with ``calibrate_all_experts`` on the model,
  an expert's gate/up input is the router's (every token), so all experts share it;
* ``mlp.shared_expert.*``: a dense gated MLP on every token.

AWQ sites: attn_in, v_o (no GQA), mlp_in (one scale for the norm, searched against the
whole MoE block's output: router, shared expert and every expert's gate/up), then one
up->down site per expert (its own tokens) and one for the shared expert.
GPTQ groups: [k,v,q] -> [o] -> [router, shared and experts' gate/up] -> [all down].
Qwen's dense layers (``mlp_only_layers``, ``decoder_sparse_step``) keep the Llama sites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StageError
from .adapters import ArchAdapter, ScaleSite, SmoothSite, register_adapter

if TYPE_CHECKING:  # torch stays out of module import (qflow/models/adapters.py imports this module)
    from torch import nn

    from .moe import UnfusedSparseMoe

# the families whose sparse blocks qflow unfuses (qflow/models/moe.py)
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")

ROUTER = "mlp.gate"
SHARED_GATE = "mlp.shared_expert_gate"
SHARED = "mlp.shared_expert"


@register_adapter
class MoEAdapter(ArchAdapter):
    """Mixtral / Qwen2-MoE / Qwen3-MoE: Llama attention, a sparse MoE block as the MLP half."""

    model_types = MOE_MODEL_TYPES

    def __init__(self, model: "nn.Module"):
        from .moe import is_fused_moe

        super().__init__(model)
        fused = [i for i, layer in enumerate(self.blocks()) if is_fused_moe(getattr(layer, "mlp", layer))]
        if fused:
            raise StageError(f"{self.config.model_type}: the experts of blocks {fused[:4]} are fused 3-D parameters",
                             where="qflow.models.moe_adapter",
                             fix="load the model with qflow.models.loading.load_model, or call "
                                 "qflow.models.moe.unfuse_experts(model) first")

    # ---- the sparse block --------------------------------------------------
    def sparse(self, block: "nn.Module | None" = None) -> "UnfusedSparseMoe | None":
        """The block's UnfusedSparseMoe (block 0 by default), or None for a dense layer."""
        from .moe import UnfusedSparseMoe

        block = block if block is not None else self.blocks()[0]
        mlp = getattr(block, "mlp", None)
        return mlp if isinstance(mlp, UnfusedSparseMoe) else None

    @staticmethod
    def expert_linears(e: int) -> tuple[str, str, str]:
        return (f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj", f"mlp.experts.{e}.down_proj")

    def _routers(self, moe: "UnfusedSparseMoe") -> list[str]:
        return [ROUTER] + ([SHARED_GATE] if moe.has_shared_expert else [])

    def _mlp_in(self, moe: "UnfusedSparseMoe") -> list[str]:
        """Everything reading the post-attention norm's output."""
        names = self._routers(moe)
        if moe.has_shared_expert:
            names += [f"{SHARED}.gate_proj", f"{SHARED}.up_proj"]
        for e in range(moe.num_experts):
            names += list(self.expert_linears(e)[:2])
        return names

    def _downs(self, moe: "UnfusedSparseMoe") -> list[str]:
        return ([f"{SHARED}.down_proj"] if moe.has_shared_expert else []) + [
            self.expert_linears(e)[2] for e in range(moe.num_experts)]

    def is_router(self, name: str) -> bool:
        return name in (ROUTER, SHARED_GATE)

    def routed(self, name: str) -> bool:
        return name.startswith("mlp.experts.")

    # ---- adapter interface -------------------------------------------------
    def linear_names(self, block: "nn.Module | None" = None) -> list[str]:
        moe = self.sparse(block)
        if moe is None:
            return super().linear_names(block)
        names = list(self.attn_linears) + self._routers(moe)
        if moe.has_shared_expert:
            names += [f"{SHARED}.gate_proj", f"{SHARED}.up_proj", f"{SHARED}.down_proj"]
        for e in range(moe.num_experts):
            names += list(self.expert_linears(e))
        if block is not None:
            self._require(block, names)
        return names

    def canonical_input(self, name: str) -> str:
        if name in (SHARED_GATE, f"{SHARED}.gate_proj", f"{SHARED}.up_proj"):
            return ROUTER
        if name.startswith("mlp.experts.") and name.endswith(("gate_proj", "up_proj")):
            if any(getattr(getattr(layer, "mlp", None), "calibrate_all_experts", False) for layer in self.blocks()):
                return ROUTER     # every expert runs on every token: its input is the router's
            return name.rsplit(".", 1)[0] + ".gate_proj"
        return super().canonical_input(name)

    def awq_sites(self, block: "nn.Module") -> list[ScaleSite]:
        moe = self.sparse(block)
        if moe is None:
            return super().awq_sites(block)
        sites = self.attention_sites(block)
        sites.append(ScaleSite("mlp_in", self.post_attn_norm, tuple(self._mlp_in(moe)), "mlp", ROUTER))
        if moe.has_shared_expert:
            sites.append(ScaleSite("up_down.shared", f"{SHARED}.up_proj", (f"{SHARED}.down_proj",),
                                   f"{SHARED}.down_proj", f"{SHARED}.down_proj"))
        for e in range(moe.num_experts):
            _, up, down = self.expert_linears(e)
            sites.append(ScaleSite(f"up_down.{e}", up, (down,), down, down))
        for site in sites:
            self._require(block, [site.prev, site.loss_module, *site.linears])
        return sites

    def smooth_sites(self, block: "nn.Module") -> list[SmoothSite]:
        moe = self.sparse(block)
        if moe is None:
            return super().smooth_sites(block)
        sites = [SmoothSite("attn_in", self.input_norm, self.qkv_linears),
                 SmoothSite("mlp_in", self.post_attn_norm, tuple(self._mlp_in(moe)))]
        for site in sites:
            self._require(block, [site.norm, *site.linears])
        return sites

    def sequential_groups(self, block: "nn.Module | None" = None) -> list[list[str]]:
        moe = self.sparse(block)
        if moe is None:
            return super().sequential_groups(block)
        groups = [list(self.qkv_linears[1:]) + [self.qkv_linears[0]], [self.o_linear],
                  self._mlp_in(moe), self._downs(moe)]
        if block is not None:
            self._require(block, [n for g in groups for n in g])
        return groups
