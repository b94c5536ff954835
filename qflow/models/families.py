"""Adapters for the decoder families beyond Llama / Mistral / Qwen2 (docs/ARCHITECTURE.md "Model families").

Each class only states how its block differs from the Llama layout; the AWQ and
SmoothQuant sites, GPTQ's true-sequential groups and the shared inputs follow
from these attributes (qflow/models/adapters.py). What is read off the model
rather than declared: GQA (site v->o exists only when the value rows match
o_proj's input columns), fused projections' row split, and the norm convention
(``w`` vs ``1 + w``, :func:`qflow.models.adapters.norm_weight_offset`).

Example::

    adapter = get_adapter(Gemma2ForCausalLM(cfg))
    [s.prev for s in adapter.awq_sites(block)]   # input_layernorm, ..., pre_feedforward_layernorm, mlp.up_proj
"""

from __future__ import annotations

from .adapters import ArchAdapter, register_adapter


@register_adapter
class Qwen3Adapter(ArchAdapter):
    """Qwen3: Llama layout plus per-head RMSNorms on q and k after the projections (not fold targets)."""

    model_types = ("qwen3",)


@register_adapter
class GraniteAdapter(ArchAdapter):
    """Granite: Llama layout; each half's output is multiplied by ``residual_multiplier`` before the
    residual add, so GPTQ's ``residual + o_proj(x)`` shortcut does not hold (splits_residual off)."""

    model_types = ("granite",)
    splits_residual = False


@register_adapter
class GemmaAdapter(ArchAdapter):
    """Gemma: Llama layout; RMSNorm scales by ``1 + w`` (folds write ``w' = (1 + w)/s - 1``)."""

    model_types = ("gemma",)


@register_adapter
class Gemma2Adapter(ArchAdapter):
    """Gemma 2 / Gemma 3 text: ``1 + w`` RMSNorms, a pre- and a post-norm around both halves.

    ``post_attention_layernorm`` here normalises the attention *output* (a post-norm); the
    MLP reads ``pre_feedforward_layernorm``, which is therefore the mlp_in fold target.
    Post-norms follow o_proj / down_proj, so the v->o and up->down folds stay exact.
    Gemma 3 adds per-head q/k norms (not fold targets).
    """

    model_types = ("gemma2", "gemma3_text")
    post_attn_norm = "pre_feedforward_layernorm"
    attn_post_norm = "post_attention_layernorm"
    mlp_post_norm = "post_feedforward_layernorm"
    splits_residual = False


@register_adapter
class Olmo2Adapter(ArchAdapter):
    """OLMo 2: post-norms only (``h + norm(attn(h))``, ``h + norm(mlp(h))``), q/k RMSNorms over the
    whole projection width.

    q/k/v and gate/up read the raw residual stream: no op to fold an inverse scale
    into, so AWQ keeps only v->o (no GQA) and up->down, and SmoothQuant has no site
    (it quantizes W8A8 without smoothing).
    """

    model_types = ("olmo2",)
    input_norm = None
    post_attn_norm = None
    attn_post_norm = "post_attention_layernorm"
    mlp_post_norm = "post_feedforward_layernorm"
    splits_residual = False


@register_adapter
class CohereAdapter(ArchAdapter):
    """Cohere (Command R): parallel blocks, ``h + self_attn(n) + mlp(n)`` with ``n = input_layernorm(h)``
    (a LayerNorm without bias), optional per-head q/k LayerNorms (not fold targets).

    One norm feeds q/k/v and gate/up together, so a scale folded into it would have to be
    searched against the attention and the MLP at once; qflow's AWQ site searches one
    module's output, so that site is skipped (input_norm None, as for OLMo 2) and AWQ keeps
    v->o (no GQA) and up->down; SmoothQuant has no site. The halves do not compose
    sequentially, so GPTQ runs whole blocks (splits_residual off).
    """

    model_types = ("cohere",)
    input_norm = None
    post_attn_norm = None
    splits_residual = False


@register_adapter
class Phi3Adapter(ArchAdapter):
    """Phi-3 / Phi-4: fused ``qkv_proj`` (rows q | k | v) and ``gate_up_proj`` (rows gate | up).

    v->o folds into the last rows of qkv_proj (when there is no GQA), up->down into the
    last half of gate_up_proj. The clip search skips qkv_proj, which holds the query and
    key rows.
    """

    model_types = ("phi3",)
    qkv_linears = ("self_attn.qkv_proj",)
    gate_up_linears = ("mlp.gate_up_proj",)
    v_rows = "self_attn.qkv_proj"
    up_rows = "mlp.gate_up_proj"
    clip_skip_markers = ArchAdapter.clip_skip_markers + ("qkv",)


# families a user may bring that no adapter handles, with the fix to print
UNSUPPORTED: dict[str, str] = {
    "gemma3": "load the text model (Gemma3ForCausalLM, model_type gemma3_text); the multimodal "
              "Gemma3ForConditionalGeneration is not supported",
    "cohere2": "Cohere 2's interleaved sliding-window parallel blocks have no adapter yet (cohere, Command R, "
               "is supported)",
    "modernbert": "ModernBERT encoders have no adapter yet (bert, roberta and xlm-roberta encoders are supported)",
}
