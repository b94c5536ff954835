"""BERT-family encoders on tiny random models (2 layers, hidden 64) built from their transformers configs.

Fast part: the adapter's layout and sites, the exact value->dense fold (and why the
LayerNorm folds are not offered), RTN / AWQ / GPTQ IRs that apply to the model, the
lazy loader, the embedding / masked-LM metrics, the exports' round trip or refusal.
Slow part (``-m slow``): the CLI as a user runs it, calibrate -> quantize -> evaluate.embed
-> export.safetensors.
"""

from __future__ import annotations

import collections
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from qflow.models.adapters import get_adapter
from qflow.models.quantized import apply_checkpoint
from qflow.quant.algos.awq import AWQOptions, fold_scale, quantize_model_awq
from qflow.quant.algos.gptq_model import GPTQOptions, quantize_model_gptq
from qflow.quant.ir import Checkpoint

from .conftest import fold_random_scales, run_cli, write_recipe
from .test_blockwise import make_ctx

# family -> (config class, MLM class, bare class)
FAMILIES = {
    "bert": ("BertConfig", "BertForMaskedLM", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", "XLMRobertaModel"),
}
LINEARS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]


def tiny_tokenizer(roberta: bool = False):
    """A WordPiece tokenizer over the bundled news text (no hub): specials, characters, 300 frequent words.
    RoBERTa-style names and ids (<s>=0, <pad>=1, </s>=2) for the roberta family, so pad = config.pad_token_id."""
    import transformers

    from qflow.data.sources import load_text

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if roberta else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    text = load_text("zoo:lee-news", field="text", cache_dir=None).lower()
    chars = sorted({c for c in text if c.isascii() and c.isprintable() and not c.isspace()})
    words = [w for w, _ in collections.Counter(re.findall(r"[a-z]{2,}", text)).most_common(300)]
    vocab = specials + chars + ["##" + c for c in chars] + words
    names = dict(zip(("cls_token", "pad_token", "sep_token", "unk_token", "mask_token"), specials)) if roberta else {}
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, **names)


def tiny_encoder(family: str = "bert", *, mlm: bool = True, seed: int = 0, vocab: int = 411) -> nn.Module:
    """A 2-layer random encoder (hidden 64, 4 heads, intermediate 128), LayerNorms away from (1, 0)."""
    import transformers

    cfg_name, mlm_name, bare_name = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=130)
    model = getattr(transformers, mlm_name if mlm else bare_name)(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def encoder_dir(folder: Path, family: str = "bert", *, mlm: bool = True) -> Path:
    tok = tiny_tokenizer(roberta=family != "bert")
    tiny_encoder(family, mlm=mlm, vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def ids_for(family: str, n: int = 4, seq_len: int = 32, seed: int = 1, vocab: int = 411) -> torch.Tensor:
    """Random ids above the 5 special tokens (no padding: what calibration windows are)."""
    return torch.randint(5, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _hidden(model, ids):
    with torch.no_grad():
        return getattr(model, "base_model", model)(input_ids=ids).last_hidden_state.double()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return encoder_dir(tmp_path_factory.mktemp("tiny-bert"), "bert")


# ---- adapter -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mlm", [True, False])
def test_adapter_layout_sites_and_groups(family, mlm):
    model = tiny_encoder(family, mlm=mlm)
    adapter = get_adapter(model)
    prefix = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta."}[family] if mlm else ""
    assert adapter.block_name(1) == f"{prefix}encoder.layer.1"
    block = adapter.blocks()[0]
    assert adapter.linear_names(block) == LINEARS
    assert [(s.name, s.prev, s.linears) for s in adapter.awq_sites(block)] == [
        ("v_o", "attention.self.value", ("attention.output.dense",))]
    assert adapter.smooth_sites(block) == []
    assert adapter.sequential_groups(block) == [["attention.self.key", "attention.self.value", "attention.self.query"],
                                                ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]]
    assert [n for n in LINEARS if adapter.clip_skipped(n)] == ["attention.self.query", "attention.self.key"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_value_dense_fold_leaves_outputs_unchanged(family):
    """The one AWQ site of an encoder layer, folded with random scales in [0.5, 2]: outputs move <= 1e-4."""
    model = tiny_encoder(family)
    ids = ids_for(family)
    ref_hidden = _hidden(model, ids)
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits.double()
    adapter = get_adapter(model)
    fold_random_scales(adapter)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    assert _rel(_hidden(model, ids), ref_hidden) <= 1e-4
    assert _rel(logits, ref_logits) <= 1e-4


def test_layernorm_folds_would_not_be_exact():
    """Why the adapter offers no LayerNorm site: the LN output also feeds the residual add (post-LN),
    so folding 1/s into it for the next layer's q/k/v (or the MLP's input) changes the outputs."""
    ids = ids_for("bert")
    for norm, linears in ((("bert.encoder.layer.0", "output.LayerNorm"), ("attention.self.query", "attention.self.key",
                                                                          "attention.self.value")),
                          (("bert.encoder.layer.0", "attention.output.LayerNorm"), ("intermediate.dense",))):
        model = tiny_encoder("bert")
        ref = _hidden(model, ids)
        layers = model.bert.encoder.layer
        prev = layers[0].get_submodule(norm[1])
        target = layers[1] if norm[1] == "output.LayerNorm" else layers[0]
        s = 0.5 + 1.5 * torch.rand(64, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            fold_scale(prev, [target.get_submodule(n) for n in linears], s)
        assert _rel(_hidden(model, ids), ref) > 1e-2, norm


# ---- quantization --------------------------------------------------------------------------------

@pytest.mark.parametrize("family,method", [("bert", "awq"), ("roberta", "gptq"),
                                           pytest.param("roberta", "awq", marks=pytest.mark.slow),
                                           pytest.param("bert", "gptq", marks=pytest.mark.slow)])
def test_calibrated_methods_produce_an_ir(tmp_path, family, method):
    fp = tiny_encoder(family, seed=5)
    work = copy.deepcopy(fp)
    ids = ids_for(family, n=4, seq_len=32)
    adapter = get_adapter(work)
    if method == "awq":
        res = quantize_model_awq(make_ctx(tmp_path), work, adapter, ids, AWQOptions(bits=4, group_size=32, n_grid=4),
                                 base_model="tiny", batch_size=2)
        assert [r["site"] for r in res.records if "site" in r] == ["v_o", "v_o"]
    else:
        res = quantize_model_gptq(make_ctx(tmp_path), work, adapter, ids, GPTQOptions(bits=4, group_size=32),
                                  base_model="tiny", batch_size=2)
    ckpt = Checkpoint(res.checkpoint_dir)
    prefix = adapter.block_prefix
    assert sorted(ckpt.layers) == sorted(f"{prefix}.{i}.{n}" for i in range(2) for n in LINEARS)
    quant = apply_checkpoint(copy.deepcopy(fp), ckpt, mode="dequant")
    err = _rel(_hidden(quant, ids), _hidden(fp, ids))
    assert 0 < err < 0.5, (family, method, err)


def test_hqq_and_smoothquant_produce_an_ir(bert_dir, tmp_path):
    """HQQ streams the encoder's linears from disk; SmoothQuant has no site (post-LN) and quantizes W8A8 unsmoothed."""
    from qflow.models.loading import load_model
    from qflow.quant.algos.hqq_model import HQQOptions, quantize_model_hqq
    from qflow.quant.algos.smoothquant_model import SmoothQuantOptions, quantize_model_smoothquant
    from qflow.quant.layerspec import linear_shapes

    fp, tok = load_model(bert_dir)
    ids = ids_for("bert", vocab=len(tok))
    names = list(linear_shapes(bert_dir))
    hqq = Checkpoint(quantize_model_hqq(make_ctx(tmp_path / "hqq"), bert_dir, HQQOptions(bits=4, group_size=32, iters=4),
                                        names).checkpoint_dir)
    work = copy.deepcopy(fp)
    sq = Checkpoint(quantize_model_smoothquant(make_ctx(tmp_path / "sq"), work, get_adapter(work), {},
                                               SmoothQuantOptions(), base_model=str(bert_dir)).checkpoint_dir)
    for ckpt, mode in ((hqq, "dequant"), (sq, "qlinear")):
        assert sorted(ckpt.layers) == sorted(names)
        err = _rel(_hidden(apply_checkpoint(copy.deepcopy(fp), ckpt, mode=mode), ids), _hidden(fp, ids))
        assert 0 < err < 0.5, (ckpt.method, err)


def test_awq_beats_or_equals_rtn_on_the_searched_site(tmp_path):
    """Ratio 0 is RTN, so every searched site's best loss is <= its RTN loss (docs/METHODS.md §4 test 1)."""
    work = tiny_encoder("bert", seed=7)
    res = quantize_model_awq(make_ctx(tmp_path), work, get_adapter(work), ids_for("bert", n=4, seq_len=32),
                             AWQOptions(bits=3, group_size=32, n_grid=10), base_model="tiny", batch_size=2)
    rows = [r for r in res.records if "site" in r]
    assert rows and all(r["loss_best"] <= r["loss_ratio0"] for r in rows)


def test_lazy_loader_builds_blocks_from_disk_and_replays_the_model(bert_dir):
    from qflow.models.lazy import block_loader, load_model_lazy
    from qflow.models.loading import load_model
    from qflow.quant.algos.blockwise import capture_block0_inputs, capture_block_kwargs

    whole, tok = load_model(bert_dir)
    assert type(whole).__name__ == "BertForMaskedLM" and tok.mask_token == "[MASK]"
    net, adapter = load_model_lazy(bert_dir, attn_implementation="eager")
    loader = block_loader(net)
    assert loader is not None and adapter.block_prefix == "bert.encoder.layer"
    ids = ids_for("bert", vocab=len(tok))
    kwargs = capture_block_kwargs(net, adapter, ids)
    h = capture_block0_inputs(net, adapter, ids, batch_size=2)
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks()):
            loader.load(i)
            out = block(h, **kwargs[i])
            h = out[0] if isinstance(out, tuple) else out
            loader.release(i)
    assert _rel(h.double(), _hidden(whole, ids)) < 1e-5


def test_bare_encoder_folder_loads_with_automodel(tmp_path):
    from qflow.models.loading import load_model

    folder = encoder_dir(tmp_path / "st", "bert", mlm=False)
    model, _ = load_model(folder)
    assert type(model).__name__ == "BertModel"
    assert get_adapter(model).block_prefix == "encoder.layer"


def test_rtn_targets_the_encoder_layers(bert_dir, tmp_path):
    from qflow.quant.layerspec import linear_shapes
    from qflow.quant.weights import block_index

    shapes = linear_shapes(bert_dir)   # the default targets: decoder .layers.N and encoder .layer.N
    assert sorted(shapes) == sorted(f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in LINEARS)
    assert block_index("bert.encoder.layer.1.output.dense") == 1
    assert block_index("model.layers.3.mlp.down_proj") == 3


# ---- evaluation ----------------------------------------------------------------------------------

def test_embedding_metrics_are_zero_for_the_float_model_and_move_when_quantized(bert_dir):
    from qflow.evaluation import embed
    from qflow.models.loading import load_model

    fp, tok = load_model(bert_dir)
    from qflow.data.sources import load_text

    texts = embed.sentences(load_text("zoo:lee-news", field="text", cache_dir=None), 12)
    assert len(texts) == 12 and all(len(t.split()) >= 5 for t in texts)
    batches = embed.sentence_batches(texts, tok, max_tokens=48, batch_size=5)
    assert batches[0].input_ids[0, 0] == tok.cls_token_id and int(batches[0].attention_mask.sum(1).min()) < 48
    masked = embed.mask_batches(batches, tok, rate=0.15, seed=0)
    assert all(((m.labels != -100).sum(1) >= 1).all() for m in masked)
    assert all((m.input_ids[m.labels != -100] == tok.mask_token_id).all() for m in masked)
    assert embed.batches_fingerprint(masked) == embed.batches_fingerprint(embed.mask_batches(batches, tok, rate=0.15,
                                                                                              seed=0))
    same = embed.summarize_embed(embed.compare_encoders(fp, fp, batches, masked))
    assert same["embed_cos_min"] > 1 - 1e-12 and same["mlm_kl_max"] == 0 and same["mlm_top1_agree"] == 1
    assert same["embed_pairsim_mae"] < 1e-12

    q = copy.deepcopy(fp)
    with torch.no_grad():
        for i, block in enumerate(q.bert.encoder.layer):
            for n in LINEARS:
                lin = block.get_submodule(n)
                step = lin.weight.abs().max() / 7
                lin.weight.copy_((lin.weight / step).round() * step)   # a coarse 4-bit-like grid
    diff = embed.summarize_embed(embed.compare_encoders(fp, q, batches, masked))
    assert 0.5 < diff["embed_cos_mean"] < 1 - 1e-6 and diff["mlm_kl_mean"] > 1e-6
    assert diff["mlm_n_masked"] == sum(int((m.labels != -100).sum()) for m in masked)


def test_mean_pooling_ignores_padding():
    from qflow.models.encoders import mean_pool

    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = mean_pool(h, mask)
    assert torch.allclose(pooled[0], h[0, :3].mean(0)) and torch.allclose(pooled[1], h[1].mean(0))


# ---- exports -------------------------------------------------------------------------------------

def _rtn_ir(base: Path, out: Path) -> Path:
    from qflow.quant import dispatch
    from qflow.quant.ir import CheckpointWriter
    from qflow.quant.layerspec import linear_shapes
    from qflow.quant.spec import QuantSpec
    from qflow.quant.weights import iter_linear_weights

    spec = QuantSpec(bits=4, group_size=32, scheme="asym_z")
    writer = CheckpointWriter(out, base_model=str(base), method="rtn")
    for name, w in iter_linear_weights(base, list(linear_shapes(base))):
        scale, zero = dispatch.compute_params(w, spec)
        writer.add_quantized(name, spec, dispatch.quantize(w, scale, zero, spec), scale, zero)
    writer.flush()
    writer.close()
    return out


def test_gguf_export_refuses_encoders_before_writing(bert_dir, tmp_path):
    from qflow.artifacts import QuantizedCheckpoint
    from stages.export_gguf import ExportGGUF
    from stages.export_onnx import ExportOnnx

    ref = QuantizedCheckpoint(_rtn_ir(bert_dir, tmp_path / "ir"), base_model=str(bert_dir), method="rtn")
    problems = ExportGGUF().check(ExportGGUF.Config(path=str(tmp_path / "out" / "m.gguf")), {"model": ref})
    assert any("base model is 'bert'" in p and "export.safetensors" in p for p in problems), problems
    assert not (tmp_path / "out").exists()
    assert ExportOnnx().check(ExportOnnx.Config(), {"model": ref}) == []   # ONNX carries encoders


@pytest.mark.parametrize("family,mlm", [("bert", True), ("roberta", False)])
def test_onnx_encoder_graph_round_trips_with_matmulnbits(tmp_path, family, mlm):
    """MatMulNBits at accuracy level 0 reproduces qflow's quantized model on padded sentence batches."""
    import onnx

    from qflow.data.sources import load_text
    from qflow.evaluation import embed
    from qflow.export.onnx_bench import make_session
    from qflow.export.onnx_encoder import build_encoder_onnx, encoder_roundtrip
    from qflow.export.verify import reference_model

    base = encoder_dir(tmp_path / "base", family, mlm=mlm)
    ckpt = Checkpoint(_rtn_ir(base, tmp_path / "ir"))
    info = build_encoder_onnx(base, tmp_path / "onnx", ckpt=ckpt, accuracy_level=0)
    graph = onnx.load(str(info.model_path), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 12
    assert [o.name for o in graph.output] == ["last_hidden_state"] + (["logits"] if mlm else [])
    ref, tok = reference_model(ckpt)
    texts = embed.sentences(load_text("zoo:lee-news", field="text", cache_dir=None), 8)
    batches = embed.sentence_batches(texts, tok, max_tokens=120, batch_size=4)
    assert any(int(b.attention_mask.sum()) < b.attention_mask.numel() for b in batches)   # padding is exercised
    m = encoder_roundtrip(make_session(info.model_path, threads=1), ref, batches)
    assert m["roundtrip_max_abs_diff"] < 1e-4 and m["roundtrip_embed_cos_min"] > 1 - 1e-9
    if mlm:
        assert m["roundtrip_kl"] < 1e-9 and m["roundtrip_top1_agree"] == 1.0


# ---- shipped recipes -----------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["bert-rtn.yaml", "bert-gptq.yaml"])
def test_shipped_encoder_recipes_compose_and_plan(recipe):
    from qflow.engine.plan import build_plan
    from qflow.recipe.compose import compose_recipe, to_plain
    from qflow.recipe.validate import validate_shape

    from .conftest import REPO

    path = REPO / "recipes" / recipe
    cfg = to_plain(compose_recipe(path, []))
    plan = build_plan(validate_shape(cfg, str(path)), cfg, str(path))
    assert plan.stages["evaluate"].config.data.seq_len == 128
    assert plan.stages["quantize"].config.group_size == 128
    if "calibrate" in plan.stages:
        assert plan.stages["calibrate"].config.data.seq_len == 512


# ---- end to end through the CLI (slow) -----------------------------------------------------------

def _encoder_recipe(model_dir: Path, method: str) -> str:
    quantize = {"rtn": "{uses: quantize.rtn, with: {bits: 4, group_size: 32, targets: '\\.layer\\.\\d+\\.'}}",
                "awq": "{uses: quantize.awq, needs: [calibrate], with: {bits: 4, group_size: 32, n_grid: 4}}",
                "gptq": "{uses: quantize.gptq, needs: [calibrate], with: {bits: 4, group_size: 32}}"}[method]
    return f"""
name: tiny-encoder-{method}
model: {{source: "{model_dir}"}}
stages:
  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: 64}}, n_samples: 4,
               targets: '\\.layer\\.\\d+\\.'}}}}
  quantize: {quantize}
  evaluate: {{uses: evaluate.embed, needs: [quantize], with: {{data: {{source: "zoo:lee-news", seq_len: 64}},
              n_sentences: 24, batch_size: 8}}, gates: {{embed_cos_mean: {{min: 0.5}}}}}}
  export: {{uses: export.safetensors, needs: [quantize], with: {{verify_windows: 2,
            verify_data: {{source: "zoo:lee-news", seq_len: 64}}}}}}
  onnx: {{uses: export.onnx, needs: [quantize], with: {{data: {{source: "zoo:lee-news", seq_len: 64}}, n_windows: 1,
          benchmark: false}}, gates: {{roundtrip_max_abs_diff: {{max: 1.0e-4}}}}}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_cli_encoder_pipeline(tmp_path, runs_dir, method):
    model_dir = encoder_dir(tmp_path / "bert", "bert")
    recipe = write_recipe(tmp_path, _encoder_recipe(model_dir, method))
    done = run_cli("run", str(recipe), runs_dir=runs_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    reports = list(runs_dir.glob("cache/*/*/outputs/report/metrics.json"))
    assert len(reports) == 1
    metrics = json.loads(reports[0].read_text())["metrics"]
    assert 0.5 < metrics["embed_cos_mean"] < 1 and metrics["mlm_kl_mean"] > 0
    # fp16 scale (+ a 4-bit zero for the asymmetric grids; GPTQ's default SYM-F stores none) per group of 32
    assert metrics["bpw_quantized"] == pytest.approx(4 + (16 + (0 if method == "gptq" else 4)) / 32)
    configs = [json.loads(p.read_text()) for p in runs_dir.glob("cache/*/*/outputs/export/config.json")]
    assert [c["quantization_config"]["format"] for c in configs if "quantization_config" in c] == ["pack-quantized"]
    onnx = [json.loads(p.read_text()) for p in runs_dir.glob("cache/*/*/outputs/export/export.json")]
    assert len(onnx) == 1 and onnx[0]["metrics"]["n_linear_nbits"] == 12
    assert onnx[0]["metrics"]["roundtrip_embed_cos_min"] > 1 - 1e-9


@pytest.mark.parametrize("mlm", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_compressed_tensors_export_round_trips(tmp_path, mlm):
    """export.safetensors' writer + both readers (qflow's, the compressed-tensors library's) on a tiny bert."""
    from qflow.export import readers
    from qflow.export.safetensors_ct import export_hf_folder
    from qflow.export.verify import compare_logits, reference_model

    base = encoder_dir(tmp_path / "base", "bert", mlm=mlm)
    ckpt = Checkpoint(_rtn_ir(base, tmp_path / "ir"))
    report = export_hf_folder(ckpt, tmp_path / "out", layout="compressed-tensors", dtype="float32")
    assert report["n_exact"] == 12 and report["n_float"] == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    ref, tok = reference_model(ckpt)
    ids = ids_for("bert", n=2, seq_len=24, vocab=len(tok))
    loaded, _ = readers.load_exported_model(tmp_path / "out")
    m = compare_logits(ref, loaded, ids)
    assert m["roundtrip_max_abs_diff"] < 1e-5 and m["roundtrip_top1_agree"] == 1.0
    if readers.compressed_tensors_available():
        lib, _, how = readers.load_with_compressed_tensors(tmp_path / "out")
        assert compare_logits(ref, lib, ids)["roundtrip_max_abs_diff"] < 1e-4, how
