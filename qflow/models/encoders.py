"""BERT-family encoders (bert, roberta, xlm-roberta): the adapter and the model class to load.

A BERT layer is **post-LN** (transformers 5.24 ``modeling_bert.py``)::

    a   = LN_attn(h + dense_o(attention(query(h), key(h), value(h))))      # attention.output.LayerNorm
    out = LN_out(a + dense_out(gelu(dense_in(a))))                          # output.LayerNorm

What that means for an AWQ / SmoothQuant scale ``s`` (docs/METHODS.md §4.3):

* ``value -> attention.output.dense`` **folds exactly**: the attention output is a
  softmax-weighted sum of the value rows, linear in them, so dividing value's rows
  (and bias) by ``s`` and multiplying dense_o's columns by ``s`` leaves the block
  unchanged. It is the one AWQ site of an encoder layer.
* ``LN -> query/key/value`` and ``LN_attn -> intermediate.dense`` do **not** fold:
  the LayerNorm that feeds the linears (the previous layer's ``output.LayerNorm``,
  the embeddings' LayerNorm for layer 0, ``attention.output.LayerNorm`` for the MLP)
  also feeds the residual add of the same layer (``h +`` / ``a +`` above), which has
  no op of its own to take the inverse scale. Folding ``1/s`` into the LayerNorm
  would change the residual stream, so qflow does not search these sites (a
  pre-LN decoder has them because its residual stream bypasses the norm).
* ``intermediate.dense -> output.dense`` does not fold: GELU lies between them.

So AWQ on an encoder = the value->dense_o scale search, the clip search on every
linear but query/key, and RTN rounding; SmoothQuant has no site (it quantizes
W8A8 without smoothing, as for OLMo 2). GPTQ's true-sequential groups are
``[key, value, query] -> [attention.output.dense] -> [intermediate.dense] -> [output.dense]``.

Example::

    model = AutoModelForMaskedLM.from_config(BertConfig(...))
    adapter = get_adapter(model)                # EncoderAdapter
    adapter.block_name(0)                       # "bert.encoder.layer.0"
    [s.name for s in adapter.awq_sites(adapter.blocks()[0])]   # ["v_o"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import StageError
from .adapters import ArchAdapter, ScaleSite, SmoothSite, register_adapter

if TYPE_CHECKING:
    from torch import nn

ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# checkpoints whose saved head is a masked-LM head (loaded with AutoModelForMaskedLM)
_MLM_ARCHITECTURES = ("ForMaskedLM", "ForPreTraining")


def _field(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def is_encoder(config: Any) -> bool:
    """True for a BERT-family encoder config (a transformers config or a config.json dict)."""
    return _field(config, "model_type") in ENCODER_MODEL_TYPES


def has_mlm_head(config: Any) -> bool:
    """True when the checkpoint's ``architectures`` name a masked-LM head (``BertForMaskedLM``, ...)."""
    return any(str(a).endswith(_MLM_ARCHITECTURES) for a in (_field(config, "architectures") or []))


def auto_model_class(config: Any):
    """The transformers Auto class to build / load ``config`` with.

    Decoders: ``AutoModelForCausalLM``. Encoders: ``AutoModelForMaskedLM`` when the
    checkpoint carries an MLM head (``architectures``), else ``AutoModel`` (a
    sentence-transformers folder or a bare ``BertModel``; a task head such as
    ``BertForSequenceClassification`` is not loaded).
    """
    import transformers

    if not is_encoder(config):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForMaskedLM if has_mlm_head(config) else transformers.AutoModel


def max_tokens(config: Any) -> int | None:
    """The longest input the encoder accepts: roberta's positions start after ``pad_token_id``, so 2 fewer."""
    max_pos = _field(config, "max_position_embeddings")
    if max_pos is None:
        return None
    if _field(config, "model_type") in ("roberta", "xlm-roberta"):
        return int(max_pos) - int(_field(config, "pad_token_id", 1) or 0) - 1
    return int(max_pos)


def mean_pool(hidden, attention_mask):
    """Sentence embeddings: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)`` in fp32 (sentence-transformers' mean pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).float()


@register_adapter
class EncoderAdapter(ArchAdapter):
    """BERT / RoBERTa / XLM-RoBERTa layers (post-LN; see the module doc for what folds).

    The encoder stack is ``<base>.encoder.layer`` where ``<base>`` is the model itself
    (``BertModel``) or its ``base_model_prefix`` attribute (``BertForMaskedLM.bert``).
    """

    model_types = ENCODER_MODEL_TYPES
    qkv_linears = ("attention.self.query", "attention.self.key", "attention.self.value")
    o_linear = "attention.output.dense"
    gate_up_linears = ("intermediate.dense",)
    down_linear = "output.dense"
    v_rows = "attention.self.value"
    up_rows = "intermediate.dense"          # no up->down site: GELU lies between
    input_norm = None                       # the norms feeding q/k/v and the MLP also feed the residual
    post_attn_norm = None
    attn_post_norm = "attention.output.LayerNorm"
    mlp_post_norm = "output.LayerNorm"
    splits_residual = False                 # LN(h + o(x)): GPTQ's residual shortcut does not hold
    clip_skip_markers: ClassVar[tuple[str, ...]] = ("query", "key")

    def __init__(self, model: "nn.Module"):
        self.model = model
        self.config = model.config
        base = getattr(model, "base_model", model)
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        if layers is None:
            raise StageError(f"{type(model).__name__} has no .encoder.layer ({self.config.model_type})",
                             where="qflow.models.encoders",
                             fix="load the encoder with AutoModel or AutoModelForMaskedLM")
        self.base = base
        prefix = next(name for name, mod in model.named_modules() if mod is base)
        self._prefix = f"{prefix}.encoder.layer" if prefix else "encoder.layer"

    @property
    def block_prefix(self) -> str:
        return self._prefix

    def blocks(self, model: "nn.Module | None" = None) -> "nn.ModuleList":
        net = model or self.model
        return getattr(net, "base_model", net).encoder.layer

    def embeddings(self) -> "nn.Module":
        return self.base.embeddings

    def rotary(self) -> None:
        return None

    def final_norm(self) -> None:
        """None: a post-LN stack ends with the last layer's ``output.LayerNorm``."""
        return None

    def awq_sites(self, block: "nn.Module") -> list[ScaleSite]:
        """Only value -> attention.output.dense folds exactly (module doc)."""
        sites = []
        if self.v_o_foldable(block):
            sites.append(ScaleSite("v_o", self.v_rows, (self.o_linear,), self.o_linear, self.o_linear))
        for site in sites:
            self._require(block, [site.prev, site.loss_module, *site.linears])
        return sites

    def smooth_sites(self, block: "nn.Module") -> list[SmoothSite]:
        """None: every LayerNorm feeding linears also feeds a residual add (module doc)."""
        return []

    def attention_half(self, block, hidden, kwargs):
        raise StageError("an encoder layer has no residual split", where="qflow.models.encoders",
                         fix="run the whole layer (splits_residual is False)")

    def mlp_half(self, block, hidden):
        raise StageError("an encoder layer has no residual split", where="qflow.models.encoders",
                         fix="run the whole layer (splits_residual is False)")
