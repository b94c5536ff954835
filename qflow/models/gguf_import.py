"""GGUF -> float32 Hugging Face folder (config, safetensors, tokenizer), converted once.

Architectures: llama (also Mistral and Mixtral, which llama.cpp writes as llama), qwen2,
qwen3, qwen2moe, qwen3moe, phi3, gemma, gemma2, gemma3 (text), olmo2, granite and command-r
(Cohere; ``IMPORTABLE``); anything else is refused naming the architecture. A mixture of
experts' stacked ``ffn_*_exps`` tensors ``[n_expert, rows, cols]`` become one tensor per expert
under the family's checkpoint names (which transformers re-fuses on load).

    converted_folder(Path("model.gguf"), Path("runs/cache/models/gguf-ab12"), "gguf:model.gguf", fingerprint)
    convert_gguf(Path("model.gguf"), Path("out"))   # the conversion alone, into an existing folder

Weights are dequantized with the gguf package and Q/K rows un-permuted, so the
folder holds the same numbers as transformers' own GGUF loader. The converted
folder is cached: ``converted_folder`` converts into a temp folder and renames
it into place under a lock, with a marker file written last. Heavy imports
(gguf, numpy, transformers) happen inside functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

from qflow.errors import SourceError

# Bump when the GGUF -> HF folder conversion changes its output: it is part of the
# fingerprint, so converted folders and every downstream cache key move with it.
GGUF_CONVERTER_VERSION = 1

# Largest safetensors shard the converter writes (bigger models get an index file).
MAX_SHARD_BYTES = 2 * 2**30

MARKER_FILE = "qflow-source.json"  # written last inside a converted folder


# ---------------------------------------------------------------- the cached conversion


def converted_folder(gguf_path: Path, target: Path, source: str, fingerprint: str) -> Path:
    """Convert into a temp folder and rename it into place, under a lock.

    A killed conversion leaves only a ``.tmp-*`` folder, which the next holder
    of the lock deletes; ``target`` either is complete or does not exist.
    """
    from filelock import FileLock

    if (target / MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / MARKER_FILE).is_file():
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # no marker: not ours to trust
            shutil.rmtree(target)
        scratch = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        started = time.perf_counter()
        try:
            convert_gguf(gguf_path, scratch, source=source)
            seconds = time.perf_counter() - started
            record = {
                "source": source,
                "fingerprint": fingerprint,
                "gguf_file": str(gguf_path),
                "converter_version": GGUF_CONVERTER_VERSION,
                "conversion_seconds": round(seconds, 3),
                "versions": _library_versions(),
            }
            (scratch / MARKER_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
            os.replace(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("gguf", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------- tensor names and config

# llama.cpp tensor names -> transformers Llama names ("{i}" is the block index).
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata of a GGUFReader (token lists and other arrays left out)."""
    from gguf import GGUFValueType

    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if field.types and field.types[0] != GGUFValueType.ARRAY
    }


def gguf_llama_config(reader, source: str):
    """A LlamaConfig from GGUF metadata: no quantization_config, tied embeddings when output.weight is absent."""
    from transformers import LlamaConfig

    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        _refuse_arch(arch, source)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or "llama.rope.scaling.type" in meta:
        raise SourceError(
            "the GGUF uses scaled RoPE (rope_freqs / rope.scaling), whose Hugging Face parameters it does not record",
            where=source,
            fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
        )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    heads = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise SourceError(
            "the GGUF rotates only part of each attention head (rope.dimension_count != head size)",
            where=source,
            fix="use the model's Hugging Face checkpoint instead",
        )
    token_ids = {
        f"{name}_token_id": meta[f"tokenizer.ggml.{key}_token_id"]
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if f"tokenizer.ggml.{key}_token_id" in meta
    }
    kwargs = dict(
        vocab_size=meta.get("llama.vocab_size", len(tokens.data) if tokens else 32000),
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=meta.get("llama.context_length", 2048),
        rms_norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": meta.get("llama.rope.freq_base", 10000.0)},
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias=False,
        hidden_act="silu",
        tie_word_embeddings="output.weight" not in names,
        dtype="float32",
        **token_ids,
    )
    if "llama.expert_count" in meta:   # Mixtral: llama.cpp writes it as llama with ffn_*_exps tensors
        from transformers import MixtralConfig

        for key in ("attention_bias", "mlp_bias"):
            kwargs.pop(key)
        return MixtralConfig(**kwargs, num_local_experts=meta["llama.expert_count"],
                             num_experts_per_tok=meta["llama.expert_used_count"], sliding_window=None,
                             architectures=["MixtralForCausalLM"])
    return LlamaConfig(**kwargs, architectures=["LlamaForCausalLM"])


# llama.cpp architecture -> transformers config class (docs/ARCHITECTURE.md "Model families")
IMPORTABLE = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "phi3": "Phi3Config",
              "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "olmo2": "Olmo2Config",
              "granite": "GraniteConfig", "qwen2moe": "Qwen2MoeConfig", "qwen3moe": "Qwen3MoeConfig",
              "command-r": "CohereConfig"}
# mixtures of experts (llama.cpp's llama with expert_count is Mixtral): llama.cpp's graphs renormalise the
# top-k routing weights for qwen3moe and not for qwen2moe (its models/qwen{2,3}moe.cpp); no GGUF key says so
_MOE_ARCHS = {"qwen2moe": False, "qwen3moe": True}
# per-expert checkpoint names of a stacked ffn_*_exps tensor, by transformers model_type
_EXPERT_NAMES = {
    "mixtral": {"gate": "block_sparse_moe.experts.{e}.w1.weight", "up": "block_sparse_moe.experts.{e}.w3.weight",
                "down": "block_sparse_moe.experts.{e}.w2.weight"},
    "qwen2_moe": {p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")},
    "qwen3_moe": {p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# convert_hf_to_gguf.py permutes Q/K rows for these (llama.cpp rotates adjacent pairs there; Granite's
# converter is Llama's); NeoX-rope architectures (qwen2/3, phi3, gemma*, olmo2) keep transformers' row order
_PERMUTED_QK = {"llama", "granite"}
# Gemma's RMSNorm scales by 1 + w; the converter stores 1 + w in every *norm.weight (Gemma 3: the q/k norms too)
_NORM_STORED_PLUS_ONE = {"gemma", "gemma2", "gemma3"}
# llama.cpp constants for Gemma 3 that the GGUF does not record (its llama-model.cpp): every 6th layer attends
# globally, the sliding layers rotate with base 10000
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0


def _refuse_arch(arch, source: str):
    raise SourceError(
        f"the GGUF holds a '{arch}' model and qflow converts only Llama-lineage GGUFs "
        f"({', '.join(sorted(IMPORTABLE))})",
        where=source,
        fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
    )


def gguf_config(reader, source: str):
    """The transformers config of a GGUF of any ``IMPORTABLE`` architecture (metadata keys ``{arch}.*``)."""
    import transformers

    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch == "llama":
        return gguf_llama_config(reader, source)
    if arch not in IMPORTABLE:
        _refuse_arch(arch, source)
    names = {t.name for t in reader.tensors}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in names or scaling not in (None, "none") or any("rope_factors" in n for n in names):
        raise SourceError(
            "the GGUF uses scaled RoPE (rope_freqs / rope.scaling / rope factors), whose Hugging Face parameters "
            "it does not record",
            where=source,
            fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
        )
    heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise SourceError(
            "the GGUF rotates only part of each attention head (rope.dimension_count != head size)",
            where=source,
            fix="use the model's Hugging Face checkpoint instead",
        )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    kwargs = dict(
        vocab_size=meta.get(f"{arch}.vocab_size", len(tokens.data) if tokens else 32000),
        hidden_size=hidden,
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        max_position_embeddings=meta.get(f"{arch}.context_length", 2048),
        rms_norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0)},
        tie_word_embeddings="output.weight" not in names,
        dtype="float32",
    )
    kwargs.update({
        f"{name}_token_id": meta[f"tokenizer.ggml.{key}_token_id"]
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if f"tokenizer.ggml.{key}_token_id" in meta
    })
    kwargs.setdefault("pad_token_id", None)   # not the config class's default (Phi-3's 32000 may exceed the vocab)
    if arch in ("qwen3", "qwen3moe", "gemma", "gemma2", "gemma3"):
        kwargs["head_dim"] = head_dim
    if arch in _MOE_ARCHS:
        n_ff = kwargs["intermediate_size"]
        used = meta[f"{arch}.expert_used_count"]
        # llama.cpp's defaults when the expert widths are not recorded: n_ff / n_expert_used and n_ff
        kwargs.update(num_experts=meta[f"{arch}.expert_count"], num_experts_per_tok=used,
                      moe_intermediate_size=meta.get(f"{arch}.expert_feed_forward_length", n_ff // used),
                      norm_topk_prob=_MOE_ARCHS[arch], decoder_sparse_step=1, mlp_only_layers=[],
                      use_sliding_window=False, sliding_window=None)
        if arch == "qwen2moe":
            kwargs.update(shared_expert_intermediate_size=meta.get(f"{arch}.expert_shared_feed_forward_length", n_ff),
                          qkv_bias="blk.0.attn_q.bias" in names)
        else:
            kwargs["attention_bias"] = "blk.0.attn_q.bias" in names
    if arch == "command-r" and "output.weight" in names:
        raise SourceError(
            "the command-r GGUF holds a separate output (head) tensor, but llama.cpp's command-r always reads the "
            "token embedding as the head (its converter writes none), so the file's own numbers are ambiguous",
            where=source,
            fix="convert the model's Hugging Face checkpoint with llama.cpp's convert_hf_to_gguf.py, or use the "
                "checkpoint itself (hf:ORG/NAME or a local folder)",
        )
    if arch == "command-r":
        # Cohere: LayerNorm without bias (eps under layer_norm_epsilon), logits times logit_scale, the head is
        # always the embedding (llama.cpp's command-r has no output tensor), q/k LayerNorms per head when stored
        kwargs.pop("rms_norm_eps")
        kwargs.update(layer_norm_eps=meta.get(f"{arch}.attention.layer_norm_epsilon", 1e-5),
                      logit_scale=meta.get(f"{arch}.logit_scale", 1.0), tie_word_embeddings=True,
                      use_qk_norm="blk.0.attn_q_norm.weight" in names, attention_bias="blk.0.attn_q.bias" in names)
    if arch in ("gemma", "gemma3"):
        kwargs["hidden_activation"] = "gelu_pytorch_tanh"
        kwargs["tie_word_embeddings"] = True   # llama.cpp's Gemma reads the embedding as the head
    if arch == "gemma3":
        n_layers = kwargs["num_hidden_layers"]
        # llama.cpp scales queries by 1/sqrt(head size), by 1/sqrt(hidden/heads) for the 62-layer (27B) model
        scalar = hidden // heads if n_layers == 62 else head_dim
        kwargs.update(query_pre_attn_scalar=scalar, sliding_window=meta.get("gemma3.attention.sliding_window", 4096),
                      final_logit_softcapping=meta.get("gemma3.final_logit_softcapping"),
                      attn_logit_softcapping=None,
                      layer_types=["full_attention" if (i + 1) % _GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
                                   for i in range(n_layers)],
                      rope_parameters={"full_attention": kwargs["rope_parameters"],
                                       "sliding_attention": {"rope_type": "default",
                                                             "rope_theta": _GEMMA3_LOCAL_ROPE_BASE}})
    if arch == "granite":   # the converter writes Granite's multipliers as *_scale
        kwargs.update(attention_multiplier=meta.get("granite.attention.scale", 1.0 / head_dim ** 0.5),
                      embedding_multiplier=meta.get("granite.embedding_scale", 1.0),
                      residual_multiplier=meta.get("granite.residual_scale", 1.0),
                      logits_scaling=meta.get("granite.logit_scale", 1.0))
    if arch == "gemma2":
        # llama.cpp scales queries by 1/sqrt(head size) (the 27B model's hidden/heads is not recorded)
        kwargs.update(query_pre_attn_scalar=head_dim, hidden_activation="gelu_pytorch_tanh",
                      sliding_window=meta.get("gemma2.attention.sliding_window", 4096),
                      attn_logit_softcapping=meta.get("gemma2.attn_logit_softcapping"),
                      final_logit_softcapping=meta.get("gemma2.final_logit_softcapping"))
    config = getattr(transformers, IMPORTABLE[arch])(**kwargs)
    config.architectures = [type(config).__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
    return config


def _gguf_to_hf_names(config, arch: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """``{gguf tensor name: transformers parameter name}`` from the gguf package's own name map
    (the one convert_hf_to_gguf.py writes with), over the parameters of a meta-device model, and
    ``{transformers name: shape}``. A mixture of experts' stacked ``ffn_*_exps`` map to a per-expert
    name with ``{e}`` in it."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)   # a config qflow built
    out, shapes = {}, {}
    for name, tensor in skeleton.state_dict().items():
        shapes[name] = tuple(tensor.shape)
        base, _, suffix = name.rpartition(".")
        target = tmap.get_name(base)
        if target is not None:
            out[f"{target}.{suffix}"] = name
    for i in range(config.num_hidden_layers if config.model_type in _EXPERT_NAMES else 0):
        for proj, per_expert in _EXPERT_NAMES[config.model_type].items():
            out[f"blk.{i}.ffn_{proj}_exps.weight"] = f"model.layers.{i}.{per_expert}"
    return out, shapes


def _unpermute_rows(weights, n_head: int):
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py ``permute``)."""
    shape = weights.shape
    return weights.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# Mixtral's router and stacked experts [n_expert, rows, cols] -> its checkpoint names (one tensor per expert)
_GGUF_MOE_NAMES = {"ffn_gate_inp.weight": "block_sparse_moe.gate.weight"} | {
    f"ffn_{proj}_exps.weight": name for proj, name in _EXPERT_NAMES["mixtral"].items()}


def _hf_tensor_name(gguf_name: str, n_layers: int, source: str, moe: bool = False) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers:
        if parts[2] in _GGUF_BLOCK_NAMES:
            return f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}"
        if moe and parts[2] in _GGUF_MOE_NAMES:
            return f"model.layers.{parts[1]}.{_GGUF_MOE_NAMES[parts[2]]}"
    raise SourceError(
        f"the GGUF holds a tensor '{gguf_name}' that has no place in a Llama model",
        where=source,
        fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
    )


# ---------------------------------------------------------------- the conversion


def convert_gguf(gguf_path: Path, out_dir: Path, source: str | None = None) -> None:
    """Write a float32 HF folder (config, safetensors, tokenizer) for a GGUF of an ``IMPORTABLE`` architecture.

    Weights: ``gguf.quants.dequantize`` per tensor; Llama's Q/K rows un-permuted, Gemma's
    stored ``1 + w`` norms back to ``w``; the same numbers as
    ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` where transformers reads the architecture.
    Tokenizer: transformers' own GGUF tokenizer conversion, saved as files.
    """
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    from qflow.models.integrity import check_gguf
    from qflow.models.shards import ShardWriter

    source = source or f"gguf:{gguf_path}"
    out_dir = Path(out_dir)
    check_gguf(gguf_path, where=source)  # the reader would fail on a cut-short file with a numpy reshape error
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError) as err:
        raise SourceError(
            f"{gguf_path} cannot be read as a GGUF file ({err})",
            where=source,
            fix="check that the file is a complete GGUF (v2 or v3) download",
        ) from err
    config = gguf_config(reader, source)
    arch = gguf_metadata(reader)["general.architecture"]
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
    names, shapes = (None, {}) if arch == "llama" else _gguf_to_hf_names(config, arch)
    moe = config.model_type == "mixtral"

    writer = ShardWriter(out_dir, max_bytes=MAX_SHARD_BYTES)
    for tensor in reader.tensors:
        if names is None:
            name = _hf_tensor_name(tensor.name, config.num_hidden_layers, source, moe=moe)
        elif tensor.name in names:
            name = names[tensor.name]
        else:
            raise SourceError(
                f"the GGUF holds a tensor '{tensor.name}' that has no place in a {arch} model",
                where=source,
                fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
            )
        try:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise SourceError(
                f"the gguf package cannot dequantize tensor '{tensor.name}' of type {tensor.tensor_type.name}",
                where=source,
                fix="upgrade the gguf package, or use a GGUF with another quantization type",
            ) from err
        weights = weights.reshape(tuple(int(d) for d in reversed(tensor.shape))).astype(np.float32, copy=False)
        if arch in _PERMUTED_QK and ".attn_q." in tensor.name:
            weights = _unpermute_rows(weights, n_heads)
        elif arch in _PERMUTED_QK and ".attn_k." in tensor.name:
            weights = _unpermute_rows(weights, n_kv_heads)
        elif arch in _NORM_STORED_PLUS_ONE and tensor.name.endswith("norm.weight"):
            weights = weights - np.float32(1.0)
        if name in shapes and weights.shape != shapes[name] and weights.size == math.prod(shapes[name]):
            weights = weights.reshape(shapes[name])   # e.g. Qwen2-MoE's shared-expert gate, [1, hidden] in HF
        if "{e}" in name:   # a mixture of experts' projection of every expert: one tensor per expert
            for e in range(weights.shape[0]):
                writer.add(name.format(e=e), np.ascontiguousarray(weights[e]))
            continue
        writer.add(name, np.ascontiguousarray(weights))
    writer.close()
    config.save_pretrained(out_dir)

    from ..recipe.safety import remote_code_allowed

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  trust_remote_code=remote_code_allowed())
    except ValueError as err:
        if "is not supported yet" not in str(err):
            raise
        # transformers reads no model of this architecture from a GGUF (gemma, olmo2, granite), but its GGUF
        # tokenizer builder goes by the file's tokenizer.ggml.model (BPE or SentencePiece), not the architecture
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
