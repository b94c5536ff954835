"""Llama decoder as an ONNX graph with an explicit KV cache, written node by node.

The graph is the one onnxruntime's own LLM builder emits for CPU, fused where
onnxruntime has fused kernels:

* token embedding ``Gather``; RMSNorm as plain ops for the first norm (onnxruntime
  fuses them into ``SimplifiedLayerNormalization``; the graph stays checker-clean) and
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (residual add + norm) after that;
* attention = one packed QKV projection + ``com.microsoft.GroupQueryAttention``
  (rotary inside, GQA heads, BNSH KV cache ``past_key_values.N.key/value`` in,
  ``present.N.key/value`` out) + ``o_proj``;
* MLP = one packed gate/up projection, ``Split``, ``x*Sigmoid(x)*up``, ``down_proj``;
* ``lm_head`` = float ``com.microsoft.FusedMatMul(transB=1)`` over the ``[vocab, hidden]``
  embedding (tied: the same initializer as the token embedding), or a plain ``MatMul``
  over a transposed copy (``ExportSettings.lm_head="matmul"``).

Each linear is ``MatMul`` (float), ``com.microsoft.MatMulNBits`` (qflow's codes, bit
for bit) or W8A8 ``MatMulInteger`` nodes (qflow/export/onnx_nodes.py); its weights are
converted from the checkpoint in qflow/export/onnx_weights.py.

Inputs: ``input_ids`` int64 ``[batch, seq]``, ``attention_mask`` int64
``[batch, past+seq]`` (all ones for batch-1 decoding), and per layer
``past_key_values.N.key/value`` fp32 ``[batch, kv_heads, past, head_dim]``.
Outputs: ``logits`` fp32 ``[batch, seq, vocab]`` and ``present.N.key/value``.

Weights go to one external-data file beside the model (``model.onnx.data``),
written tensor by tensor, so the in-memory graph stays small.

Example::

    info = build_onnx(model_dir, out_dir, ckpt=Checkpoint(ir), mode="quantized")
    sess = onnxruntime.InferenceSession(str(info.model_path))
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .onnx_nodes import MS_DOMAIN, W8A8_MATMUL, ExportSettings, GraphWriter, linear_nodes
from .onnx_weights import FloatSource, LinearWeights, OnnxExportError, concat_linears, float_linear, quantized_linear

OPSET = 21
DATA_SUFFIX = ".data"


# ---------------------------------------------------------------------------
# model geometry
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaDims:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    tied: bool
    max_positions: int

    @classmethod
    def from_config(cls, config: Any) -> "LlamaDims":
        model_type = getattr(config, "model_type", None)
        if model_type != "llama":
            raise OnnxExportError(f"the ONNX exporter handles Llama decoders; this model is '{model_type}'",
                                  fix="export a Llama-architecture model, or use export.safetensors")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise OnnxExportError("Llama with linear biases (attention_bias/mlp_bias) is not supported by the ONNX exporter")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise OnnxExportError(f"hidden_act {config.hidden_act} is not supported (silu only)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(n_layers=config.num_hidden_layers, hidden=config.hidden_size, n_heads=heads,
                   n_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=config.intermediate_size, vocab=config.vocab_size, rms_eps=float(config.rms_norm_eps),
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   max_positions=int(config.max_position_embeddings))


def rotary_caches(config: Any, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) fp32 ``[max_positions, head_dim/2]`` from transformers' own rotary module.

    Using the model's ``LlamaRotaryEmbedding`` keeps every rope variant (theta,
    llama3 / linear / dynamic-free scaling, attention_scaling) identical to the
    reference forward.
    """
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(config=config)
    pos = torch.arange(max_positions, dtype=torch.long)[None]
    dummy = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rope(dummy, pos)
    half = cos.shape[-1] // 2
    if not torch.equal(cos[0, :, :half], cos[0, :, half:]):
        raise OnnxExportError("rotary embedding halves differ: only rotate_half (non-interleaved) rope is supported")
    return cos[0, :, :half].float().numpy().copy(), sin[0, :, :half].float().numpy().copy()



@dataclass
class ExportInfo:
    model_path: Path
    data_path: Path
    mode: str
    dims: dict
    linear_kinds: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    variants: dict[int, Path] = field(default_factory=dict)   # accuracy level -> graph file (same data file)

    def to_json(self) -> dict:
        out = {"model": self.model_path.name, "data": self.data_path.name, "mode": self.mode, "dims": self.dims,
               "linear_kinds": self.linear_kinds, "settings": self.settings,
               "accuracy_variants": {str(k): v.name for k, v in self.variants.items()}}
        if self.linear_kinds.get("w8a8"):
            path = self.settings.get("w8a8_matmul", "u8u8")
            out["w8a8_matmul"] = {"path": path, "why": W8A8_MATMUL[path]}
        return out


LINEARS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def build_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, ckpt: Any | None = None,
               mode: Literal["quantized", "float"] = "quantized", settings: ExportSettings | None = None,
               filename: str = "model.onnx", max_positions: int | None = None) -> ExportInfo:
    """Write ``out_dir/filename`` (+ ``filename.data``): the decoder with a KV cache.

    ``mode="quantized"`` turns each checkpoint layer into MatMulNBits / W8A8 nodes;
    ``mode="float"`` writes the same graph with fp32 ``MatMul`` weights (the checkpoint's
    dequantized weights when ``ckpt`` is given, else the base model's).
    """
    from transformers import AutoConfig

    settings = settings or ExportSettings()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "quantized" and ckpt is None:
        raise OnnxExportError("a quantized export needs a checkpoint")
    from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

    with remote_code_refusal(str(model_dir)):   # only the command line's --trust-remote-code, never a recipe
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=remote_code_allowed())
    dims = LlamaDims.from_config(config)
    src = FloatSource(model_dir, ckpt)
    _check_layer_names(ckpt, dims)
    model_path = out_dir / filename
    data_path = out_dir / (filename + DATA_SUFFIX)
    g = GraphWriter(data_path)
    try:
        decoder = _DecoderWriter(g, dims, settings, src, ckpt, mode)
        decoder.write(config, int(max_positions or dims.max_positions))
    finally:
        g.close()
    meta = {"qflow.mode": mode, "qflow.dims": json.dumps(asdict(dims)), "qflow.settings": json.dumps(asdict(settings))}
    if ckpt is not None:
        meta["qflow.method"] = str(getattr(ckpt, "method", ""))
    _save_model(g, _io_signature(dims), meta, model_path)
    return ExportInfo(model_path=model_path, data_path=data_path, mode=mode, dims=asdict(dims),
                      linear_kinds=decoder.kinds, settings=asdict(settings))


def _check_layer_names(ckpt: Any | None, dims: LlamaDims) -> None:
    layers = ckpt.layers if ckpt is not None else {}
    known = {f"model.layers.{i}.{s}" for i in range(dims.n_layers) for group in LINEARS.values() for s in group}
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise OnnxExportError(f"checkpoint quantizes layers outside the decoder linears: {unknown[:3]}")


def _io_signature(dims: LlamaDims) -> tuple[list, list]:
    """(graph inputs, graph outputs): ids, mask and the past KV cache in; logits and the present cache out."""
    from onnx import TensorProto, helper

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", dims.vocab])]
    kv_shape = ["batch_size", dims.n_kv_heads, "past_sequence_length", dims.head_dim]
    present_shape = ["batch_size", dims.n_kv_heads, "total_sequence_length", dims.head_dim]
    for i in range(dims.n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32, present_shape))
    return inputs, outputs


def _save_model(g: GraphWriter, signature: tuple[list, list], meta: dict[str, str], model_path: Path) -> None:
    """The graph proto (weights already in ``g``'s data file) written atomically to ``model_path``."""
    import onnx
    from onnx import helper

    inputs, outputs = signature
    graph = helper.make_graph(g.nodes, "qflow_llama_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="qflow", ir_version=10)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = model_path.with_suffix(".onnx.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, model_path)


class _DecoderWriter:
    """Adds the decoder's nodes and weights to a graph, block by block, in a fixed order.

    The residual stream is carried between calls: ``pending`` is the output of the
    last attention or MLP, added to ``residual`` by the next norm (fused into
    ``SkipSimplifiedLayerNormalization`` after the first).
    """

    def __init__(self, g: GraphWriter, dims: LlamaDims, settings: ExportSettings, src: FloatSource, ckpt: Any | None,
                 mode: str):
        self.g, self.dims, self.settings, self.src, self.ckpt, self.mode = g, dims, settings, src, ckpt, mode
        self.layers = ckpt.layers if ckpt is not None else {}
        self.kinds: dict[str, int] = {}         # linear kind -> count, in the order first written
        self.residual = ""
        self.pending: str | None = None

    def write(self, config: Any, max_positions: int) -> None:
        g = self.g
        seqlens, total = self._attention_lengths()
        cos, sin = rotary_caches(config, max_positions)
        g.init("rotary.cos_cache", cos)
        g.init("rotary.sin_cache", sin)
        embed = g.init("model.embed_tokens.weight", self.src.get("model.embed_tokens.weight"))
        self.residual = g.one("Gather", [embed, "input_ids"], axis=0, name="model.embed_tokens/Gather")
        for i in range(self.dims.n_layers):
            p = f"model.layers.{i}"
            x = self._norm(f"{p}.input_layernorm.weight", f"{p}/input_layernorm")
            self.pending = self._attention(x, i, seqlens, total)
            x = self._norm(f"{p}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm")
            self.pending = self._mlp(x, i)
        self._lm_head(self._norm("model.norm.weight", "model/norm"), embed)

    def _attention_lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's ``seqlens_k = sum(mask) - 1`` and ``total = mask width``, shared by every layer."""
        from onnx import TensorProto

        g = self.g
        mask_sum = g.one("ReduceSum", ["attention_mask", g.const("axes", np.array([1], np.int64))], keepdims=0,
                         name="attn_mask/sum")
        seqlens = g.one("Cast", [g.one("Sub", [mask_sum, g.const("one", np.array(1, np.int64))],
                                       name="attn_mask/sub")], to=TensorProto.INT32, name="attn_mask/seqlens_k")
        total = g.one("Cast", [g.one("Gather", [g.one("Shape", ["attention_mask"], name="attn_mask/shape"),
                                                g.const("idx", np.array(1, np.int64))], axis=0,
                                     name="attn_mask/total_i64")], to=TensorProto.INT32, name="attn_mask/total")
        return seqlens, total

    def _weights(self, name: str) -> LinearWeights:
        if name in self.layers and self.mode == "quantized":
            w = quantized_linear(self.ckpt, name)
        elif name in self.layers:
            w = float_linear(self.ckpt.dequantized(name).numpy())
        else:
            w = float_linear(self.src.get(name + ".weight"))
        self.kinds[w.kind] = self.kinds.get(w.kind, 0) + 1
        return w

    def _linear_group(self, x: str, i: int, group: str, fuse: bool) -> list[str]:
        """Outputs of one LINEARS group: one packed node when ``fuse`` and the parts allow, else one per linear."""
        names = [f"model.layers.{i}.{s}" for s in LINEARS[group]]
        parts = [self._weights(n) for n in names]
        if fuse and len(parts) > 1:
            packed = concat_linears(parts, names)
            if packed is not None:
                return [linear_nodes(self.g, x, packed, f"model.layers.{i}.{group}", self.settings)]
        return [linear_nodes(self.g, x, w, n, self.settings) for w, n in zip(parts, names)]

    def _norm(self, weight_key: str, name: str) -> str:
        g, eps = self.g, self.dims.rms_eps
        gamma = g.init(weight_key, self.src.get(weight_key))
        if self.pending is None:
            # plain ONNX ops (checker-clean); onnxruntime fuses them into SimplifiedLayerNormalization
            sq = g.one("Pow", [self.residual, g.const("two", np.array(2.0, np.float32))], name=f"{name}/Pow")
            var = g.one("ReduceMean", [sq, g.const("axes", np.array([-1], np.int64))], keepdims=1,
                        name=f"{name}/ReduceMean")
            var = g.one("Add", [var, g.const("eps", np.array(eps, np.float32))], name=f"{name}/Add")
            normed = g.one("Div", [self.residual, g.one("Sqrt", [var], name=f"{name}/Sqrt")], name=f"{name}/Div")
            return g.one("Mul", [normed, gamma], name=f"{name}/Mul")
        # the unused optional outputs (mean, inverse std) are empty names
        out, _, _, summed = g.node("SkipSimplifiedLayerNormalization", [self.pending, self.residual, gamma],
                                   [f"{name}/out", "", "", f"{name}/residual"], domain=MS_DOMAIN, epsilon=eps,
                                   name=name)
        self.residual, self.pending = summed, None
        return out

    def _attention(self, x: str, i: int, seqlens: str, total: str) -> str:
        """q|k|v projection, GroupQueryAttention (rotary, KV cache in/out) and o_proj of block ``i``."""
        p, dims = f"model.layers.{i}", self.dims
        qkv = self._linear_group(x, i, "attn", self.settings.fuse_qkv)
        q, k, v = (qkv[0], "", "") if len(qkv) == 1 else qkv
        attn = self.g.node("GroupQueryAttention",
                           [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
                            "rotary.cos_cache", "rotary.sin_cache"],
                           [f"{p}/attn/out", f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
                           name=f"{p}/attn/GroupQueryAttention", num_heads=dims.n_heads,
                           kv_num_heads=dims.n_kv_heads, scale=1.0 / math.sqrt(dims.head_dim), do_rotary=1,
                           rotary_interleaved=0)[0]
        return self._linear_group(attn, i, "o", False)[0]

    def _mlp(self, x: str, i: int) -> str:
        """gate|up projection, ``silu(gate) * up`` and down_proj of block ``i``."""
        g, p = self.g, f"model.layers.{i}"
        gu = self._linear_group(x, i, "gate_up", self.settings.fuse_gate_up)
        if len(gu) == 1:
            gate, up = g.node("Split", [gu[0], g.const("split", np.array([self.dims.intermediate] * 2, np.int64))],
                              2, axis=-1, name=f"{p}/mlp/Split")
        else:
            gate, up = gu
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate], name=f"{p}/mlp/sigmoid")], name=f"{p}/mlp/silu")
        act = g.one("Mul", [act, up], name=f"{p}/mlp/act_mul")
        return self._linear_group(act, i, "down", False)[0]

    def _lm_head(self, x: str, embed: str) -> None:
        """``logits``: FusedMatMul(transB) over the [vocab, hidden] weight, or MatMul over a transposed copy."""
        g = self.g
        head = None if self.dims.tied or not self.src.has("lm_head.weight") else self.src.get("lm_head.weight")
        if self.settings.lm_head == "fused_transposed":
            w_name = embed if head is None else g.init("lm_head.weight", head)
            g.node("FusedMatMul", [x, w_name], ["logits"], domain=MS_DOMAIN, transB=1, name="lm_head/FusedMatMul")
        else:
            w = head if head is not None else self.src.get("model.embed_tokens.weight")
            g.node("MatMul", [x, g.init("lm_head.weight_t", np.ascontiguousarray(w.T))], ["logits"],
                   name="lm_head/MatMul")


def write_accuracy_variant(model_path: str | os.PathLike, new_path: str | os.PathLike, accuracy_level: int) -> Path:
    """Copy of a written graph whose MatMulNBits nodes use ``accuracy_level``; it shares the same data file.

    The two graphs differ only in that attribute, so both sit beside one ``.data`` file.
    """
    import onnx
    from onnx import helper

    model_path, new_path = Path(model_path), Path(new_path)
    if new_path.parent.resolve() != model_path.parent.resolve():
        raise ValueError("an accuracy variant must sit beside the model (it shares its external data file)")
    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", int(accuracy_level))])
    settings = next((p for p in model.metadata_props if p.key == "qflow.settings"), None)
    if settings is not None:
        data = json.loads(settings.value)
        data["accuracy_level"] = int(accuracy_level)
        settings.value = json.dumps(data)
    tmp = new_path.with_suffix(".onnx.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, new_path)
    return new_path


def has_nbits(model_path: str | os.PathLike) -> bool:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(n.op_type == "MatMulNBits" for n in model.graph.node)


def export_quantized(model_dir: str | os.PathLike, out_dir: str | os.PathLike, ckpt: Any, *, accuracy_level: int = 4,
                     other_level: int | None = 0, settings: ExportSettings | None = None,
                     max_positions: int | None = None) -> ExportInfo:
    """The quantized graph at ``accuracy_level`` (``model.onnx``) and, when it has MatMulNBits
    nodes, the same graph at ``other_level`` (``model_acc{other}.onnx``, same data file).

    ``info.variants`` maps accuracy level -> graph file; a graph without MatMulNBits
    (W8A8) maps every requested level to ``model.onnx``.
    """
    base = settings or ExportSettings()
    s = ExportSettings(**{**asdict(base), "accuracy_level": int(accuracy_level)})
    info = build_onnx(model_dir, out_dir, ckpt=ckpt, mode="quantized", settings=s, max_positions=max_positions)
    paths = {int(accuracy_level): info.model_path}
    if other_level is not None and int(other_level) != int(accuracy_level):
        if info.linear_kinds.get("nbits"):
            paths[int(other_level)] = write_accuracy_variant(
                info.model_path, info.model_path.with_name(f"model_acc{int(other_level)}.onnx"), int(other_level))
        else:
            paths[int(other_level)] = info.model_path
    info.variants = paths
    return info
