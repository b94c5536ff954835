"""Export the IR as a llama.cpp GGUF file (llama.cpp's llama architecture for Llama and Mixtral,
qwen2moe and qwen3moe for Qwen2-MoE and Qwen3-MoE).

    report = export_gguf(Checkpoint(ir_dir), "model.gguf")

Quantized linears are written **from qflow's integer codes** wherever a GGUF
block type can hold them (docs/METHODS.md §2.7; blocks of 32 along the input dim):

======  ===============  ============================================  ===========================
type    decode           exact when (per tensor, every 32-block)       typical IR
======  ===============  ============================================  ===========================
Q4_0    d*(q-8)          integer zero, q-z in [-8, 7], fp16 d = s      sym 2-4 bit (sym_f, sym_r)
Q4_1    d*q + m          q in [0, 15], fp16 d = s, fp16 m == -z*s      asym 2-4 bit (when m is exact)
Q5_0    d*(q-16)         integer zero, q-z in [-16, 15]                asym 4-bit, sym/asym 5-bit
Q5_1    d*q + m          q in [0, 31], m == -z*s                       asym 5-bit (m exact)
Q8_0    d*q8             integer zero, q-z in [-128, 127]              sym 8-bit, 6-bit, some 8-bit asym
======  ===============  ============================================  ===========================

Scales and zeros must be constant over each 32-block: groups of any multiple of
32, per channel and per tensor all qualify; groups of 16 or act-order ``g_idx``
whose groups are not 32-aligned do not. The smallest exact type wins. Q4_1's
``m = -z*s`` is exact in fp16 only for some (z, s) pairs, so asymmetric 4-bit IRs
usually land in Q5_0 (exact, 5.5 bpw); ``mapping: compact`` writes Q4_1 instead
(5.0 bpw) with ``m`` rounded to fp16 (codes kept; error well below the
quantization error, reported). HQQ's fractional zeros have no exact integer
form; they go to Q4_1/Q5_1 with ``m`` rounded ("approx"). Anything else (nf4,
fp4, non-uniform blocks) is re-quantized from the IR's dequantized weight with
``gguf.quants`` into ``requant_type`` (auto: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 by bits and
symmetry) and reported with its SQNR vs the IR.

Q/K rows of the llama architecture are permuted into llama.cpp's rotary layout (the inverse of
``qflow.models.gguf_import._unpermute_rows``); rows are independent, so the
permutation is exact. Norms are F32; embeddings / head ``float_type`` (F32
default: bit-exact; F16 halves them). Tokenizer metadata is copied from the base
model's GGUF when it came from one (``zoo:`` and ``gguf:`` sources) or built
from its Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qflow.errors import StageError
from qflow.quant.sqnr import sqnr_db

from . import mapping

BLOCK = 32
# type -> (bytes per block, code range of the stored integer, has min)
_TYPES = {
    "Q4_0": (18, (-8, 7), False),
    "Q4_1": (20, (0, 15), True),
    "Q5_0": (22, (-16, 15), False),
    "Q5_1": (24, (0, 31), True),
    "Q8_0": (34, (-128, 127), False),
}
_ORDER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")

_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",     # Qwen3-MoE's per-head RMSNorms
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


# Mixtral (llama.cpp writes it as llama), Qwen2-MoE and Qwen3-MoE: the router, and each projection of all
# experts stacked into one 3-D tensor [n_expert, rows, cols] (convert_hf_to_gguf.py's ffn_*_exps), from
# qflow's per-expert names; Qwen2-MoE's shared expert and its sigmoid gate (*_shexp, ffn_gate_inp_shexp)
_HF_TO_GGUF_MOE = {
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_proj.weight": "ffn_gate_exps.weight",
    "mlp.experts.up_proj.weight": "ffn_up_exps.weight",
    "mlp.experts.down_proj.weight": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_EXPERT = re.compile(r"^(?P<block>model\.layers\.\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
# base model_type -> llama.cpp architecture export.gguf writes it as
GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
GGUF_FAMILIES = tuple(GGUF_ARCH)   # base models export.gguf writes
# llama.cpp's graphs renormalise the top-k routing weights for qwen3moe and not for qwen2moe (no GGUF key
# says so: its models/qwen{2,3}moe.cpp fix it), so only the matching norm_topk_prob is written
_NORM_TOPK = {"qwen2_moe": False, "qwen3_moe": True}


class GGUFExportError(StageError):
    """The model cannot be written as a llama.cpp GGUF (the message says why)."""


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in _HF_TO_GGUF_BLOCK:
        return f"blk.{parts[2]}.{_HF_TO_GGUF_BLOCK[parts[3]]}"
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in _HF_TO_GGUF_MOE:
        return f"blk.{parts[2]}.{_HF_TO_GGUF_MOE[parts[3]]}"
    raise GGUFExportError(f"tensor {hf_name} has no place in a llama.cpp Llama GGUF")


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's Q/K layout: ``W_gguf = W_hf[perm]`` (convert_hf_to_gguf ``permute``)."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


# ---------------------------------------------------------------- block encoders (from codes)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` values (low 4 bits used) -> ``[..., 16]`` bytes: j low, j+16 high."""
    q = q.astype(np.uint8)
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _qh(q: np.ndarray) -> np.ndarray:
    """Q5 high bits: bit j of a little-endian uint32 = bit 4 of element j -> ``[..., 4]`` bytes."""
    return np.packbits(((q.astype(np.uint8) >> 4) & 1), axis=-1, bitorder="little")


def encode_blocks(qtype: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Block bytes ``[rows, n_blocks * size]`` of a GGUF type from integer codes.

    ``q``: ``[rows, n_blocks, 32]`` stored integers (Q4_0/Q5_0/Q8_0: signed ``q - z``;
    Q4_1/Q5_1: unsigned ``q``); ``d`` (and ``m``): ``[rows, n_blocks]`` fp16-representable.
    """
    rows, nb, _ = q.shape
    d16 = _fp16_bytes(d)
    if qtype == "Q4_0":
        parts = [d16, _nibbles(q + 8)]
    elif qtype == "Q4_1":
        parts = [d16, _fp16_bytes(m), _nibbles(q)]
    elif qtype == "Q5_0":
        u = q + 16
        parts = [d16, _qh(u), _nibbles(u)]
    elif qtype == "Q5_1":
        parts = [d16, _fp16_bytes(m), _qh(q), _nibbles(q)]
    elif qtype == "Q8_0":
        parts = [d16, q.astype(np.int8).view(np.uint8)]
    else:
        raise ValueError(qtype)
    blocks = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(blocks.reshape(rows, nb * _TYPES[qtype][0]))


def encode_q4_0_reference(x: np.ndarray) -> np.ndarray:
    """Q4_0 from float with llama.cpp's reference rule (docs/METHODS.md §2.7): ``d = m/-8``,
    ``q = min(15, trunc(x/d + 8.5))``. ``x``: ``[rows, in]``, in % 32 == 0."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(x.shape[0], -1, BLOCK)
    imax = np.abs(blocks).argmax(axis=-1)[..., None]
    mx = np.take_along_axis(blocks, imax, axis=-1)[..., 0]
    d = mx / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(15, np.trunc(blocks * inv[..., None] + np.float32(8.5))).astype(np.int64)
    return encode_blocks("Q4_0", q - 8, d.astype(np.float32))


# ---------------------------------------------------------------- choosing a type for one layer


@dataclass
class TensorPlan:
    name: str                       # GGUF name
    qtype: str                      # Q4_0 ... / F32 / F16
    status: str                     # exact | approx | requantized | float
    data: np.ndarray                # bytes [rows, ...] for block types, float array otherwise
    sqnr_db: float = math.inf
    note: str = ""
    source: tuple[str, int | None] = ("", None)   # (HF tensor name, heads of the Q/K permutation)


def _fp16_exact(x64: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        h = x64.astype(np.float16)
    return bool(np.all(np.isfinite(h)) and np.array_equal(h.astype(np.float64), x64))


def _blocks_uniform(layer: mapping.IRLayer) -> np.ndarray | None:
    """Group index of each 32-block ``[in/32]`` when scale/zero are constant per block, else None."""
    if layer.in_features % BLOCK:
        return None
    g = layer.column_groups().reshape(-1, BLOCK)
    if not np.all(g == g[:, :1]):
        return None
    return g[:, 0]


def auto_requant_type(spec) -> str:
    if spec.format != "int":
        return "Q4_0"
    if spec.bits <= 4:
        return "Q4_0" if spec.symmetric else "Q4_1"
    if spec.bits == 5:
        return "Q5_0" if spec.symmetric else "Q5_1"
    return "Q8_0"


def plan_quantized(layer: mapping.IRLayer, gguf_name: str, perm: np.ndarray | None, *, mode: str = "exact",
                   requant_type: str = "auto", only: str | None = None) -> TensorPlan:
    """Pick the GGUF type of one IR layer and encode it (see the module table); ``only``: consider that
    block type alone (re-quantizing into it when the codes do not fit; ``"-"``: re-quantize)."""
    ref = layer.dequantized()
    if perm is not None:
        ref = ref[perm]
    bg = _blocks_uniform(layer)
    why = ""
    if layer.spec.format != "int":
        why = f"{layer.spec.format} codes have no GGUF integer block type"
    elif bg is None:
        why = ("in_features % 32 != 0" if layer.in_features % BLOCK else
               "scales/zeros vary inside 32-wide blocks (group < 32 or act-order g_idx)")
    if not why:
        s, z = layer.per_channel_params()
        if perm is not None:
            s, z, codes = s[perm], z[perm], layer.codes[perm]
        else:
            codes = layer.codes
        rows, nb = codes.shape[0], layer.in_features // BLOCK
        sb = s[:, bg].astype(np.float64)                     # [rows, nb]
        zb = z[:, bg].astype(np.float64)
        q = codes.reshape(rows, nb, BLOCK).astype(np.int64)
        d_ok = _fp16_exact(sb)
        z_int = bool(np.array_equal(np.rint(zb), zb))
        m64 = -zb * sb
        candidates = []   # (type, exact, stored q, m)
        for t in _ORDER:
            if only is not None and t != only:
                continue
            lo, hi = _TYPES[t][1]
            if _TYPES[t][2]:   # d*q + m: codes as they are
                if q.min() < lo or q.max() > hi:
                    continue
                m_ok = _fp16_exact(m64)
                candidates.append((t, d_ok and m_ok, q, m64))
            else:
                if not z_int:
                    continue
                qs = q - zb.astype(np.int64)[..., None]
                if qs.min() < lo or qs.max() > hi:
                    continue
                candidates.append((t, d_ok, qs, None))
        chosen = None
        if mode == "compact":
            chosen = candidates[0] if candidates else None
        else:
            exact = [c for c in candidates if c[1]]
            chosen = exact[0] if exact else (candidates[0] if candidates else None)
        if chosen is not None:
            t, is_exact, qs, m = chosen
            d = sb.astype(np.float16).astype(np.float32)
            m16 = m.astype(np.float16).astype(np.float32) if m is not None else None
            data = encode_blocks(t, qs, d, m16)
            decoded = _dequant(data, t, layer.in_features)
            status = "exact" if is_exact else "approx"
            if status == "exact" and not np.array_equal(decoded, ref):
                raise RuntimeError(f"qflow bug: {gguf_name} maps exactly to {t} but does not decode to the IR weight")
            note = "" if is_exact else ("fp16 d rounded" if not d_ok else "fp16 m = -z*s rounded (codes kept)")
            return TensorPlan(gguf_name, t, status, data, sqnr_db(ref, decoded), note)
        why = f"codes of {layer.spec.bits}-bit {layer.spec.scheme} do not fit a Q4/Q5/Q8 block type"
    # re-quantize from the IR's dequantized weight
    t = auto_requant_type(layer.spec) if requant_type == "auto" else requant_type
    if only in _TYPES:
        t = only
    if t in ("F32", "F16") or layer.in_features % BLOCK:
        t = "F16" if t != "F32" else "F32"
        data = ref.astype(np.float16 if t == "F16" else np.float32)
        decoded = data.astype(np.float32)
    else:
        import gguf

        data = gguf.quants.quantize(ref, gguf.GGMLQuantizationType[t])
        decoded = _dequant(data, t, layer.in_features)
    return TensorPlan(gguf_name, t, "requantized", data, sqnr_db(ref, decoded), why)


def _dequant(data: np.ndarray, qtype: str, cols: int) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(data.shape[0], cols)


# ---------------------------------------------------------------- metadata


def _hf_config(base: Path) -> dict[str, Any]:
    return json.loads((base / "config.json").read_text())


def base_gguf_file(base: Path) -> Path | None:
    """The GGUF a converted base folder came from (``qflow-source.json``), if still on disk."""
    marker = Path(base) / "qflow-source.json"
    if not marker.is_file():
        return None
    try:
        path = Path(json.loads(marker.read_text()).get("gguf_file") or "")
    except ValueError:
        return None
    return path if path.is_file() else None


def gguf_problems(cfg: dict[str, Any]) -> list[str]:
    """Why export.gguf cannot write the base model of Hugging Face config ``cfg`` (empty when it can)."""
    family = cfg.get("model_type")
    if family not in GGUF_ARCH:
        return [f"export.gguf writes {', '.join(GGUF_FAMILIES)} models; the base model is {family!r}"]
    arch = GGUF_ARCH[family]
    problems = []
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and int(window) < int(cfg.get("max_position_embeddings", 2048)):
        problems.append(f"the model attends through a sliding window of {window} tokens, which llama.cpp's "
                        f"{arch} architecture does not apply")
    rope = cfg.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        problems.append("the model uses scaled RoPE, which this exporter does not write")
    if family in _NORM_TOPK and bool(cfg.get("norm_topk_prob", False)) != _NORM_TOPK[family]:
        problems.append(f"the {family} model has norm_topk_prob={bool(cfg.get('norm_topk_prob'))}, but llama.cpp's "
                        f"{arch} always uses norm_topk_prob={_NORM_TOPK[family]} (it would route differently); "
                        "export it with export.safetensors, layout: compressed-tensors")
    if family in _NORM_TOPK and (cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1):
        problems.append(f"the {family} model has dense MLP blocks (mlp_only_layers / decoder_sparse_step), which "
                        f"llama.cpp's {arch} architecture does not have; export it with export.safetensors, "
                        "layout: compressed-tensors")
    return problems


def base_config_problems(ckpt) -> list[str]:
    """``gguf_problems`` of the IR's base model (empty when its config is unreadable: the run says why)."""
    try:
        return gguf_problems(_hf_config(Path(ckpt.base_model)))
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def _add_metadata(w, cfg: dict[str, Any], name: str) -> None:
    problems = gguf_problems(cfg)
    if problems:
        raise GGUFExportError("; ".join(problems))
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    w.add_name(name)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(int(cfg["vocab_size"]))
    family = cfg.get("model_type")
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        w.add_expert_count(_n_experts(cfg))
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    if family in ("qwen2_moe", "qwen3_moe"):   # convert_hf_to_gguf.py's Qwen2MoeModel (Qwen3MoeModel inherits it)
        w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
        if family == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))


def _n_experts(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_local_experts") or cfg["num_experts"])


def _copy_tokenizer_fields(w, gguf_path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    n = 0
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = f.types
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), gguf.GGUFValueType.ARRAY, sub_type=types[-1])
        else:
            w.add_key_value(key, f.contents(), types[0])
        n += 1
    return n


def _hf_tokenizer_fields(w, base: Path, vocab_size: int, pre: str | None) -> str:
    """Tokenizer metadata built from a Hugging Face tokenizer folder (BPE or SentencePiece)."""
    import gguf
    from gguf import vocab as gvocab

    vocab = None
    kind = ""
    for cls, model in ((gvocab.BpeVocab, "gpt2"), (gvocab.LlamaHfVocab, "llama"), (gvocab.SentencePieceVocab, "llama")):
        try:
            vocab = cls(base)
            kind = model
            break
        except (FileNotFoundError, ValueError, TypeError, KeyError, ImportError):
            continue
    if vocab is None:
        raise GGUFExportError(f"{base} holds no tokenizer that the gguf package can convert (BPE tokenizer.json, "
                              "Llama tokenizer.json or tokenizer.model)")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    if kind == "llama":
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(base, load_merges=kind == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    return kind


# ---------------------------------------------------------------- the exporter


def export_gguf(ckpt, path: str | Path, *, mode: str = "exact", requant_type: str = "auto",
                float_type: str = "F32", tokenizer_pre: str | None = None, name: str | None = None,
                qflow_meta: dict[str, Any] | None = None,
                progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write ``ckpt`` as a GGUF at ``path``; returns the per-tensor report.

    ``mode``: ``exact`` (smallest exact type, else approx, else re-quantized) or
    ``compact`` (smallest type that keeps the codes, rounding fp16 ``m`` if needed).
    """
    import gguf

    from qflow import __version__

    base = Path(ckpt.base_model)
    cfg = _hf_config(base)
    path = Path(path)
    arch = GGUF_ARCH.get(cfg.get("model_type"), "llama")
    w = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    _add_metadata(w, cfg, name or f"qflow-{ckpt.method}")
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    src = base_gguf_file(base)
    if src is not None:
        _copy_tokenizer_fields(w, src)
        tokenizer_from = f"copied from {src.name}"
    else:
        kind = _hf_tokenizer_fields(w, base, int(cfg["vocab_size"]), tokenizer_pre)
        tokenizer_from = f"built from the Hugging Face tokenizer ({kind}, pre={tokenizer_pre or 'default'})"
    meta = dict(qflow_meta or {})
    w.add_string("qflow.version", __version__)
    w.add_string("qflow.method", ckpt.method)
    w.add_string("qflow.recipe_key", str(meta.get("recipe_key") or ""))
    w.add_string("qflow.layers", json.dumps({n: r.spec.model_dump(mode="json") for n, r in ckpt.layers.items()},
                                            sort_keys=True, separators=(",", ":")))

    if arch != "llama":   # llama.cpp rotates NeoX-style halves for qwen2moe/qwen3moe: rows as transformers has them
        heads = kv_heads = None
    plans = _write_tensors(w, ckpt, heads, kv_heads, mode=mode, requant_type=requant_type, float_type=float_type,
                           progress=progress)
    quant_types = [p.qtype for p in plans if p.status != "float"]
    file_type = _file_type(quant_types, float_type)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    counts = {s: sum(p.status == s for p in plans) for s in ("exact", "approx", "requantized", "float")}
    lossy = [p.sqnr_db for p in plans if p.status in ("approx", "requantized")]
    return {
        "path": str(path), "bytes": path.stat().st_size, "tokenizer": tokenizer_from, "file_type": file_type,
        "tensors": {p.name: {"type": p.qtype, "status": p.status, "sqnr_db": p.sqnr_db, "note": p.note,
                             "source": p.source[0], "permute_heads": p.source[1]} for p in plans},
        "types": {t: quant_types.count(t) for t in sorted(set(quant_types))},
        "n_exact_tensors": counts["exact"], "n_approx_tensors": counts["approx"],
        "n_requantized_tensors": counts["requantized"], "n_float_tensors": counts["float"],
        "min_sqnr_db": min(lossy) if lossy else math.inf,
    }


def _write_tensors(w, ckpt, heads: int | None, kv_heads: int | None, *, mode: str, requant_type: str, float_type: str,
                   progress: Callable[[], None] | None) -> list[TensorPlan]:
    """Add every base-model tensor to ``w`` in the base's order (quantized layers planned from the IR);
    a mixture of experts' per-expert projections go in as one 3-D tensor per block and projection.
    ``heads`` / ``kv_heads``: permute Q / K rows into llama.cpp's llama layout (None: keep the rows)."""
    import gguf
    import torch

    from .moe_names import base_family, is_moe, logical_base_tensors

    moe = is_moe(base_family(ckpt))
    if moe:
        n_experts = _n_experts(_hf_config(Path(ckpt.base_model)))
        tensors = logical_base_tensors(ckpt)
    else:
        tensors = ((key, module, lambda key=key, h=h: mapping.float_tensor(ckpt, key, h))
                   for key, module, h in mapping.base_tensors(ckpt))
    plans: list[TensorPlan] = []
    pending: dict[tuple[str, str], dict[int, tuple[str, Any]]] = {}

    def emit(plan: TensorPlan, source, n_perm: int | None) -> None:
        if plan.qtype in _TYPES:
            w.add_tensor(plan.name, plan.data, raw_dtype=gguf.GGMLQuantizationType[plan.qtype])
        else:
            w.add_tensor(plan.name, plan.data)
        plan.data = None  # written (spooled); keep only the report
        plan.source = (source, n_perm)
        plans.append(plan)

    for key, module, read in tensors:
        expert = _EXPERT.match(key) if moe else None
        if expert:   # collect the block's experts of this projection, then write them stacked
            group = pending.setdefault((expert["block"], expert["proj"]), {})
            group[int(expert["expert"])] = (key, mapping.load_ir_layer(ckpt, module) if module is not None
                                            else read().to(torch.float32).numpy())
            if len(group) == n_experts:
                gname = gguf_tensor_name(f"{expert['block']}.mlp.experts.{expert['proj']}.weight")
                entries = [group[e] for e in range(n_experts)]
                emit(plan_experts([x for _, x in entries], gname, mode=mode, requant_type=requant_type,
                                  float_type=float_type), [k for k, _ in entries], None)
                del pending[(expert["block"], expert["proj"])]
                if progress and module is not None:
                    for _ in range(n_experts):
                        progress()
            continue
        gname = gguf_tensor_name(key)
        n_perm = heads if ".attn_q." in gname else kv_heads if ".attn_k." in gname else None
        if module is not None:
            layer = mapping.load_ir_layer(ckpt, module)
            perm = permute_rows(layer.out_features, n_perm) if n_perm else None
            plan = plan_quantized(layer, gname, perm, mode=mode, requant_type=requant_type)
        else:
            arr = read().to(torch.float32).numpy()
            perm = permute_rows(arr.shape[0], n_perm) if n_perm else None
            if perm is not None:
                arr = arr[perm]
            ftype = float_type if arr.ndim == 2 else "F32"
            data = arr.astype(np.float16 if ftype == "F16" else np.float32)
            plan = TensorPlan(gname, ftype, "float", data, sqnr_db(arr, data.astype(np.float32)), "")
        emit(plan, key, n_perm)
        if progress and module is not None:
            progress()
    if pending:
        raise GGUFExportError(f"the base model lacks experts of {sorted(pending)[:3]}: each block needs all "
                              f"{n_experts} experts of every projection")
    return plans


_STATUS_RANK = {"exact": 0, "float": 0, "approx": 1, "requantized": 2}


def plan_experts(experts: list, gguf_name: str, *, mode: str = "exact", requant_type: str = "auto",
                 float_type: str = "F32") -> TensorPlan:
    """One GGUF tensor ``[n_expert, rows, cols]`` from every expert's IR layer (or float array).

    A GGUF tensor has one type, so all experts take the first type in ``_ORDER`` that holds every
    one exactly (else with the fewest re-quantized ones, in ``plan_quantized``'s terms).
    """
    layers = [x for x in experts if isinstance(x, mapping.IRLayer)]
    if not layers:
        data = np.stack(experts).astype(np.float16 if float_type == "F16" else np.float32)
        ref = np.stack(experts)
        return TensorPlan(gguf_name, float_type, "float", data, sqnr_db(ref, data.astype(np.float32)), "")
    if len(layers) != len(experts):
        raise GGUFExportError(f"{gguf_name}: some experts are quantized and some float, but llama.cpp stores all "
                              "experts of a projection as one tensor of one type; quantize every expert or none "
                              "(the stage's ignore / layers options)")
    best = None
    for only in (None,) + _ORDER:
        plans = [plan_quantized(layer, gguf_name, None, mode=mode, requant_type=requant_type, only=only)
                 for layer in layers]
        if len({p.qtype for p in plans}) != 1:
            continue
        worst = max(_STATUS_RANK[p.status] for p in plans)
        if best is None or worst < best[0]:
            best = (worst, plans)
        if worst == 0:
            break
    if best is None:   # every expert re-quantized from its dequantized weight into one type
        qtype = auto_requant_type(layers[0].spec) if requant_type == "auto" else requant_type
        best = (2, [plan_quantized(layer, gguf_name, None, mode=mode, requant_type=qtype, only="-")
                    for layer in layers])
    plans = best[1]
    status = max((p.status for p in plans), key=lambda st: _STATUS_RANK[st])
    notes = sorted({p.note for p in plans if p.note})
    return TensorPlan(gguf_name, plans[0].qtype, status, np.stack([p.data for p in plans]),
                      min(p.sqnr_db for p in plans), "; ".join(notes))


def _file_type(types: list[str], float_type: str) -> int:
    import gguf

    if not types:
        return int(gguf.LlamaFileType.ALL_F32 if float_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    common = max(set(types), key=types.count)
    return int({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16,
                "F32": gguf.LlamaFileType.ALL_F32}.get(common, gguf.LlamaFileType.MOSTLY_F16))


# ---------------------------------------------------------------- read back


def reference_tensor(ckpt, hf_name, permute_heads: int | None, index: dict | None = None) -> np.ndarray:
    """What qflow's quantized model holds for ``hf_name`` (fp32, in GGUF row order); a list of names
    (a mixture of experts' stacked projection) gives them stacked. ``index``: the base's tensor index."""
    if index is None:
        from qflow.quant.weights import tensor_index

        index = tensor_index(Path(ckpt.base_model))
    if isinstance(hf_name, (list, tuple)):
        return np.stack([reference_tensor(ckpt, n, permute_heads, index) for n in hf_name])
    module = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else None
    if module in ckpt.layers:
        arr = mapping.load_ir_layer(ckpt, module).dequantized()
    elif hf_name in ckpt.floats:
        arr = ckpt.float_tensor(hf_name).float().numpy()
    else:
        arr = index[hf_name].read().float().numpy()
    if permute_heads:
        arr = arr[permute_rows(arr.shape[0], permute_heads)]
    return arr


def read_back(path: str | Path, ckpt, report: dict[str, Any]) -> dict[str, float]:
    """Dequantize every tensor of the written file (``gguf.quants.dequantize``) and compare with what
    qflow's model holds; raises when a tensor reported ``exact`` (or F32) is not bit-identical."""
    import gguf

    from qflow.quant.weights import tensor_index

    reader = gguf.GGUFReader(str(path))
    index = tensor_index(Path(ckpt.base_model))
    max_abs = 0.0
    exact_checked = 0
    for t in reader.tensors:
        info = report["tensors"].get(t.name)
        if info is None:
            raise GGUFExportError(f"{path}: unexpected tensor {t.name}")
        ref = reference_tensor(ckpt, info["source"], info["permute_heads"], index)
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(ref.shape)
        diff = float(np.max(np.abs(arr - ref))) if arr.size else 0.0
        max_abs = max(max_abs, diff)
        if info["type"] != t.tensor_type.name:
            raise GGUFExportError(f"{path}: {t.name} is {t.tensor_type.name}, written as {info['type']}")
        if info["status"] == "exact" or (info["status"] == "float" and info["type"] == "F32"):
            if not np.array_equal(arr, ref):
                raise GGUFExportError(f"{path}: {t.name} ({info['type']}) was mapped exactly but reads back "
                                      f"different (max |diff| {diff:g})")
            exact_checked += 1
    return {"roundtrip_max_abs_diff": max_abs, "n_exact_checked": exact_checked, "n_tensors": len(reader.tensors)}


def llama_cpp_logits(path: str | Path, ids) -> "np.ndarray | None":
    """Logits ``[n, L, vocab]`` from llama.cpp (``llama_cpp`` package) or None when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    n_ctx = int(ids.shape[1])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    out = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    return np.stack(out)

