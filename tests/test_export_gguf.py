"""export.gguf: block encoders from qflow codes (docs/METHODS.md §2.7), type choice and exactness, read-back,
qflow's GGUF loader round trip, the stage, and the bundled model through the CLI."""

from __future__ import annotations

import json

import gguf  # pinned in requirements.txt: a missing one fails collection, never skips
import numpy as np
import pytest

from qflow.export import gguf_writer as gw
from qflow.export import mapping

from .conftest import run_cli, write_recipe
from .conftest import make_tiny_llama
from .test_export_safetensors import IRs, irs, logits_kl, make_ctx  # noqa: F401  (fixture + helpers)


@pytest.fixture(scope="session")
def small_vocab_model_dir(tmp_path_factory):
    """A tiny random Llama with a 356-token byte-level BPE tokenizer trained here: GGUF files of the
    49k-token bundled vocabulary take seconds to parse, these take milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog. " * 3,
            "Quantization maps weights to integers with a scale and a zero point.", "Hello world! 1234567890"] * 20
    tok.train_from_iterator(text, trainer)
    tok_dir = tmp_path_factory.mktemp("small-tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(tok_dir)
    return make_tiny_llama(tmp_path_factory.mktemp("small-vocab-llama"), tok_dir)


@pytest.fixture()
def small_irs(tmp_path_factory, small_vocab_model_dir):
    from pathlib import Path

    root = Path(str(tmp_path_factory.getbasetemp())) / "export-irs-small"
    root.mkdir(exist_ok=True)
    return IRs(root, small_vocab_model_dir)


def _dequant(data, qtype, cols):
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(data.shape[0], cols)


# ---------------------------------------------------------------- docs/METHODS.md §2.7


def test_q4_0_test_vector():
    """x_i = (i-16)/8 -> d = 0.25 (fp16 00 34), qs[0..3] = 80 91 91 a2, qs[15] = f8, max error 0.125."""
    x = ((np.arange(32) - 16) / 8).astype(np.float32)[None]
    block = gw.encode_q4_0_reference(x)
    assert block.shape == (1, 18)
    assert block[0, :2].tobytes() == bytes([0x00, 0x34])
    assert block[0, 2:6].tobytes() == bytes([0x80, 0x91, 0x91, 0xA2])
    assert block[0, 17] == 0xF8
    # the same bytes as gguf's own quantizer, and from qflow codes (q = 0,1,1,2,2,...,15,15,15; d = 0.25)
    assert np.array_equal(block, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0))
    q = np.minimum(15, np.trunc(x / np.float32(0.25) + np.float32(8.5))).astype(np.int64)
    assert q[0, :6].tolist() == [0, 1, 1, 2, 2, 3] and q[0, -3:].tolist() == [15, 15, 15]
    codes_block = gw.encode_blocks("Q4_0", (q - 8).reshape(1, 1, 32), np.array([[0.25]], np.float32))
    assert np.array_equal(codes_block, block)
    decoded = _dequant(block, "Q4_0", 32)
    assert float(np.max(np.abs(decoded - x))) == 0.125
    assert decoded[0, -1] == 1.75


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_encoders_decode_with_gguf(qtype):
    rng = np.random.default_rng(0)
    lo, hi = gw._TYPES[qtype][1]
    q = rng.integers(lo, hi + 1, size=(3, 4, 32))
    d = rng.uniform(0.001, 0.1, size=(3, 4)).astype(np.float16).astype(np.float32)
    m = -rng.uniform(0, 1, size=(3, 4)).astype(np.float16).astype(np.float32) if gw._TYPES[qtype][2] else None
    data = gw.encode_blocks(qtype, q, d, m)
    assert data.shape == (3, 4 * gw._TYPES[qtype][0])
    want = d[..., None] * q.astype(np.float32) + (m[..., None] if m is not None else 0)
    assert np.array_equal(_dequant(data, qtype, 128), want.reshape(3, 128).astype(np.float32))


def test_permutation_is_llama_cpp_inverse_of_loader():
    from qflow.models.gguf_import import _unpermute_rows

    w = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        perm = gw.permute_rows(24, heads)
        assert np.array_equal(_unpermute_rows(w[perm], heads), w)


# ---------------------------------------------------------------- type choice per IR spec


@pytest.mark.parametrize("ir,mode,qtype,status", [
    ("sym4", "exact", "Q4_0", "exact"),
    ("gptq_act", "exact", "Q4_0", "requantized"),   # act-order groups are not 32-aligned
    ("asym4", "exact", "Q5_0", "exact"),            # q - z in [-15, 15]: Q5_0 holds it exactly
    ("asym4", "compact", "Q4_1", "approx"),         # fp16 m = -z*s rounded, codes kept
    ("awq4", "exact", "Q5_0", "exact"),             # g64 = two 32-blocks with one scale
    ("asym3", "exact", "Q4_0", "exact"),            # 3-bit: q - z in [-7, 7]
    ("sym8", "exact", "Q8_0", "exact"),
    ("hqq", "exact", "Q4_1", "approx"),             # float zeros: only d*q + m types, m rounded
    ("nf4", "exact", "Q4_0", "requantized"),
    ("g16", "exact", "Q4_1", "requantized"),        # group 16 < block 32
])
def test_type_choice(irs, ir, mode, qtype, status):
    name = "model.layers.0.mlp.up_proj"
    layer = mapping.load_ir_layer(irs[ir], name)
    plan = gw.plan_quantized(layer, "blk.0.ffn_up.weight", None, mode=mode)
    assert (plan.qtype, plan.status) == (qtype, status), plan.note
    decoded = _dequant(plan.data, plan.qtype, layer.in_features)
    if status == "exact":
        assert np.array_equal(decoded, layer.dequantized()) and plan.sqnr_db == float("inf")
    else:
        assert 10 < plan.sqnr_db < 200 and plan.note


def test_q4_1_exact_when_m_is_representable():
    """Q4_1 maps exactly when every fp16 m = -z*s is exact (z = 4: a power of two) and Q4_0 cannot hold q - z."""
    from qflow.quant.spec import QuantSpec

    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, size=(8, 64)).astype(np.uint8)
    codes[0, 0] = 15                                       # q - z = 11: outside Q4_0's [-8, 7]
    scale = rng.uniform(0.01, 0.05, size=(8, 2)).astype(np.float16).astype(np.float32)
    layer = mapping.IRLayer("x", QuantSpec(bits=4, group_size=32), codes, scale, np.full((8, 2), 4.0, np.float32), None)
    plan = gw.plan_quantized(layer, "x", None)
    assert (plan.qtype, plan.status) == ("Q4_1", "exact")
    assert np.array_equal(_dequant(plan.data, "Q4_1", 64), layer.dequantized())
    layer.zero[0, 0] = 5.0                                 # m = -5*s is (almost surely) not exact in fp16
    plan = gw.plan_quantized(layer, "x", None)
    assert (plan.qtype, plan.status) == ("Q5_0", "exact")
    assert gw.plan_quantized(layer, "x", None, mode="compact").status == "approx"


# ---------------------------------------------------------------- whole files


@pytest.mark.parametrize("ir", ["sym4", "asym4"])
def test_export_reads_back_exactly(small_irs, tmp_path, ir):
    ckpt = small_irs[ir]
    path = tmp_path / "model.gguf"
    rep = gw.export_gguf(ckpt, path, qflow_meta={"recipe_key": "r" * 64})
    assert rep["n_exact_tensors"] == len(ckpt.layers) and rep["n_requantized_tensors"] == 0
    back = gw.read_back(path, ckpt, rep)
    assert back["roundtrip_max_abs_diff"] == 0 and back["n_exact_checked"] == back["n_tensors"]
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied embeddings
    f = reader.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.block_count"].contents() == 2 and f["llama.attention.head_count_kv"].contents() == 2
    assert f["qflow.recipe_key"].contents() == "r" * 64
    assert set(json.loads(f["qflow.layers"].contents())) == set(ckpt.layers)
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and len(f["tokenizer.ggml.tokens"].data) == 356
    assert len(f["tokenizer.ggml.merges"].data) > 50 and f["tokenizer.ggml.eos_token_id"].contents() == 0
    if ir == "sym4":
        # qflow's GGUF loader (un-permutes Q/K, converts the tokenizer) gives qflow's logits exactly
        from qflow.models.loading import load_model
        from qflow.models.gguf_import import convert_gguf

        folder = tmp_path / "hf"
        folder.mkdir()
        convert_gguf(path, folder)
        model, tok = load_model(folder)
        kl, max_abs = logits_kl(ckpt, model)
        assert kl == 0 and max_abs == 0
        from transformers import AutoTokenizer

        base_tok = AutoTokenizer.from_pretrained(ckpt.base_model)
        text = "The quick brown fox: 4-bit weights, a zero point.\n\nHello world!"
        assert tok(text, add_special_tokens=False)["input_ids"] == base_tok(text, add_special_tokens=False)["input_ids"]


def test_mixed_file_reports_requantized_tensors(small_irs, tmp_path):
    rep = gw.export_gguf(small_irs["nf4"], tmp_path / "nf4.gguf", float_type="F16")
    assert rep["n_requantized_tensors"] == len(small_irs["nf4"].layers) and rep["types"] == {"Q4_0": 14}
    assert 10 < rep["min_sqnr_db"] < 60
    back = gw.read_back(tmp_path / "nf4.gguf", small_irs["nf4"], rep)
    assert back["roundtrip_max_abs_diff"] > 0
    assert rep["tensors"]["token_embd.weight"]["type"] == "F16"
    assert rep["tensors"]["output_norm.weight"]["type"] == "F32"  # norms always F32


def test_stage_roundtrip_and_llama_cpp_skip(small_irs, tmp_path, caplog):
    import logging

    from qflow.artifacts import QuantizedCheckpoint
    from qflow.specs import DataSpec
    from stages.export_gguf import ExportGGUF

    ckpt = small_irs["awq4"]
    cfg = ExportGGUF.Config(verify_data=DataSpec(source="zoo:lee-news", seq_len=32), verify_windows=1,
                            path=str(tmp_path / "placed" / "tiny.gguf"))
    ctx = make_ctx(tmp_path, "export_gguf")
    with caplog.at_level(logging.INFO, logger="qflow.stage.export_gguf"):
        out = ExportGGUF().run(ctx, cfg, model=QuantizedCheckpoint(ckpt.path, base_model=ckpt.base_model))
    exp = out["export"]
    assert exp.meta["format"] == "gguf" and (exp.path / "model.gguf").is_file()
    assert not list(exp.path.glob("*.partial"))
    m = ctx.metrics
    assert m["n_exact_tensors"] == len(ckpt.layers) and m["n_requantized_tensors"] == 0
    assert m["roundtrip_max_abs_diff"] == 0 and m["roundtrip_kl"] == 0 and m["roundtrip_top1_agree"] == 1
    assert m["roundtrip_logits_max_abs_diff"] == 0
    assert (tmp_path / "placed" / "tiny.gguf").read_bytes() == (exp.path / "model.gguf").read_bytes()
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        assert "llama_cpp is not installed" in caplog.text
    else:
        assert m["llama_cpp_top1_agree"] > 0.9


# ---------------------------------------------------------------- the bundled model, through the CLI


@pytest.mark.slow
def test_cli_bundled_model_gguf_export(tmp_path, runs_dir):
    """RTN sym 4-bit g32 on SmolLM2-135M -> Q4_0 for every linear, read back bit-exactly, logits KL 0.

    The tokenizer metadata is copied from the bundled GGUF."""
    recipe = write_recipe(tmp_path, """
name: export-gguf
model: {source: "zoo:smollm2-135m"}
stages:
  quantize: {uses: quantize.rtn, with: {bits: 4, group_size: 32, scheme: sym_f}}
  export:
    uses: export.gguf
    needs: [quantize]
    with: {verify_data: {source: "zoo:lee-news", seq_len: 256}, verify_windows: 2}
""")
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout)["metrics"]
    assert m["export/n_exact_tensors"] == 210 and m["export/n_requantized_tensors"] == 0
    assert m["export/roundtrip_max_abs_diff"] == 0
    assert m["export/roundtrip_kl"] < 1e-4 and m["export/roundtrip_top1_agree"] > 0.999
    path = next((runs_dir / "cache").rglob("export/model.gguf"))
    info = json.loads(run_cli("inspect", str(path), "--json", check=True).stdout)
    assert info["format"] == "gguf" and info["quant_types"] == ["Q4_0"]
    assert info["metadata"]["tokenizer.ggml.pre"] == "smollm"
