"""Every decoder family's adapter on a tiny random model built from its transformers config.

Fast part (in process): the adapter's sites per family, exact AWQ / SmoothQuant folds
(float logits unchanged to 1e-4 relative), AWQ and GPTQ produce an IR that applies to
the model, refusals before any work. Slow part (``-m slow``): the CLI as a user runs it,
calibrate -> RTN / HQQ / AWQ / GPTQ / SmoothQuant -> evaluate -> export per family.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qflow.errors import StageError
from qflow.models.adapters import get_adapter, norm_weight_offset
from qflow.models.quantized import apply_checkpoint
from qflow.quant.algos.smoothquant_model import collect_act_max, smooth_block
from qflow.quant.ir import Checkpoint

from .conftest import fold_random_scales, quantize_calibrated
from .test_blockwise import calib_ids, make_ctx

VOCAB = 97

# family -> (config class, model class, config extras); every one has 2 layers, hidden 64, 4 heads
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 16,
                                                      "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"residual_multiplier": 0.5, "embedding_multiplier": 2.0,
                                                        "logits_scaling": 2.0, "attention_multiplier": 0.2}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"use_qk_norm": True, "logit_scale": 0.5}),
}

# (AWQ site names, SmoothQuant norms) with GQA (kv_heads 2); without GQA v_o joins after attn_in
SITES = {
    "llama": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "post_attention_layernorm"]),
    "mistral": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "post_attention_layernorm"]),
    "qwen2": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "post_attention_layernorm"]),
    "qwen3": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "post_attention_layernorm"]),
    "gemma": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "post_attention_layernorm"]),
    "gemma2": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "pre_feedforward_layernorm"]),
    "gemma3_text": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "pre_feedforward_layernorm"]),
    "phi3": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "post_attention_layernorm"]),
    "olmo2": (["up_down"], []),
    "cohere": (["up_down"], []),   # one norm feeds both parallel halves: its site is skipped
    "granite": (["attn_in", "mlp_in", "up_down"], ["input_layernorm", "post_attention_layernorm"]),
}


def tiny_family(family: str, *, kv_heads: int = 2, seed: int = 0, vocab: int = VOCAB,
                config: dict | None = None) -> nn.Module:
    """A 2-layer random ``family`` model (hidden 64, 4 heads, GQA at kv_heads 2) with outlier-ish norms;
    ``config`` adds to (or replaces) the family's config extras."""
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    extra = {**extra, **(config or {})}
    cfg = getattr(transformers, cfg_name)(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                          max_position_embeddings=256, tie_word_embeddings=False, **extra)
    model = getattr(transformers, model_name)(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif name.endswith("norm.weight"):  # away from the init (0 or 1) so a wrong convention shows
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---- adapters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_sites_and_groups_per_family(family, kv_heads):
    model = tiny_family(family, kv_heads=kv_heads)
    adapter = get_adapter(model)
    block = adapter.blocks()[0]
    awq_names, norms = SITES[family]
    if kv_heads == 4:  # no GQA: the values map onto o_proj's input, site v->o exists
        awq_names = [n for n in awq_names if n == "attn_in"] + ["v_o"] + [n for n in awq_names if n != "attn_in"]
    assert [s.name for s in adapter.awq_sites(block)] == awq_names
    assert [s.norm for s in adapter.smooth_sites(block)] == norms
    groups = adapter.sequential_groups(block)
    assert sorted(n for g in groups for n in g) == sorted(adapter.linear_names(block))
    assert all(isinstance(block.get_submodule(n), nn.Linear) for n in adapter.linear_names(block))


@pytest.mark.parametrize("family,offset", [("llama", 0.0), ("gemma", 1.0), ("gemma2", 1.0), ("gemma3_text", 1.0),
                                           ("olmo2", 0.0), ("qwen3", 0.0)])
def test_norm_convention_is_read_off_the_module(family, offset):
    block = get_adapter(tiny_family(family)).blocks()[0]
    norm = block.get_submodule("input_layernorm" if family != "olmo2" else "post_attention_layernorm")
    before = norm.weight.detach().clone()
    assert norm_weight_offset(norm) == offset
    assert torch.equal(norm.weight, before)   # the probe restores the weight


# ---- exact folds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_awq_folds_leave_logits_unchanged(family, kv_heads):
    """Every AWQ site folded with random scales in [0.5, 2]: float logits move by <= 1e-4 relative."""
    model = tiny_family(family, kv_heads=kv_heads)
    ids = calib_ids(2, 24, vocab=VOCAB)
    ref = _logits(model, ids)
    adapter = get_adapter(model)
    n_sites = fold_random_scales(adapter)
    assert n_sites == 2 * len(adapter.awq_sites(adapter.blocks()[0]))
    changed = _rel(_logits(model, ids), ref)
    assert changed <= 1e-4, (family, changed)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smoothquant_folds_leave_logits_unchanged(family):
    model = tiny_family(family)
    ids = calib_ids(2, 24, vocab=VOCAB)
    ref = _logits(model, ids)
    adapter = get_adapter(model)
    names = [f"{adapter.block_name(i)}.{site.linears[0]}" for i, b in enumerate(adapter.blocks())
             for site in adapter.smooth_sites(b)]
    act_max = collect_act_max(model, adapter, ids, names=names) if names else {}
    changed_norms = []
    for i, block in enumerate(adapter.blocks()):
        changed_norms += smooth_block(block, adapter.block_name(i), adapter, act_max, alpha=0.5)
    assert len(changed_norms) == len(names)   # olmo2, cohere: nothing to smooth (no foldable norm site)
    changed = _rel(_logits(model, ids), ref)
    assert changed <= 1e-4, (family, changed)


# ---- calibrated methods produce an IR that applies -------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_produce_an_ir(tmp_path, family, method):
    fp = tiny_family(family, seed=5)
    work = copy.deepcopy(fp)
    ids = calib_ids(4, 32, vocab=VOCAB)
    adapter = get_adapter(work)
    res = quantize_calibrated(make_ctx(tmp_path), work, ids, method, n_grid=4)
    ckpt = Checkpoint(res.checkpoint_dir)
    assert len(ckpt.layers) == 2 * len(adapter.linear_names())
    quant = apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant")
    err = _rel(_logits(quant, ids), _logits(fp, ids))
    assert 0 < err < 0.5, (family, method, err)


# ---- blocks on disk (qflow.models.lazy), as every calibrated quantize stage loads a model ----------

# layer types mixed: Gemma 3's rotary tables and Qwen2's sliding mask are built per layer type outside the blocks
LAZY_CASES = [(f, None) for f in sorted(FAMILIES)] + [
    ("gemma3_text", {"layer_types": ["sliding_attention", "full_attention"]}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
]


@pytest.mark.parametrize("family,config", LAZY_CASES, ids=[f + ("-mixed" if c else "") for f, c in LAZY_CASES])
def test_lazy_model_gives_the_whole_models_logits(tmp_path, family, config):
    from qflow.models.lazy import block_loader, load_model_lazy

    model = tiny_family(family, seed=7, config=config)
    model.save_pretrained(tmp_path / "float")
    net, _ = load_model_lazy(tmp_path / "float", dtype="float32", attn_implementation="sdpa")
    loader = block_loader(net)
    assert loader is not None, f"{family}: loaded whole, not from a block-less shell"
    for i in range(2):
        loader.load(i)
    ids = calib_ids(2, 40, vocab=VOCAB)   # longer than the sliding windows (16, 8)
    assert _rel(_logits(net, ids), _logits(model, ids)) < 1e-5, family


# ---- refusals before any work --------------------------------------------------------------------

def test_unsupported_family_is_refused_naming_it_and_the_fix():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4))
    with pytest.raises(StageError) as err:
        get_adapter(model)
    msg = str(err.value)
    assert "'gpt2'" in msg and "known:" in msg and "gemma2" in msg and "Fix:" in msg


@pytest.mark.parametrize("model_type,hint", [("modernbert", "ModernBERT encoders"), ("cohere2", "sliding-window parallel")])
def test_families_without_an_adapter_are_refused_with_the_reason(model_type, hint):
    class Cfg:
        pass

    class Fake(nn.Module):
        config = Cfg()

    Fake.config.model_type = model_type
    with pytest.raises(StageError, match=f"model_type '{model_type}'.*Fix: .*{hint}"):
        get_adapter(Fake())


def test_multimodal_gemma3_is_refused_with_the_text_model_hint():
    class Cfg:
        model_type = "gemma3"

    class Fake(nn.Module):
        config = Cfg()

    with pytest.raises(StageError, match="Gemma3ForCausalLM"):
        get_adapter(Fake())


def test_adapter_whose_names_match_nothing_is_refused_naming_the_modules_found():
    model = tiny_family("llama")
    for block in model.model.layers:   # a renamed layout: same family tag, other module names
        block.attn, block.ffn = block.self_attn, block.mlp
        block.norm1, block.norm2 = block.input_layernorm, block.post_attention_layernorm
        del block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm
    with pytest.raises(StageError) as err:
        get_adapter(model)
    msg = str(err.value)
    assert "llama adapter" in msg and "lacks self_attn.q_proj" in msg and "names matched: none" in msg
    assert "attn.q_proj: Linear" in msg and "ffn: LlamaMLP" in msg and "Fix:" in msg


def test_fused_layout_under_the_wrong_family_is_refused(tmp_path):
    model = tiny_family("phi3")
    model.config.model_type = "llama"    # a Phi-3 checkpoint mislabelled as Llama
    with pytest.raises(StageError) as err:
        get_adapter(model)
    assert "qkv_proj" in str(err.value) and "names matched" in str(err.value)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3"])
def test_gguf_and_onnx_exports_refuse_other_families_before_writing(tmp_path, family):
    """llama.cpp GGUF and qflow's ONNX graph carry Llama decoders: the stage check says so up front."""
    from qflow.artifacts import QuantizedCheckpoint
    from qflow.quant.ir import CheckpointWriter
    from qflow.quant.spec import QuantSpec
    from stages.export_gguf import ExportGGUF
    from stages.export_onnx import ExportOnnx

    tiny_family(family).config.save_pretrained(tmp_path / "base")
    writer = CheckpointWriter(tmp_path / "ir", base_model=str(tmp_path / "base"), method="rtn")
    spec = QuantSpec(bits=4, group_size=32, scheme="asym_z")
    w = torch.randn(64, 64)
    from qflow.quant import dispatch

    scale, zero = dispatch.compute_params(w, spec)
    writer.add_quantized("model.layers.0.mlp.down_proj", spec, dispatch.quantize(w, scale, zero, spec), scale, zero)
    writer.flush()
    writer.close()
    ref = QuantizedCheckpoint(tmp_path / "ir", base_model=str(tmp_path / "base"), method="rtn")
    for stage, cfg in ((ExportGGUF, ExportGGUF.Config(path=str(tmp_path / "out" / "m.gguf"))),
                       (ExportOnnx, ExportOnnx.Config())):
        problems = stage().check(cfg, {"model": ref})
        assert any(f"base model is '{family}'" in p and "export.safetensors" in p for p in problems), problems
        assert not (tmp_path / "out").exists()


# ---- the CLI, per family (slow: about half a minute each on two shared cores) --------------------

def save_tiny_family(folder, family: str, tokenizer_dir) -> str:
    """``tiny_family`` with the bundled tokenizer's vocabulary, saved as a model folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model = tiny_family(family, vocab=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def family_recipe(model_dir: str) -> str:
    evaluate = '{data: "${data.eval}", n_windows: 2, topk: 16, speed: false, layer_report: false}'
    verify = '{verify_data: "${data.eval}", verify_windows: 2}'
    return f"""
name: family
model: {{source: "{model_dir}"}}
data:
  calib: {{source: "zoo:wiki-pages", seq_len: 64}}
  eval: {{source: "zoo:lee-news", seq_len: 64}}
stages:
  calibrate: {{uses: calibrate, with: {{data: "${{data.calib}}", n_samples: 4}}}}
  rtn: {{uses: quantize.rtn, with: {{bits: 4, group_size: 32}}}}
  hqq: {{uses: quantize.hqq, with: {{bits: 4, group_size: 32}}}}
  awq: {{uses: quantize.awq, needs: [calibrate], with: {{bits: 4, group_size: 32, n_grid: 4}}}}
  gptq: {{uses: quantize.gptq, needs: [calibrate], with: {{bits: 4, group_size: 32}}}}
  sq: {{uses: quantize.smoothquant, needs: [calibrate]}}
  eval_awq: {{uses: evaluate.lm, needs: [awq], with: {evaluate}}}
  eval_sq: {{uses: evaluate.lm, needs: [sq], with: {evaluate}}}
  export_gptq: {{uses: export.safetensors, needs: [gptq], with: {verify}}}
  export_rtn: {{uses: export.safetensors, needs: [rtn], with: {verify}}}
  eval_hqq: {{uses: evaluate.lm, needs: [hqq], with: {evaluate}}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cli_every_method_evaluate_and_export_per_family(tmp_path, runs_dir, bundled_tokenizer_dir, family):
    from .conftest import parse_json_stdout, run_cli, write_recipe

    model_dir = save_tiny_family(tmp_path / "model", family, bundled_tokenizer_dir)
    recipe = write_recipe(tmp_path / "recipes", family_recipe(model_dir))
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    out = parse_json_stdout(done)
    assert {s["status"] for s in out["stages"].values()} == {"ran"}
    m = out["metrics"]
    for ev in ("eval_awq", "eval_sq", "eval_hqq"):
        assert m[f"{ev}/ppl"] > 1 and 0 < m[f"{ev}/kl_mean"] < 1, (ev, m)
    for ex in ("export_gptq", "export_rtn"):   # integer zero points: the layout holds them exactly
        assert m[f"{ex}/roundtrip_max_abs_diff"] == 0 and m[f"{ex}/roundtrip_top1_agree"] == 1, (ex, m)
