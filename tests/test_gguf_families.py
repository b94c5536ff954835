"""GGUF import per family: a tiny random model written the way convert_hf_to_gguf.py writes it
(the gguf package's tensor-name map, Llama's and Granite's Q/K permutation, Gemma's stored ``1 + w``
norms, Granite's multipliers as ``*_scale``, tied embeddings for Gemma and Command-R, Cohere's LayerNorm eps,
logit scale and optional per-head q/k norms, Qwen2-MoE / Qwen3-MoE's stacked experts and shared expert),
imported back by qflow, gives the original's logits to float tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qflow.errors import SourceError
from qflow.models.loading import load_model
from qflow.models.sources import resolve_model

from .test_families import tiny_family
from .test_models import _llama_cpp_permute

# transformers family -> llama.cpp architecture (Mistral is written as llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2", "granite": "granite",
             "cohere": "command-r"}
# llama.cpp's graph reads the embedding as the head for these (no output tensor, or no choice)
TIED = ("gemma", "gemma2", "gemma3_text", "cohere")
# convert_hf_to_gguf.py permutes Q/K rows for Llama and for Granite (whose converter is Llama's)
PERMUTED = ("llama", "granite")


def write_family_gguf(path: Path, model, arch: str) -> None:
    """The model as convert_hf_to_gguf.py would write it (F32 tensors; byte-level BPE tokenizer of 258 tokens)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(config.rope_parameters.get("rope_theta", 10000.0))
    if arch != "command-r":
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if arch in ("qwen2moe", "qwen3moe"):   # convert_hf_to_gguf.py's Qwen2MoeModel (Qwen3MoeModel inherits it)
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if arch == "command-r":   # Cohere: LayerNorm eps, logit scale, no RoPE scaling
        w.add_layer_norm_eps(config.layer_norm_eps)
        w.add_logit_scale(config.logit_scale)
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    if arch == "gemma2":
        w.add_sliding_window(config.sliding_window)
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch == "gemma3":   # the global layers' rope base; the sliding layers' (10000) is llama.cpp's constant
        w.add_sliding_window(config.sliding_window)
        w.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    if arch == "granite":   # Granite's multipliers, written as *_scale
        w.add_attention_scale(config.attention_multiplier)
        w.add_embedding_scale(config.embedding_multiplier)
        w.add_residual_scale(config.residual_multiplier)
        w.add_logit_scale(config.logits_scaling)
    if arch.startswith("gemma"):   # Gemma GGUFs carry a SentencePiece vocabulary: 4 specials, 256 bytes, 2 pieces
        w.add_tokenizer_model("llama")
        w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
                         + ["\u2581t", "\u2581"])
        w.add_token_scores([0.0] * 260 + [-1.0, -2.0])
        w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1, 1])
        w.add_pad_token_id(0)
        w.add_eos_token_id(1)
        w.add_bos_token_id(2)
        w.add_unk_token_id(3)
        w.add_add_bos_token(False)
    else:
        byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(byte_tokens + ["\u0120t", "<|endoftext|>"])
        w.add_token_types([1] * 257 + [3])
        w.add_token_merges(["\u0120 t"])
        w.add_bos_token_id(257)
        w.add_eos_token_id(257)
        w.add_add_bos_token(False)

    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    tensors = []
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):   # transformers' fused experts [n_expert, 2 * n_ff, hidden]:
            n_ff = tensor.shape[1] // 2                 # the converter splits gate (first half) and up
            stem = name.removesuffix(".gate_up_proj")
            tensors += [(f"{stem}.gate_proj.weight", tensor[:, :n_ff]), (f"{stem}.up_proj.weight", tensor[:, n_ff:])]
        elif name.endswith("mlp.experts.down_proj"):
            tensors.append((f"{name}.weight", tensor))
        else:
            tensors.append((name, tensor))
    for name, tensor in tensors:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, _, suffix = name.rpartition(".")
        gguf_name = f"{tmap.get_name(base)}.{suffix}"
        array = tensor.contiguous().numpy().astype(np.float32)
        if arch in PERMUTED and ".attn_q." in gguf_name:
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif arch in PERMUTED and ".attn_k." in gguf_name:
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        elif arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Cohere (command-r) with its per-head q/k LayerNorms (Command R+; llama.cpp loads them for >= 64 layers) and
# without (Command R)
CASES = [(f, None) for f in sorted(GGUF_ARCH)] + [("cohere", {"use_qk_norm": False})]


@pytest.mark.parametrize("family,extra", CASES, ids=[f + ("-no-qk-norm" if e else "") for f, e in CASES])
def test_gguf_import_gives_the_original_logits(tmp_path, family, extra):
    # Gemma 3: llama.cpp scales queries by 1/sqrt(head size) (query_pre_attn_scalar = head_dim, as the
    # released 1B-12B configs have it)
    if family == "gemma3_text":
        extra = {"query_pre_attn_scalar": 16}
    original = tiny_family(family, vocab=262 if family.startswith("gemma") else 258, config=extra)
    if family in TIED:   # llama.cpp has no untied head for Gemma and Command-R
        original.config.tie_word_embeddings = True
        original.lm_head.weight = original.model.embed_tokens.weight
    path = tmp_path / f"{family}.gguf"
    write_family_gguf(path, original, GGUF_ARCH[family])
    resolved = resolve_model(f"gguf:{path}", tmp_path / "cache")
    ours, tokenizer = load_model(resolved.path)
    assert ours.config.model_type == ("llama" if family == "mistral" else family)
    if family == "gemma3_text":   # layer types and both rope bases as llama.cpp applies them
        assert ours.config.layer_types == original.config.layer_types
        assert ours.config.rope_parameters == original.config.rope_parameters
    if family == "cohere":   # LayerNorm eps, logit scale and q/k norms from the file
        assert ours.config.use_qk_norm == original.config.use_qk_norm
        assert ours.config.logit_scale == original.config.logit_scale == 0.5
    ids = torch.tensor([[257, 5, 100, 200, 33, 84, 7, 7, 9, 64, 3, 250]])
    with torch.no_grad():
        ref = original(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), float((got - ref).abs().max())
    encoded = tokenizer("a t", add_special_tokens=False).input_ids
    if family.startswith("gemma"):   # SentencePiece with byte fallback: "a" is <0x61>, the text survives
        assert encoded[0] == 4 + ord("a") and tokenizer.decode(encoded) == "a t", encoded
    else:
        assert encoded == [ord("a"), 256]


def test_command_r_gguf_with_an_untied_head_is_refused(tmp_path, monkeypatch):
    """llama.cpp's command-r has no output tensor (the converter cannot write one): such a file is refused."""
    original = tiny_family("cohere", vocab=258)   # untied: lm_head.weight, which the test writer maps to output
    path = tmp_path / "cohere.gguf"
    original.config.tie_word_embeddings = False
    import gguf

    real = gguf.get_tensor_name_map

    def with_output(arch, n):   # convert_hf_to_gguf.py's map has no head for command-r; add one to forge the file
        tmap = real(arch, n)
        tmap.mapping["lm_head"] = (gguf.MODEL_TENSOR.OUTPUT, "output")
        return tmap

    monkeypatch.setattr(gguf, "get_tensor_name_map", with_output)
    write_family_gguf(path, original, "command-r")
    monkeypatch.undo()
    with pytest.raises(SourceError, match="separate output .*command-r always reads the token embedding.*Fix:"):
        resolve_model(f"gguf:{path}", tmp_path / "cache")


def test_gguf_of_an_unknown_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "cohere2.gguf"   # Command R7B's interleaved sliding-window blocks: no importer (nor adapter)
    w = gguf.GGUFWriter(str(path), "cohere2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((258, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SourceError, match="'cohere2' model and qflow converts only Llama-lineage GGUFs .*olmo2.*Fix:"):
        resolve_model(f"gguf:{path}", tmp_path / "cache")


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_gguf_import_of_a_mixture_of_experts_gives_the_original_logits(tmp_path, family):
    """Qwen2-MoE / Qwen3-MoE as convert_hf_to_gguf.py writes them (stacked ffn_{gate,up,down}_exps split from
    transformers' fused gate_up, router ffn_gate_inp, Qwen2-MoE's shared expert *_shexp and its gate
    ffn_gate_inp_shexp, Qwen3's q/k norms, the expert widths in metadata) import with the original's logits."""
    import gguf

    from .test_moe import tiny_moe

    original = tiny_moe(family, seed=3, vocab=258, fused=True)
    arch = family.replace("_", "")
    path = tmp_path / f"{family}.gguf"
    write_family_gguf(path, original, arch)
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight",
            "blk.1.ffn_gate_inp.weight"} <= names
    assert ({"blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_down_shexp.weight"} <= names) == (family == "qwen2_moe")
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3_moe")
    resolved = resolve_model(f"gguf:{path}", tmp_path / "cache")
    ours, _ = load_model(resolved.path)
    assert ours.config.model_type == family
    assert ours.config.norm_topk_prob == (family == "qwen3_moe")   # llama.cpp's fixed choice per architecture
    ids = torch.tensor([[257, 5, 100, 200, 33, 84, 7, 7, 9, 64, 3, 250]])
    with torch.no_grad():
        ref = original(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), float((got - ref).abs().max())
