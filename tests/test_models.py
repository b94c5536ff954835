"""Model sources: the bundled GGUF against transformers' own GGUF loader, tiny GGUF and folder
models, atomic cached conversion, cheap fingerprints, and the errors a user sees."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import qflow.models.gguf_import as gguf_import
import qflow.models.sources as sources
from qflow.data import fingerprint, load_text, make_windows
from qflow.errors import SourceError
from qflow.fingerprint import digest
from qflow.models import fingerprint_model_source, load_model, resolve_model

EVAL_ALL = "7a0c5ed98c66cb6c0e5692f7c600fdec72de58c94cd9ef8d6f5a137ebb01ed77"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bundled(cache):
    return resolve_model("zoo:smollm2-135m", cache)


# ---------------------------------------------------------------- the bundled model


def test_bundled_gguf_is_bit_identical_to_transformers_gguf_loader(bundled):
    from transformers import LlamaForCausalLM

    gguf_path = sources._zoo_gguf_path("smollm2-135m")
    ours, tokenizer = load_model(bundled.path, attn_implementation="eager")
    reference = LlamaForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    assert getattr(ours.config, "quantization_config", None) is None
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours.config, key) == getattr(reference.config, key), key
    assert ours.config.rope_parameters["rope_theta"] == reference.config.rope_parameters["rope_theta"] == 1e5
    assert (ours.config.num_hidden_layers, ours.config.hidden_size, ours.config.num_key_value_heads) == (30, 576, 3)
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008

    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    mismatched = [k for k in ours_state if not torch.equal(ours_state[k], reference_state[k])]
    assert mismatched == []

    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_conversion_is_cached_and_recorded(bundled, cache):
    again = resolve_model("zoo:smollm2-135m", cache)
    assert again == bundled
    record = json.loads((bundled.path / gguf_import.MARKER_FILE).read_text())
    assert record["fingerprint"] == bundled.fingerprint and record["converter_version"] == 1
    assert record["conversion_seconds"] > 0
    assert {p.name for p in bundled.path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not list(bundled.path.parent.glob(".tmp-*"))
    assert bundled.fingerprint == fingerprint_model_source("zoo:smollm2-135m", cache)


def test_converted_tokenizer_gives_the_methods_eval_windows(bundled):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled.path)
    windows = make_windows(load_text("zoo:lee-news"), tokenizer, 512)
    assert fingerprint(windows) == EVAL_ALL


def test_fingerprint_is_cheap_and_memoized(cache):
    code = (
        "import sys; from pathlib import Path; from qflow.models.sources import fingerprint_model_source as f;"
        f"print(f('zoo:smollm2-135m', Path({str(cache)!r})));"
        "print(','.join(n for n in ('torch', 'transformers', 'gguf', 'datasets', 'huggingface_hub') if n in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    printed_fingerprint, heavy = out.stdout.split("\n")[:2]
    assert heavy == ""
    assert printed_fingerprint == fingerprint_model_source("zoo:smollm2-135m", cache)
    memo = json.loads((cache / "fingerprints.json").read_text())
    assert str(sources._zoo_gguf_path("smollm2-135m")) in memo


# ---------------------------------------------------------------- a tiny GGUF written here


def _tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e4}, tie_word_embeddings=tie,
        bos_token_id=257, eos_token_id=257,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K permutation, the one the converter must undo."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def _write_gguf(path: Path, model, arch: str = "llama") -> None:
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(byte_tokens + ["\u0120t", "<|endoftext|>"])
    writer.add_token_types([1] * 257 + [3])
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(257)
    writer.add_add_bos_token(False)

    block = {v: k for k, v in gguf_import._GGUF_BLOCK_NAMES.items()}
    top = {v: k for k, v in gguf_import._GGUF_GLOBAL_NAMES.items()}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            gguf_name = f"blk.{index}.{block[rest]}"
        else:
            gguf_name = top[name]
        if ".attn_q." in gguf_name:
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        if ".ffn_" in gguf_name and array.ndim == 2 or ".attn_output." in gguf_name:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        elif gguf_name == "token_embd.weight":
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, array)  # norms, q/k/v, output: F32, so exact
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture()
def tiny_gguf(tmp_path):
    model = _tiny_llama()
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, model)
    return path, model


def test_tiny_gguf_round_trip_sharded(tiny_gguf, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    path, original = tiny_gguf
    monkeypatch.setattr(gguf_import, "MAX_SHARD_BYTES", 100_000)
    resolved = resolve_model(f"gguf:{path}", tmp_path / "cache")
    index = json.loads((resolved.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    ours, tokenizer = load_model(resolved.path, attn_implementation="eager")
    reference = LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours_state, original_state = ours.state_dict(), original.state_dict()
    for name, tensor in ours_state.items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
        if not any(k in name for k in ("mlp.", "o_proj", "embed_tokens")):  # stored as F32: exact
            assert torch.equal(tensor, original_state[name]), name
    assert not ours.config.tie_word_embeddings
    ids = torch.tensor([[257, 5, 100, 200, 33, 84, 7, 7, 9]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, reference(ids).logits)
    assert tokenizer("a t", add_special_tokens=False).input_ids == [ord("a"), 256]


def test_tiny_gguf_tied_embeddings(tmp_path):
    model = _tiny_llama(tie=True)
    _write_gguf(tmp_path / "tied.gguf", model)
    resolved = resolve_model(f"gguf:{tmp_path / 'tied.gguf'}", tmp_path / "cache")
    ours, _ = load_model(resolved.path)
    assert ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_killed_conversion_leaves_nothing_half_written(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    real_convert = gguf_import.convert_gguf

    def dies_midway(gguf_path, out_dir, source=None):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "convert_gguf", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(f"gguf:{path}", cache)
    models = cache / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == []

    stale = models / f".tmp-gguf-{fingerprint_model_source(f'gguf:{path}', cache)[:32]}-999-dead"
    stale.mkdir()  # what a SIGKILL leaves behind
    calls = []
    monkeypatch.setattr(gguf_import, "convert_gguf", lambda *a, **k: (calls.append(1), real_convert(*a, **k)))
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(f"gguf:{path}", cache))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({r.path for r in results}) == 1
    assert not stale.exists()
    assert (results[0].path / gguf_import.MARKER_FILE).is_file()


def test_non_llama_gguf_is_refused(tmp_path):
    _write_gguf(tmp_path / "other.gguf", _tiny_llama(), arch="gpt2")
    with pytest.raises(SourceError, match="'gpt2' model and qflow converts only Llama.*Fix: use the model's Hugging Face"):
        resolve_model(f"gguf:{tmp_path / 'other.gguf'}", tmp_path / "cache")


# ---------------------------------------------------------------- a local folder model


def test_tiny_local_folder_model_resolves_and_loads(bundled, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bundled.path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    folder = tmp_path / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    cache = tmp_path / "cache"
    resolved = resolve_model(str(folder), cache)
    assert resolved.path == folder.resolve() and resolved.source == str(folder)
    model, loaded_tokenizer = load_model(resolved.path, dtype="float32")
    assert not model.training and model.dtype == torch.float32
    ids = loaded_tokenizer("hello world", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    assert fingerprint_model_source(str(folder), cache) == resolved.fingerprint
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("128", "129", 1))
    assert fingerprint_model_source(str(folder), cache) != resolved.fingerprint


# ---------------------------------------------------------------- errors a user sees


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError) as info:
        resolve_model(str(tmp_path / "no-such-model"), tmp_path / "cache")
    assert "does not exist" in str(info.value) and "zoo:smollm2-135m" in str(info.value)
    with pytest.raises(SourceError, match="GGUF file .* does not exist"):
        resolve_model(f"gguf:{tmp_path / 'missing.gguf'}", tmp_path / "cache")


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(SourceError, match=r"holds no config\.json.*Fix: point at the folder that holds config\.json"):
        resolve_model(str(tmp_path / "weights"), tmp_path / "cache")


def test_offline_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = "hf:qflow-tests/not-a-real-model@v1"
    with pytest.raises(SourceError) as info:
        resolve_model(source, tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"{source}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)")
    assert "not in the local Hugging Face cache" in message and "Fix:" in message and "HF_HUB_OFFLINE=0" in message
    assert fingerprint_model_source(source, tmp_path / "cache") == digest(
        kind="hf", repo_id="qflow-tests/not-a-real-model", revision="v1"
    )


def test_unknown_zoo_model_suggests_the_right_name(tmp_path):
    with pytest.raises(SourceError, match="no zoo model 'smollm2-135'.*did you mean 'smollm2-135m'"):
        resolve_model("zoo:smollm2-135", tmp_path / "cache")


# ---------------------------------------------------------------- the shard writer (GGUF converter and safetensors export)


def _random_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((48, 64)).astype(np.float32) for i in range(5)}


@pytest.mark.parametrize("max_bytes, n_files", [(10**9, 1), (2 * 48 * 64 * 4, 3), (1, 5)])
def test_shard_writer_numpy_and_torch_write_the_same_files(tmp_path, max_bytes, n_files):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from qflow.models.shards import ShardWriter

    tensors = _random_tensors(max_bytes)
    written = {}
    for kind in ("numpy", "torch"):
        out = tmp_path / kind
        out.mkdir()
        writer = ShardWriter(out, max_bytes=max_bytes)  # metadata {"format": "pt"}, which transformers needs
        for name, array in tensors.items():
            writer.add(name, array if kind == "numpy" else torch.from_numpy(array.T.copy()).T)  # a strided view
        written[kind] = writer.close()
        assert sorted(p.name for p in out.iterdir()) == sorted(written[kind] + (["model.safetensors.index.json"]
                                                                                if n_files > 1 else []))
    assert written["numpy"] == written["torch"] and len(written["numpy"]) == n_files
    for name in written["numpy"]:
        assert (tmp_path / "numpy" / name).read_bytes() == (tmp_path / "torch" / name).read_bytes()
        with safe_open(tmp_path / "numpy" / name, framework="np") as handle:
            assert handle.metadata() == {"format": "pt"}
    loaded = {k: v for name in written["numpy"] for k, v in load_file(tmp_path / "numpy" / name).items()}
    assert loaded.keys() == tensors.keys() and all(np.array_equal(loaded[k], tensors[k]) for k in tensors)
    if n_files > 1:
        index = json.loads((tmp_path / "numpy" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
        assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(written["numpy"])


_WRITE_WITH_METADATA = """
import sys
import numpy as np
from qflow.models.shards import ShardWriter
writer = ShardWriter(sys.argv[1], max_bytes=10**9, metadata={"format": "pt", "qflow_version": "0", "qflow_layout": "x",
                                                             "qflow_method": "gptq", "qflow_layers": '{"a": "\u00e9"}',
                                                             "qflow_recipe_key": "k"})
for i in range(3):
    writer.add(f"t{i}", np.arange(10 * (i + 1), dtype=np.float32))
writer.close()
"""


def test_shard_writer_files_are_byte_identical_across_processes(tmp_path):
    """safetensors writes __metadata__ in a per-process hash order; the writer sorts it (kill loop, issue 17)."""
    from safetensors import safe_open

    for i in range(3):
        (tmp_path / str(i)).mkdir()
        subprocess.run([sys.executable, "-c", _WRITE_WITH_METADATA, str(tmp_path / str(i))], check=True, timeout=120)
    files = [(tmp_path / str(i) / "model.safetensors").read_bytes() for i in range(3)]
    assert files[0] == files[1] == files[2]
    with safe_open(tmp_path / "0" / "model.safetensors", framework="np") as handle:
        assert handle.metadata()["qflow_layers"] == '{"a": "\u00e9"}' and len(handle.metadata()) == 6
        assert np.array_equal(handle.get_tensor("t2"), np.arange(30, dtype=np.float32))
    header = files[0][8:8 + int.from_bytes(files[0][:8], "little")]
    assert header.index(b'"format"') < header.index(b'"qflow_layers"') < header.index(b'"qflow_version"')
