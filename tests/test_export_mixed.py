"""Mixed-precision checkpoints (a spec per layer) through every export: compressed-tensors (one config
group per distinct spec), GGUF (a tensor type per tensor), ONNX (MatMulNBits bits per node), and the
refusals, before anything is written, where a format cannot hold the specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflow.artifacts import ModelRef, QuantizedCheckpoint
from qflow.quant.ir import Checkpoint
from qflow.specs import DataSpec

from .conftest import run_cli, write_recipe
from .test_export_gguf import small_vocab_model_dir  # noqa: F401  (fixture)

DOWN0 = "model.layers.0.mlp.down_proj"
Q0 = "model.layers.0.self_attn.q_proj"
GATE1 = "model.layers.1.mlp.gate_proj"
VERIFY = DataSpec(source="zoo:lee-news", seq_len=32)


def make_ctx(tmp_path: Path, stage_id: str):
    from qflow.engine.context import StageContext

    return StageContext(stage_id=stage_id, uses="x", key="d" * 64, out_dir=tmp_path / stage_id / "out",
                        scratch=tmp_path / stage_id / "scratch", run_dir=tmp_path / "run",
                        memo_dir=tmp_path / "runs" / "cache", quiet=True)


def mixed_ir(base: Path, tmp_path: Path, **with_) -> Checkpoint:
    """quantize.rtn with per-layer overrides, run as the engine runs it."""
    from stages.quantize_rtn import RTN

    cfg = RTN.Config(**with_)
    assert RTN().check(cfg, {"model": ModelRef(base)}) == []
    out = RTN().run(make_ctx(tmp_path, "quantize"), cfg, model=ModelRef(base))
    return Checkpoint(out["model"].path)


def as_input(ckpt: Checkpoint) -> QuantizedCheckpoint:
    return QuantizedCheckpoint(ckpt.path, base_model=ckpt.base_model, method=ckpt.method)


MIXED = dict(bits=4, group_size=32, layers={"re:.*down_proj": {"bits": 8, "scheme": "sym_f"},
                                            Q0: {"bits": 3, "group_size": 16}},
             ignore=[GATE1])


def test_compressed_tensors_one_group_per_spec_round_trip(tiny_model_dir, tmp_path):
    from stages.export_safetensors import ExportSafetensors

    ckpt = mixed_ir(tiny_model_dir, tmp_path, **MIXED)
    assert len(ckpt.distinct_specs()) == 3
    stage = ExportSafetensors()
    cfg = stage.Config(verify_data=VERIFY, verify_windows=1)
    assert stage.check(cfg, {"model": as_input(ckpt)}) == []
    ctx = make_ctx(tmp_path, "export")
    exp = stage.run(ctx, cfg, model=as_input(ckpt))["export"]
    qcfg = json.loads((exp.path / "config.json").read_text())["quantization_config"]
    groups = qcfg["config_groups"]
    assert len(groups) == 3
    by_bits = {g["weights"]["num_bits"]: g for g in groups.values()}
    assert sorted(by_bits) == [3, 4, 8]
    assert sorted(by_bits[8]["targets"]) == [DOWN0, "model.layers.1.mlp.down_proj"]
    assert by_bits[8]["weights"]["symmetric"] is True and by_bits[3]["weights"]["group_size"] == 16
    assert by_bits[3]["targets"] == [Q0] and GATE1 in qcfg["ignore"]
    assert all(GATE1 not in g["targets"] for g in groups.values())
    # reloaded (by the compressed-tensors library when installed) and compared with qflow's model
    assert exp.meta["reader"] != "skipped"
    assert ctx.metrics["n_exact_layers"] == len(ckpt.layers)
    assert ctx.metrics["roundtrip_max_abs_diff"] == 0 and ctx.metrics["roundtrip_top1_agree"] == 1


def test_gguf_a_type_per_tensor_round_trip(small_vocab_model_dir, tmp_path):  # noqa: F811
    from stages.export_gguf import ExportGGUF

    ckpt = mixed_ir(small_vocab_model_dir, tmp_path, bits=4, group_size=32, scheme="sym_f",
                    layers={"re:.*down_proj": {"bits": 8}, Q0: {"bits": 6}, "model.layers.1.self_attn.o_proj":
                            {"bits": 4, "scheme": "asym_z"}},
                    ignore=[GATE1])
    stage = ExportGGUF()
    cfg = stage.Config(verify_data=VERIFY, verify_windows=1, llama_cpp=False)
    assert stage.check(cfg, {"model": as_input(ckpt)}) == []
    ctx = make_ctx(tmp_path, "export_gguf")
    exp = stage.run(ctx, cfg, model=as_input(ckpt))["export"]
    report = json.loads((tmp_path / "export_gguf" / "scratch" / "export_report.json").read_text())
    tensors = report["tensors"]
    assert tensors["blk.0.ffn_down.weight"]["type"] == "Q8_0" and tensors["blk.0.attn_q.weight"]["type"] == "Q8_0"
    assert tensors["blk.0.attn_k.weight"]["type"] == "Q4_0"
    assert tensors["blk.1.attn_output.weight"]["type"] in ("Q4_1", "Q5_0")   # asymmetric 4-bit, exact
    assert tensors["blk.1.ffn_gate.weight"]["type"] in ("F32", "F16")         # ignored: float
    assert all(t["status"] in ("exact", "float") for t in tensors.values())
    assert len({t["type"] for t in tensors.values()}) >= 4 and exp.meta["types"]
    assert ctx.metrics["roundtrip_max_abs_diff"] == 0 and ctx.metrics["roundtrip_logits_max_abs_diff"] == 0


def test_onnx_matmulnbits_bits_per_node(tiny_model_dir, tmp_path):
    import onnx

    from stages.export_onnx import ExportOnnx

    ckpt = mixed_ir(tiny_model_dir, tmp_path, bits=4, group_size=32,
                    layers={"re:.*down_proj": {"bits": 8}, Q0: {"bits": 2}}, ignore=[GATE1])
    stage = ExportOnnx()
    cfg = stage.Config(data=VERIFY, n_windows=1, kv_tokens=2, benchmark=False)
    assert stage.check(cfg, {"model": as_input(ckpt)}) == []
    ctx = make_ctx(tmp_path, "export_onnx")
    exp = stage.run(ctx, cfg, model=as_input(ckpt))["export"]
    graph = onnx.load(str(exp.path / "model_acc0.onnx"), load_external_data=False).graph
    bits = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits[node.name] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["bits"]
    assert set(bits.values()) == {2, 4, 8}
    assert ctx.metrics["roundtrip_kl"] < 1e-3 and ctx.metrics["roundtrip_top1_agree"] > 0.99


def test_refusals_name_layers_and_nearest_format(tiny_model_dir, tmp_path):
    from stages.export_onnx import ExportOnnx
    from stages.export_safetensors import ExportSafetensors

    ckpt = mixed_ir(tiny_model_dir, tmp_path, bits=4, group_size=32,
                    layers={DOWN0: {"bits": 3}, Q0: {"bits": 8}})
    meta = {"model": as_input(ckpt)}
    (msg,) = ExportOnnx().check(ExportOnnx.Config(), meta)
    assert "1 layer(s)" in msg and DOWN0 in msg and "3-bit" in msg and "compressed-tensors" in msg
    for layout, needle in (("gptq", "one bits/group_size"), ("awq-gemm", "4-bit grouped layers only")):
        problems = ExportSafetensors().check(ExportSafetensors.Config(layout=layout), meta)
        assert problems and needle in problems[0] and "layout: compressed-tensors" in problems[0]
        assert DOWN0 in problems[0]
    assert ExportSafetensors().check(ExportSafetensors.Config(), meta) == []
    # run() refuses the same way before writing anything
    from qflow.errors import StageError

    ctx = make_ctx(tmp_path, "export_gptq")
    with pytest.raises(StageError, match="one bits/group_size"):
        ExportSafetensors().run(ctx, ExportSafetensors.Config(layout="gptq", verify_windows=0), model=as_input(ckpt))
    assert not (tmp_path / "export_gptq" / "out").exists() or not any((tmp_path / "export_gptq" / "out").rglob("*"))
    nf4 = mixed_ir(tiny_model_dir, tmp_path / "nf4", bits=4, group_size=32, layers={DOWN0: {"format": "nf4"}})
    (msg,) = ExportOnnx().check(ExportOnnx.Config(), {"model": as_input(nf4)})
    assert "nf4" in msg and "export.gguf" in msg


def test_cli_onnx_export_of_a_3bit_layer_refused_before_writing(tmp_path, runs_dir, tiny_model_dir):
    recipe = write_recipe(tmp_path, f"""
name: mixed-onnx
model: {{source: "{tiny_model_dir}"}}
stages:
  quantize:
    uses: quantize.rtn
    with: {{bits: 4, group_size: 32, layers: {{"re:.*layers\\\\.1\\\\.mlp\\\\.down_proj": {{bits: 3}}}}}}
  export:
    uses: export.onnx
    needs: [quantize]
    with: {{benchmark: false}}
""")
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert summary["stages"]["quantize"]["status"] == "ran"
    err = summary["stages"]["export"]["error"]
    assert "model.layers.1.mlp.down_proj" in err and "compressed-tensors" in err
    assert not list(runs_dir.rglob("model.onnx*"))   # the stage never started: no partial export anywhere
