"""A BERT-family encoder (bert, roberta, xlm-roberta) as an ONNX graph, written node by node.

    info = build_encoder_onnx(model_dir, out_dir, ckpt=Checkpoint(ir), accuracy_level=0)
    metrics = encoder_roundtrip(info.model_path, ckpt, model_dir, batches)

The graph is ``modeling_bert.py``'s forward in standard ops (opset 21):

* embeddings: word ``Gather`` + position ``Gather`` (bert: ``0..S-1``; roberta:
  ``cumsum(ids != pad) * (ids != pad) + pad``, as ``create_position_ids_from_input_ids``)
  + the token-type-0 row (single-segment inputs: no ``token_type_ids`` input), then
  ``LayerNormalization``;
* per layer: query/key/value (+ bias) → heads → ``MatMul`` · 1/sqrt(head_dim) + the
  additive mask ``(1 - mask) · float32.min`` → ``Softmax`` → ``MatMul`` → dense_o (+ bias)
  → ``LayerNormalization(x + ·)``; intermediate (+ bias) → ``Gelu`` (erf; ``tanh`` for
  gelu_new / gelu_pytorch_tanh) → output dense (+ bias) → ``LayerNormalization(a + ·)``;
* the masked-LM head when the checkpoint has one (dense, GELU, LayerNorm, the tied
  word-embedding decoder as a float ``MatMul``, bias).

Every linear is a float ``MatMul`` or qflow's codes as ``com.microsoft.MatMulNBits`` /
W8A8 nodes (qflow/export/onnx_nodes.py, onnx_weights.py). Inputs ``input_ids``,
``attention_mask`` (int64 ``[batch, seq]``); outputs ``last_hidden_state`` and, with
an MLM head, ``logits``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_graph import DATA_SUFFIX, ExportInfo, _save_model
from .onnx_nodes import ExportSettings, GraphWriter, linear_nodes
from .onnx_weights import FloatSource, OnnxExportError, float_linear, quantized_linear

LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _prefix(src: FloatSource, model_type: str) -> str:
    """``bert.`` / ``roberta.`` for an MLM checkpoint, ``""`` for a bare encoder."""
    for p in (f"{model_type.split('-')[-1]}.", "bert.", "roberta.", ""):
        if src.has(f"{p}embeddings.word_embeddings.weight"):
            return p
    raise OnnxExportError("the base folder has no embeddings.word_embeddings.weight under bert./roberta./(none)",
                          fix="export a standard transformers encoder checkpoint")


class _EncoderWriter:
    def __init__(self, g: GraphWriter, config: Any, src: FloatSource, ckpt: Any | None, settings: ExportSettings):
        self.g, self.config, self.src, self.ckpt, self.settings = g, config, src, ckpt, settings
        self.kinds: dict[str, int] = {}
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.head_dim = self.hidden // self.heads
        self.eps = float(config.layer_norm_eps)

    def f(self, key: str) -> np.ndarray:
        return self.src.get(key).astype(np.float32)

    def layernorm(self, x: str, key: str, name: str) -> str:
        g = self.g
        return g.one("LayerNormalization", [x, g.init(f"{key}.weight", self.f(f"{key}.weight")),
                                            g.init(f"{key}.bias", self.f(f"{key}.bias"))],
                     axis=-1, epsilon=self.eps, name=name)

    def linear(self, x: str, key: str) -> str:
        """``x W^T + b`` of the linear ``key``: quantized when the checkpoint holds it, else float."""
        g = self.g
        layers = self.ckpt.layers if self.ckpt is not None else {}
        w = quantized_linear(self.ckpt, key) if key in layers else float_linear(self.f(f"{key}.weight"))
        self.kinds[w.kind] = self.kinds.get(w.kind, 0) + 1
        y = linear_nodes(g, x, w, key, self.settings)
        if self.src.has(f"{key}.bias"):
            y = g.one("Add", [y, g.init(f"{key}.bias", self.f(f"{key}.bias"))], name=f"{key}/bias")
        return y

    def gelu(self, x: str, act: str, name: str) -> str:
        if act not in _GELU:
            raise OnnxExportError(f"hidden_act {act!r} has no ONNX form here (gelu, gelu_new, gelu_pytorch_tanh)",
                                  fix="export with export.safetensors")
        return self.g.one("Gelu", [x], approximate=_GELU[act], name=name)

    def embeddings(self, p: str) -> str:
        from onnx import TensorProto

        g, c = self.g, self.config
        i64 = lambda v: g.const("i64", np.array(v, np.int64))   # noqa: E731
        word = g.one("Gather", [g.init(f"{p}embeddings.word_embeddings.weight",
                                       self.f(f"{p}embeddings.word_embeddings.weight")), "input_ids"], name="embed/word")
        pos_table = g.init(f"{p}embeddings.position_embeddings.weight",
                           self.f(f"{p}embeddings.position_embeddings.weight"))
        if c.model_type == "bert":   # rows 0..S-1 of the table
            seq = g.one("Shape", ["input_ids"], start=1, end=2, name="embed/seq")
            pos = g.one("Slice", [pos_table, i64([0]), seq, i64([0])], name="embed/position")
        else:   # roberta: positions count non-pad tokens, starting after padding_idx
            pad = int(c.pad_token_id)
            keep = g.one("Cast", [g.one("Not", [g.one("Equal", ["input_ids", i64(pad)], name="embed/is_pad")],
                                        name="embed/not_pad")], to=TensorProto.INT64, name="embed/keep")
            count = g.one("CumSum", [keep, i64(1)], name="embed/cumsum")
            pos_ids = g.one("Add", [g.one("Mul", [count, keep], name="embed/mask_pos"), i64(pad)], name="embed/pos")
            pos = g.one("Gather", [pos_table, pos_ids], axis=0, name="embed/position")
        token_type0 = self.f(f"{p}embeddings.token_type_embeddings.weight")[0]
        x = g.one("Add", [g.one("Add", [word, pos], name="embed/add_pos"),
                          g.init(f"{p}embeddings.token_type0", token_type0)], name="embed/add_type")
        return self.layernorm(x, f"{p}embeddings.LayerNorm", "embed/LayerNorm")

    def mask_bias(self) -> str:
        from onnx import TensorProto

        g = self.g
        m = g.one("Cast", ["attention_mask"], to=TensorProto.FLOAT, name="mask/float")
        m = g.one("Unsqueeze", [m, g.const("axes", np.array([1, 2], np.int64))], name="mask/unsqueeze")
        inv = g.one("Sub", [g.const("one", np.array(1.0, np.float32)), m], name="mask/invert")
        return g.one("Mul", [inv, g.const("fmin", np.array(np.finfo(np.float32).min, np.float32))], name="mask/bias")

    def layer(self, x: str, key: str, bias: str) -> str:
        g = self.g
        heads = g.const("heads_shape", np.array([0, 0, self.heads, self.head_dim], np.int64))
        q, k, v = (g.one("Reshape", [self.linear(x, f"{key}.attention.self.{n}"), heads], name=f"{key}/{n}_heads")
                   for n in ("query", "key", "value"))
        q = g.one("Transpose", [q], perm=[0, 2, 1, 3], name=f"{key}/q_t")
        k = g.one("Transpose", [k], perm=[0, 2, 3, 1], name=f"{key}/k_t")
        v = g.one("Transpose", [v], perm=[0, 2, 1, 3], name=f"{key}/v_t")
        scores = g.one("Mul", [g.one("MatMul", [q, k], name=f"{key}/qk"),
                               g.const("scale", np.array(self.head_dim ** -0.5, np.float32))], name=f"{key}/scale")
        probs = g.one("Softmax", [g.one("Add", [scores, bias], name=f"{key}/mask")], axis=-1, name=f"{key}/softmax")
        ctx = g.one("Transpose", [g.one("MatMul", [probs, v], name=f"{key}/pv")], perm=[0, 2, 1, 3],
                    name=f"{key}/ctx_t")
        ctx = g.one("Reshape", [ctx, g.const("hidden_shape", np.array([0, 0, self.hidden], np.int64))],
                    name=f"{key}/ctx")
        attn = self.linear(ctx, f"{key}.attention.output.dense")
        a = self.layernorm(g.one("Add", [attn, x], name=f"{key}/attn_residual"), f"{key}.attention.output.LayerNorm",
                           f"{key}/attn_LayerNorm")
        mid = self.gelu(self.linear(a, f"{key}.intermediate.dense"), self.config.hidden_act, f"{key}/gelu")
        out = self.linear(mid, f"{key}.output.dense")
        return self.layernorm(g.one("Add", [out, a], name=f"{key}/out_residual"), f"{key}.output.LayerNorm",
                              f"{key}/out_LayerNorm")

    def mlm_head(self, x: str, p: str) -> str | None:
        g, src = self.g, self.src
        if src.has("cls.predictions.transform.dense.weight"):
            dense, norm, bias, act = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                      "cls.predictions.bias", self.config.hidden_act)
        elif src.has("lm_head.dense.weight"):
            dense, norm, bias, act = "lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "gelu"
        else:
            return None
        h = self.layernorm(self.gelu(self.linear(x, dense), act, "head/gelu"), norm, "head/LayerNorm")
        decoder = next((k for k in ("cls.predictions.decoder.weight", "lm_head.decoder.weight") if src.has(k)),
                       f"{p}embeddings.word_embeddings.weight")   # tied: the word embeddings
        logits = g.one("MatMul", [h, g.init("head.decoder.weight_t", np.ascontiguousarray(self.f(decoder).T))],
                       name="head/decoder")
        return g.node("Add", [logits, g.init("head.bias", self.f(bias))], ["logits"], name="logits")[0]


def build_encoder_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, ckpt: Any | None = None,
                       accuracy_level: int = 0, filename: str = "model.onnx") -> ExportInfo:
    """Write ``out_dir/filename`` (+ ``.data``): the encoder with qflow's quantized linears (see the module doc)."""
    from onnx import TensorProto, helper
    from transformers import AutoConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from qflow.recipe.safety import remote_code_allowed

    # an encoder's own configuration code only with the command line's --trust-remote-code, never a recipe
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=remote_code_allowed())
    src = FloatSource(model_dir, ckpt)
    p = _prefix(src, config.model_type)
    n_layers = int(config.num_hidden_layers)
    known = {f"{p}encoder.layer.{i}.{n}" for i in range(n_layers) for n in LAYER_LINEARS}
    extra = [n for n in (ckpt.layers if ckpt is not None else {}) if n not in known]
    if extra:
        raise OnnxExportError(f"checkpoint quantizes layers outside the encoder linears: {extra[:3]}",
                              fix="leave the embeddings, pooler and MLM head float")
    settings = ExportSettings(accuracy_level=int(accuracy_level))
    model_path, data_path = out_dir / filename, out_dir / (filename + DATA_SUFFIX)
    g = GraphWriter(data_path)
    try:
        w = _EncoderWriter(g, config, src, ckpt, settings)
        x = w.embeddings(p)
        bias = w.mask_bias()
        for i in range(n_layers):
            x = w.layer(x, f"{p}encoder.layer.{i}", bias)
        g.node("Identity", [x], ["last_hidden_state"], name="last_hidden_state")
        logits = w.mlm_head(x, p)
    finally:
        g.close()
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info(n, i64, ["batch_size", "sequence_length"])
              for n in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", f32, ["batch_size", "sequence_length", w.hidden])]
    if logits is not None:
        outputs.append(helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length",
                                                                     int(config.vocab_size)]))
    meta = {"qflow.mode": "quantized" if ckpt is not None else "float", "qflow.model_type": config.model_type,
            "qflow.settings": json.dumps(asdict(settings))}
    _save_model(g, (inputs, outputs), meta, model_path)
    dims = {"n_layers": n_layers, "hidden": w.hidden, "heads": w.heads, "vocab": int(config.vocab_size),
            "mlm_head": logits is not None}
    return ExportInfo(model_path=model_path, data_path=data_path, mode=meta["qflow.mode"], dims=dims,
                      linear_kinds=w.kinds, settings=asdict(settings))


def encoder_roundtrip(session, reference, batches) -> dict[str, float]:
    """The ONNX graph vs qflow's quantized torch model on padded sentence batches (``Batch``es of
    qflow/evaluation/embed.py).

    ``roundtrip_max_abs_diff``: largest |Δ| of the last hidden states at non-pad positions;
    ``roundtrip_embed_cos_min``: lowest cosine of the mean-pooled embeddings; with an MLM head
    ``roundtrip_kl`` (mean full-vocabulary KL(p_qflow || p_onnx) over non-pad positions, fp64) and
    ``roundtrip_top1_agree``.
    """
    import torch

    from qflow.models.encoders import mean_pool

    names = {o.name for o in session.get_outputs()}
    max_abs, cos_min, kl_sum, agree, n_pos = 0.0, 1.0, 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            feeds = {"input_ids": b.input_ids.numpy().astype(np.int64),
                     "attention_mask": b.attention_mask.numpy().astype(np.int64)}
            outs = dict(zip(names, session.run(list(names), feeds)))
            base = getattr(reference, "base_model", reference)
            h_ref = base(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state.double()
            ref = reference(input_ids=b.input_ids, attention_mask=b.attention_mask) if "logits" in outs else None
            h = torch.from_numpy(outs["last_hidden_state"]).double()
            keep = b.attention_mask.bool()
            max_abs = max(max_abs, float((h - h_ref)[keep].abs().max()))
            cos = torch.nn.functional.cosine_similarity(mean_pool(h, b.attention_mask).double(),
                                                        mean_pool(h_ref, b.attention_mask).double(), dim=-1)
            cos_min = min(cos_min, float(cos.min()))
            if ref is not None and getattr(ref, "logits", None) is not None:
                la = torch.log_softmax(ref.logits.double()[keep], -1)
                lb = torch.log_softmax(torch.from_numpy(outs["logits"]).double()[keep], -1)
                kl_sum += float((la.exp() * (la - lb)).sum(-1).clamp(min=0).sum())
                agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
                n_pos += int(keep.sum())
    metrics = {"roundtrip_max_abs_diff": max_abs, "roundtrip_embed_cos_min": cos_min}
    if n_pos:
        metrics |= {"roundtrip_kl": kl_sum / n_pos, "roundtrip_top1_agree": agree / n_pos}
    return metrics
