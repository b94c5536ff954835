"""qflow inspect: identify qflow's exports and hand-built GPTQ / AWQ / bitsandbytes / FP8 / ONNX files from
their headers only."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from qflow.export import layouts
from qflow.export.inspect import InspectError, cli_inspect, inspect_path, read_safetensors_header

from .conftest import run_cli
from .test_export_gguf import small_irs, small_vocab_model_dir  # noqa: F401  (fixtures)
from .test_export_safetensors import irs  # noqa: F401  (fixture)


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def hand_built_gptq(folder: Path, *, out=64, cols=128, group=32, bits=4, sym=True) -> Path:
    """A GPTQ v1 layout made directly from the packing rules (no config.json)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        codes = rng.integers(0, 1 << bits, size=(cols, out)).astype(np.uint8)
        z = np.full((cols // group, out), (1 << (bits - 1)) - 1 if sym else 3, np.uint8)
        tensors[name + ".qweight"] = torch.from_numpy(layouts.pack_stream(codes, bits, axis=0))
        tensors[name + ".qzeros"] = torch.from_numpy(layouts.pack_stream(z, bits))
        tensors[name + ".scales"] = torch.rand(cols // group, out, dtype=torch.float16)
        tensors[name + ".g_idx"] = torch.arange(cols, dtype=torch.int32) // group
    tensors["model.embed_tokens.weight"] = torch.zeros(10, cols, dtype=torch.float16)
    tensors["lm_head.weight"] = torch.zeros(10, cols, dtype=torch.float16)
    return _save(folder / "model.safetensors", tensors)


def hand_built_awq(folder: Path, *, out=64, cols=128, group=64) -> Path:
    rng = np.random.default_rng(1)
    tensors = {}
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        tensors[name + ".qweight"] = torch.from_numpy(layouts.pack_awq(rng.integers(0, 16, (cols, out)).astype(np.uint8)))
        tensors[name + ".qzeros"] = torch.from_numpy(layouts.pack_awq(rng.integers(0, 16, (cols // group, out))
                                                                      .astype(np.uint8)))
        tensors[name + ".scales"] = torch.rand(cols // group, out, dtype=torch.float16)
    tensors["model.norm.weight"] = torch.ones(cols, dtype=torch.float16)
    return _save(folder / "model.safetensors", tensors)


# ---------------------------------------------------------------- hand-built third-party layouts


def test_hand_built_gptq_layout(tmp_path):
    path = hand_built_gptq(tmp_path / "gptq")
    info = inspect_path(path)
    assert info["method"] == "gptq" and info["bits"] == 4 and info["group_size"] == 32
    assert info["symmetric"] is True          # qzeros words 0x77777777, read from one tiny tensor
    assert info["n_quantized"] == 2 and info["unquantized"] == ["lm_head", "model.embed_tokens"]
    # 4 + 16/32 (scales) + 4/32 (zeros) + 32/64 (g_idx per column over 64 outputs)
    assert info["bpw"] == pytest.approx(4 + 16 / 32 + 4 / 32 + 32 / 64)
    asym = inspect_path(hand_built_gptq(tmp_path / "gptq-asym", sym=False, bits=8))
    assert asym["bits"] == 8 and asym["symmetric"] is False
    # a config.json beside it wins over guessing
    (tmp_path / "gptq" / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False}}))
    folder = inspect_path(tmp_path / "gptq")
    assert folder["format"] == "hf-folder" and folder["symmetric"] is False
    assert folder["quantization_config"]["quant_method"] == "gptq"


def test_hand_built_awq_layout(tmp_path):
    info = inspect_path(hand_built_awq(tmp_path / "awq"))
    assert info["method"] == "awq-gemm" and info["bits"] == 4 and info["group_size"] == 64
    assert info["layers"]["model.layers.0.mlp.down_proj"]["shape"] == [64, 128]
    assert info["unquantized"] == []
    assert info["bpw"] == pytest.approx(4 + 16 / 64 + 4 / 64)


def test_bitsandbytes_fp8_and_compressed_tensors_headers(tmp_path):
    qs = json.dumps({"quant_type": "nf4", "blocksize": 64, "shape": [64, 128], "dtype": "float16",
                     "nested_blocksize": 256}).encode()
    bnb = _save(tmp_path / "bnb.safetensors", {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(64 * 128 // 2, 1, dtype=torch.uint8),
        "model.layers.0.mlp.up_proj.weight.absmax": torch.zeros(128, dtype=torch.uint8),
        "model.layers.0.mlp.up_proj.weight.quant_map": torch.zeros(16),
        "model.layers.0.mlp.up_proj.weight.nested_absmax": torch.zeros(1),
        "model.layers.0.mlp.up_proj.weight.nested_quant_map": torch.zeros(256),
        "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(qs), dtype=torch.uint8),
        "lm_head.weight": torch.zeros(8, 128, dtype=torch.bfloat16),
    })
    info = inspect_path(bnb)
    assert info["method"] == "bitsandbytes-4bit" and info["bits"] == 4 and info["group_size"] == 64
    assert info["layers"]["model.layers.0.mlp.up_proj"]["format"] == "nf4"
    assert info["layers"]["model.layers.0.mlp.up_proj"]["double_quant"] is True
    assert info["unquantized"] == ["lm_head"]
    fp8 = _save(tmp_path / "fp8.safetensors", {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(64, 128).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale": torch.ones(64, 1),
    })
    info = inspect_path(fp8)
    assert info["method"] == "fp8" and info["bits"] == 8 and info["group_size"] == -1
    assert info["dtypes"]["F8_E4M3"] == 1
    ct = _save(tmp_path / "ct" / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight_packed": torch.zeros(64, 16, dtype=torch.int32),
        "model.layers.0.mlp.up_proj.weight_scale": torch.ones(64, 4, dtype=torch.float16),
        "model.layers.0.mlp.up_proj.weight_shape": torch.tensor([64, 128]),
    })
    info = inspect_path(ct)
    assert info["method"] == "compressed-tensors" and info["bits"] == 4 and info["group_size"] == 32
    assert info["symmetric"] is True


def test_onnx_matmulnbits(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    k, n, block = 128, 64, 32
    b = helper.make_tensor("B", TensorProto.UINT8, [n, k // block, block // 2], np.zeros(n * k // 2, np.uint8).tolist())
    s = helper.make_tensor("S", TensorProto.FLOAT, [n * k // block], np.ones(n * k // block, np.float32).tolist())
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", name="q_proj",
                            K=k, N=n, bits=4, block_size=block)
    w = helper.make_tensor("W", TensorProto.FLOAT, [n, 8], np.zeros(n * 8, np.float32).tolist())
    head = helper.make_node("MatMul", ["Y", "W"], ["Z"], name="lm_head")
    graph = helper.make_graph([node, head], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, 8])], [b, s, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    info = inspect_path(tmp_path / "m.onnx")
    assert info["format"] == "onnx" and info["method"] == "matmulnbits"
    assert info["bits"] == 4 and info["group_size"] == 32 and info["symmetric"] is True
    assert info["bpw"] == pytest.approx(4 + 32 / 32) and info["unquantized"] == ["lm_head"]


# ---------------------------------------------------------------- qflow's own outputs


def test_identifies_qflow_exports_and_ir(irs, small_irs, tmp_path):
    from qflow.export.gguf_writer import export_gguf
    from qflow.export.safetensors_ct import export_hf_folder

    ir = inspect_path(irs["awq4"].path)
    assert ir["format"] == "qflow-ir" and ir["bits"] == 4 and ir["group_size"] == 64 and ir["symmetric"] is False
    assert ir["qflow"]["method"] == "awq" and ir["schemes"] == ["asym_a"]
    assert ir["qflow"]["float_deltas"] == ["model.layers.0.input_layernorm.weight"]
    expected = {"compressed-tensors": "compressed-tensors", "awq-gemm": "awq-gemm", "gptq": "gptq"}
    for layout, method in expected.items():
        out = tmp_path / layout
        export_hf_folder(irs["awq4"], out, layout=layout, qflow_meta={"recipe_key": "abc"})
        info = inspect_path(out)
        assert info["format"] == "hf-folder" and info["method"] == method, layout
        assert info["bits"] == 4 and info["group_size"] == 64 and info["symmetric"] is False
        assert info["n_quantized"] == 14 and info["unquantized"] == ["model.embed_tokens"]
        assert info["qflow"]["recipe_key"] == "abc" and info["qflow"]["layout"] == layout
        assert info["quantization_config"]["quant_method"] in ("compressed-tensors", "awq", "gptq")
        # headers only: the safetensors file alone says the same
        alone = inspect_path(out / "model.safetensors")
        assert alone["method"] == method and alone["n_quantized"] == 14
    sym = tmp_path / "sym-gptq"
    export_hf_folder(irs["sym4"], sym, layout="gptq")
    (sym / "config.json").unlink()
    assert inspect_path(sym / "model.safetensors")["symmetric"] is True      # from qzeros 0x77777777
    gguf_path = tmp_path / "m.gguf"
    export_gguf(small_irs["sym4"], gguf_path, qflow_meta={"recipe_key": "abc"})
    info = inspect_path(gguf_path)
    assert info["format"] == "gguf" and info["quant_types"] == ["Q4_0"] and info["bits"] == 4
    assert info["group_size"] == 32 and info["symmetric"] is True and info["bpw"] == 4.5
    assert info["unquantized"] == ["token_embd.weight"] and info["qflow"]["recipe_key"] == "abc"
    assert info["architecture"] == "llama"


def test_header_reader_reads_no_tensor_data(tmp_path):
    path = _save(tmp_path / "x.safetensors", {"a.weight": torch.zeros(4, 4)}, {"k": "v"})
    header, meta, start = read_safetensors_header(path)
    assert header["a.weight"]["shape"] == [4, 4] and meta == {"k": "v"}
    assert start + 64 == path.stat().st_size


def test_cli_inspect_json_and_text(tmp_path, capsys):
    path = hand_built_awq(tmp_path / "awq")
    assert cli_inspect(Namespace(path=str(path), json=True)) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "awq-gemm"
    assert cli_inspect(Namespace(path=str(path), json=False)) == 0
    text = capsys.readouterr().out
    assert "awq-gemm" in text and "bits:       4" in text and "bpw:" in text
    with pytest.raises(InspectError, match="does not exist"):
        inspect_path(tmp_path / "nope")
    done = run_cli("inspect", str(tmp_path / "awq"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["method"] == "awq-gemm"
    missing = run_cli("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_identifies_qflow_onnx_export(irs, tmp_path):
    from qflow.export import onnx_graph

    ckpt = irs["asym4"]
    onnx_graph.build_onnx(ckpt.base_model, tmp_path / "onnx", ckpt=ckpt)
    info = inspect_path(tmp_path / "onnx")
    assert info["format"] == "onnx" and info["method"] == "matmulnbits"
    assert info["bits"] == 4 and info["group_size"] == 32 and info["symmetric"] is False
    assert info["qflow"]["method"] == "rtn" and info["n_quantized"] >= 4
