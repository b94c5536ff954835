"""Cut-short or damaged safetensors / GGUF files: a one-paragraph error naming the file and the shortfall,
from `qflow run` (model sources) and `qflow inspect`, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qflow.errors import SourceError
from qflow.models.integrity import CorruptFileError, check_gguf, check_model_folder, check_safetensors

from .conftest import run_cli, tiny_recipe, write_recipe


def tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A small Llama-named GGUF written by the gguf package (F32 and Q8_0 tensors)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_token_list([f"t{i}" for i in range(50)])
    writer.add_tensor("token_embd.weight", rng.standard_normal((50, 32)).astype(np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((64, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", rng.standard_normal(32).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cut(src: Path, dst: Path, keep_bytes: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep_bytes])
    return dst


def truncated_model_folder(tiny_model_dir: Path, dst: Path) -> Path:
    shutil.copytree(tiny_model_dir, dst)
    weights = dst / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    return dst


# ---------------------------------------------------------------- the checks themselves


def test_whole_gguf_passes_and_matches_the_reader(tmp_path):
    import gguf

    path = tiny_gguf(tmp_path / "m.gguf")
    info = check_gguf(path)
    reader = gguf.GGUFReader(str(path))
    assert info["tensors"] == len(reader.tensors) == 3
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert info["data_bytes"] == end - int(reader.data_offset)


def test_block_table_agrees_with_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    from qflow.models.integrity import GGML_BLOCK_BYTES

    for ttype, sizes in GGML_BLOCK_BYTES.items():
        assert GGML_QUANT_SIZES[ttype] == sizes, ttype


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_cut_gguf_is_refused_with_the_shortfall(tmp_path, fraction):
    path = tiny_gguf(tmp_path / "m.gguf")
    size = path.stat().st_size
    short = cut(path, tmp_path / "short.gguf", int(size * fraction))
    with pytest.raises(CorruptFileError, match="truncated") as err:
        check_gguf(short, where="gguf:short.gguf")
    assert str(short) in str(err.value) and "Fix:" in str(err.value) and "\n" not in str(err.value)
    if fraction > 0.5:       # past the header: the numbers are given
        whole = check_gguf(path)["data_bytes"]
        assert f"header says {whole} bytes of tensor data" in str(err.value)


def test_safetensors_checks(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(5, np.int64)}, str(path))
    header, _, start = check_safetensors(path)
    assert set(header) == {"a", "b"} and start + 64 * 4 + 5 * 8 == path.stat().st_size
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-7])
    with pytest.raises(CorruptFileError, match=rf"header says {64 * 4 + 5 * 8} bytes of tensor data, the file has "
                                               rf"{64 * 4 + 5 * 8 - 7}"):
        check_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:20])
    with pytest.raises(CorruptFileError, match="truncated inside its header"):
        check_safetensors(tmp_path / "head.safetensors")
    (tmp_path / "long.safetensors").write_bytes(data + b"\0" * 3)
    with pytest.raises(CorruptFileError, match="extra bytes"):
        check_safetensors(tmp_path / "long.safetensors")


def test_sharded_folder_with_a_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(SourceError, match="missing: model-00001-of-00002.safetensors"):
        check_model_folder(tmp_path)


# ---------------------------------------------------------------- as a user meets them: the CLI


def test_run_refuses_a_truncated_safetensors_model_folder(tmp_path, tiny_model_dir, runs_dir):
    folder = truncated_model_folder(tiny_model_dir, tmp_path / "cut-model")
    recipe = write_recipe(tmp_path, tiny_recipe(folder))
    done = run_cli("run", str(recipe), runs_dir=runs_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"{folder / 'model.safetensors'} is truncated: its header says" in done.stderr
    assert not (runs_dir / "runs").exists() or not any((runs_dir / "runs").iterdir())   # no stage ran


def test_run_refuses_a_truncated_gguf_source(tmp_path, runs_dir):
    path = tiny_gguf(tmp_path / "m.gguf")
    short = cut(path, tmp_path / "short.gguf", path.stat().st_size - 100)
    recipe = write_recipe(tmp_path, f"""
name: cut-gguf
model: {{source: "gguf:{short}"}}
stages:
  quantize: {{uses: quantize.rtn, with: {{bits: 4, group_size: 32}}}}
""")
    done = run_cli("run", str(recipe), runs_dir=runs_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"{short} is truncated: its header says" in done.stderr and "Fix:" in done.stderr


def test_inspect_reports_truncation(tmp_path, tiny_model_dir):
    folder = truncated_model_folder(tiny_model_dir, tmp_path / "cut-model")
    path = tiny_gguf(tmp_path / "m.gguf")
    short = cut(path, tmp_path / "short.gguf", path.stat().st_size - 100)
    for target in (folder / "model.safetensors", folder, short):
        done = run_cli("inspect", str(target))
        assert done.returncode != 0, f"{target}: {done.stdout[-500:]}"
        assert "Traceback" not in done.stderr
        assert "is truncated: its header says" in done.stderr, done.stderr[-1000:]
