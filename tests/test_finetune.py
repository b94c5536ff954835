"""Fine-tune stages on a tiny random Llama: start = the IR, codes in range, MSE/KL reduced, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qflow.artifacts import CalibSet, ModelRef, QuantizedCheckpoint
from qflow.engine.context import StageContext
from qflow.quant.ir import Checkpoint

SLOW = pytest.mark.slow   # seconds of CPU each; `make test-slow`


def make_ctx(root: Path, stage_id: str = "finetune", uses: str = "finetune.blockwise", *,
             scratch: Path | None = None, seed: int = 0) -> StageContext:
    return StageContext(stage_id=stage_id, uses=uses, key="k", out_dir=root / "out", scratch=scratch or root / "scratch",
                        run_dir=root / "run", memo_dir=root / "memo", quiet=True, seed=seed)


def calib_set(root: Path, vocab: int, *, n: int = 8, seq_len: int = 32, seed: int = 3) -> CalibSet:
    root.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    torch.save(ids, root / "ids.pt")
    (root / "info.json").write_text(json.dumps({"source": "random", "seq_len": seq_len, "n_samples": n,
                                                "fingerprint": "test"}))
    return CalibSet(root)


def quantize(root: Path, model_dir: Path, uses: str, calib: CalibSet | None = None, **cfg) -> QuantizedCheckpoint:
    from qflow import registry

    stage_cls = registry.get(uses)
    ctx = make_ctx(root, "quantize", uses)
    kwargs = {"model": ModelRef(model_dir)}
    if "calib" in stage_cls.inputs:
        kwargs["calib"] = calib
    out = stage_cls().run(ctx, stage_cls.Config(**cfg), **kwargs)["model"]
    return QuantizedCheckpoint(out.path, **out.meta)


def vocab_of(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def check_real_ir(out_dir: Path, start_dir: Path) -> None:
    """Codes in [0, 2^b-1], <= 2^b distinct values per group, same layers/specs/g_idx/folds as the start."""
    out, start = Checkpoint(out_dir), Checkpoint(start_dir)
    assert set(out.layers) == set(start.layers)
    assert out.folds.keys() == start.folds.keys() and out.floats.keys() == start.floats.keys()
    for name, rec in out.layers.items():
        assert rec.spec == start.layers[name].spec and rec.g_idx == start.layers[name].g_idx
        codes, scale, zero = out.params(name)
        assert int(codes.max()) <= rec.spec.qmax
        w = out.dequantized(name)
        g = rec.spec.effective_group(rec.in_features)
        cols = out.layer_tensors(name).get("g_idx")
        order = torch.argsort(cols.long(), stable=True) if cols is not None else torch.arange(rec.in_features)
        groups = w[:, order].reshape(rec.out_features, -1, g)
        distinct = max(len(torch.unique(groups[r, k])) for r in range(0, rec.out_features, 7)
                       for k in range(groups.shape[1]))
        assert distinct <= 2 ** rec.spec.bits


@torch.no_grad()
def kl_to_float(model_dir: Path, ckpt_dir: Path, ids: torch.Tensor) -> float:
    from qflow.models.loading import load_model
    from qflow.models.quantized import load_quantized_model

    ref, _ = load_model(model_dir, dtype="float32")
    q, _ = load_quantized_model(Checkpoint(ckpt_dir), mode="dequant", base_dir=str(model_dir))
    p = torch.log_softmax(ref(input_ids=ids).logits.float(), -1)
    r = torch.log_softmax(q(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - r)).sum(-1).mean())


# ---------------------------------------------------------------------------
# the fake-quant layer starts exactly at the IR, for every kind of start
# ---------------------------------------------------------------------------

STARTS = {
    "rtn-asym_z": ("quantize.rtn", {"bits": 3, "group_size": 32}),
    "rtn-nf4-dq": ("quantize.rtn", {"format": "nf4", "group_size": 32, "double_quant": True}),
    "rtn-mixed": ("quantize.rtn", {"bits": 3, "group_size": 32, "layers": {"re:.*down_proj": {"bits": 4, "group_size": -1}},
                                   "ignore": ["model.layers.0.mlp.gate_proj"]}),
    "hqq": ("quantize.hqq", {"bits": 3, "group_size": 32}),
    "awq-folds": ("quantize.awq", {"bits": 3, "group_size": 32}),
    "gptq-g_idx": ("quantize.gptq", {"bits": 3, "group_size": 32, "static_groups": False}),
}


@pytest.mark.parametrize("start", [pytest.param(k, marks=SLOW) if k in ("rtn-nf4-dq", "rtn-mixed", "hqq", "awq-folds") else k
                                   for k in STARTS])
def test_fake_quant_layer_starts_at_the_ir(tmp_path, tiny_model_dir, start):
    from qflow.finetune.fakequant import FakeQuantLinear, layer_start
    from qflow.models.loading import load_model

    uses, cfg = STARTS[start]
    calib = calib_set(tmp_path / "calib", vocab_of(tiny_model_dir))
    ckpt = Checkpoint(quantize(tmp_path / "q", tiny_model_dir, uses, calib, **cfg).path)
    if start == "awq-folds":
        assert ckpt.folds
    if start == "gptq-g_idx":
        assert any(r.g_idx for r in ckpt.layers.values())
    net, _ = load_model(tiny_model_dir, dtype="float32")
    for name in ckpt.layers:
        layer = FakeQuantLinear(layer_start(ckpt, name, net.get_submodule(name).weight), None, scale=True)
        codes, scale, zero = layer.export()
        start_codes, start_scale, _ = ckpt.params(name)
        assert torch.equal(codes, start_codes), name
        torch.testing.assert_close(layer.weight_hat(), ckpt.dequantized(name), rtol=0, atol=1e-6)
        # a trained layer still exports a real quantized layer: codes in range, each V within its bounds
        with torch.no_grad():
            if layer.v is not None:
                layer.v.uniform_(-3, 3)
            layer.f.uniform_(0.1, 2.0)
        layer.clamp_()
        layer.requires_grad_(False)
        codes, scale, zero = layer.export()
        assert int(codes.max()) <= layer.spec.qmax
        assert layer.v is None or float(layer.v.detach().abs().max()) <= 0.5
        assert float(layer.f.min()) >= 0.5 and float(layer.f.max()) <= 1.0


# ---------------------------------------------------------------------------
# finetune.blockwise
# ---------------------------------------------------------------------------

def run_blockwise(root: Path, start: QuantizedCheckpoint, calib: CalibSet, *, scratch: Path | None = None, **cfg):
    from stages.finetune_blockwise import BlockwiseConfig, FinetuneBlockwise

    ctx = make_ctx(root, scratch=scratch)
    out = FinetuneBlockwise().run(ctx, BlockwiseConfig(**{"steps": 15, "batch_size": 4, **cfg}), model=start, calib=calib)
    return out["model"], ctx


def test_blockwise_reduces_block_mse_and_writes_a_real_ir(tmp_path, tiny_model_dir):
    calib = calib_set(tmp_path / "calib", vocab_of(tiny_model_dir), n=10)
    start = quantize(tmp_path / "q", tiny_model_dir, "quantize.rtn", bits=3, group_size=32)
    out, ctx = run_blockwise(tmp_path / "ft", start, calib, heldout_windows=2)
    assert ctx.metrics["block_mse_ratio"] < 0.8
    assert [step for step, _ in ctx.curves["block_mse_end"]] == [0, 1]             # tracked with steps
    assert ctx.curves["block_heldout_loss_curve"][0][0] == 0 and ctx.curves["block_heldout_loss_curve"][-1][0] == 30
    report = json.loads((ctx.run_dir / "artifacts" / "finetune" / "finetune.json").read_text())
    assert report["train_windows"] == 8 and report["heldout_windows"] == 2 and "none" in report["heldout_overlap"]
    for row in report["records"]:
        assert row["mse_final_hard"] < row["mse_start"]
        assert row["heldout_best"] < row["heldout_start"]   # better on windows it never trained on
        assert row["heldout_final_hard"] < row["heldout_start"]
    check_real_ir(out.path, start.path)
    assert Checkpoint(out.path).method == "rtn+blockwise"


def test_blockwise_without_heldout_keeps_the_better_of_start_and_end_on_the_training_windows(tmp_path, tiny_model_dir):
    """No held-out window: the kept parameters are those of the lowest MSE over every training window, so
    a learning rate far too large (one full code step per update) cannot leave a block worse than RTN."""
    calib = calib_set(tmp_path / "calib", vocab_of(tiny_model_dir), n=6)
    start = quantize(tmp_path / "q", tiny_model_dir, "quantize.rtn", bits=3, group_size=32)
    out, ctx = run_blockwise(tmp_path / "ft", start, calib, heldout_windows=0, steps=2, lr=1.0, scale=False)
    report = json.loads((ctx.run_dir / "artifacts" / "finetune" / "finetune.json").read_text())
    assert report["heldout_windows"] == 0
    for row in report["records"]:
        assert row["selected_on"] == "train" and "heldout_start" not in row
        assert row["train_select_start"] == pytest.approx(row["mse_start"], rel=1e-6)
        assert row["mse_final_hard"] <= row["mse_start"] * (1 + 1e-5)
        assert row["train_select_best"] <= row["train_select_start"]
    check_real_ir(out.path, start.path)


@SLOW
def test_blockwise_from_awq_keeps_folds_and_improves(tmp_path, tiny_model_dir):
    calib = calib_set(tmp_path / "calib", vocab_of(tiny_model_dir), n=10)
    start = quantize(tmp_path / "q", tiny_model_dir, "quantize.awq", calib, bits=3, group_size=32)
    out, ctx = run_blockwise(tmp_path / "ft", start, calib, steps=10, heldout_windows=0)
    assert ctx.metrics["block_mse_ratio"] < 0.9
    check_real_ir(out.path, start.path)


def test_blockwise_resumes_after_a_crash_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    from qflow.quant.algos.resume import BlockState

    calib = calib_set(tmp_path / "calib", vocab_of(tiny_model_dir))
    start = quantize(tmp_path / "q", tiny_model_dir, "quantize.rtn", bits=3, group_size=32)
    whole, _ = run_blockwise(tmp_path / "a", start, calib, steps=3)

    original = BlockState.save

    def crash(self, next_block, writer, **extra):
        original(self, next_block, writer, **extra)
        if next_block == 1:
            raise RuntimeError("simulated crash after block 0")

    monkeypatch.setattr(BlockState, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_blockwise(tmp_path / "b", start, calib, steps=3, scratch=tmp_path / "scratch-b")
    monkeypatch.setattr(BlockState, "save", original)
    resumed, ctx = run_blockwise(tmp_path / "b2", start, calib, steps=3, scratch=tmp_path / "scratch-b")
    a, b = Checkpoint(whole.path), Checkpoint(resumed.path)
    for name in a.layers:
        assert torch.equal(a.params(name)[0], b.params(name)[0]), name
        assert torch.equal(a.params(name)[1], b.params(name)[1]), name


def test_heldout_windows_must_leave_training_windows(tmp_path, tiny_model_dir):
    from qflow.errors import StageError

    calib = calib_set(tmp_path / "calib", vocab_of(tiny_model_dir), n=3)
    start = quantize(tmp_path / "q", tiny_model_dir, "quantize.rtn", bits=3, group_size=32)
    with pytest.raises(StageError, match="heldout_windows"):
        run_blockwise(tmp_path / "ft", start, calib, heldout_windows=3)


# ---------------------------------------------------------------------------
# end-to-end methods: distill, qat, lora
# ---------------------------------------------------------------------------

def run_stage(root: Path, uses: str, start: QuantizedCheckpoint, calib: CalibSet, *, scratch: Path | None = None, **cfg):
    from qflow import registry

    stage_cls = registry.get(uses)
    ctx = make_ctx(root, uses=uses, scratch=scratch)
    out = stage_cls().run(ctx, stage_cls.Config(**cfg), model=start, calib=calib)["model"]
    return out, ctx


@pytest.fixture()
def rtn_start(tmp_path, tiny_model_dir):
    calib = calib_set(tmp_path / "calib", vocab_of(tiny_model_dir), n=6)
    return quantize(tmp_path / "q", tiny_model_dir, "quantize.rtn", bits=3, group_size=32), calib


@SLOW
def test_distill_lowers_heldout_kl_and_writes_a_real_ir(tmp_path, rtn_start):
    start, calib = rtn_start
    out, ctx = run_stage(tmp_path / "d", "finetune.distill", start, calib, steps=12, lr=2e-2, eval_every=4)
    assert ctx.metrics["heldout_kl_best"] < ctx.metrics["heldout_kl_start"]
    check_real_ir(out.path, start.path)
    curve = json.loads((ctx.run_dir / "artifacts" / "finetune" / "finetune.json").read_text())["records"]
    assert [r["step"] for r in curve if "heldout_loss" in r] == [0, 4, 8, 12]


def test_distill_in_bfloat16_trains_and_writes_a_real_ir(tmp_path, rtn_start):
    """``precision: bfloat16``: the forward/backward under autocast (the matmuls really run in bf16), the
    held-out KL still falls, the IR is a real one; another dtype is refused by the config."""
    from qflow import registry
    from qflow.finetune.e2e import compute_precision

    start, calib = rtn_start
    out, ctx = run_stage(tmp_path / "d", "finetune.distill", start, calib, steps=8, lr=2e-2, eval_every=4,
                         precision="bfloat16")
    assert ctx.metrics["heldout_kl_best"] < ctx.metrics["heldout_kl_start"]
    check_real_ir(out.path, start.path)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with compute_precision("bfloat16"):
        assert (a @ b).dtype == torch.bfloat16
    with compute_precision("float32"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        registry.get("finetune.distill").Config(precision="float16")


def grid_start(rows: int, groups: int, *, out: int = 8, in_features: int = 64, seed: int = 0):
    """A LayerStart of an asymmetric 3-bit grid: ``rows`` scale rows (out or 1), ``groups`` column groups."""
    from qflow.finetune.fakequant import LayerStart
    from qflow.quant.spec import QuantSpec

    w = torch.randn(out, in_features, generator=torch.Generator().manual_seed(seed))
    k = in_features // groups
    wg = w.view(out, groups, k) if rows == out else w.view(out, groups, k).transpose(0, 1).reshape(1, groups, -1)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / 7
    zero = torch.round(-lo / scale)
    col_group = torch.arange(in_features) // k
    codes = torch.clamp(torch.round(w / scale[:, col_group] + zero[:, col_group]), 0, 7).to(torch.uint8)
    return LayerStart("x", QuantSpec(bits=3, group_size=k, scale_dtype="float32"), w, codes, scale, zero, col_group, None)


@pytest.mark.parametrize("rows,groups", [(8, 4), (8, 1), (1, 4), (1, 1)])
def test_grouped_fake_quant_matches_the_autograd_reference(rows, groups):
    from qflow.finetune.fakequant import FakeQuantLinear, ReferenceFakeQuantLinear

    start = grid_start(rows, groups)
    fast, ref = (cls(start, None, rounding=True, scale=True) for cls in (FakeQuantLinear, ReferenceFakeQuantLinear))
    assert fast.group_cols == 64 // groups
    g = torch.Generator().manual_seed(1)
    v, f = torch.rand(fast.v.shape, generator=g) - 0.5, 0.5 + 0.5 * torch.rand(fast.f.shape, generator=g)
    x, r = torch.randn(5, 64, generator=g), torch.randn(5, 8, generator=g)
    for layer in (fast, ref):
        with torch.no_grad():
            layer.v.copy_(v)
            layer.f.copy_(f)
        (layer(x) * r).sum().backward()
    assert torch.equal(fast.weight_hat().detach(), ref._codes(ref.current_scale(), ste=False).sub(
        ref._per_column(ref.zero)).mul(ref._per_column(ref.current_scale())).detach())
    torch.testing.assert_close(fast(x), ref(x))
    torch.testing.assert_close(fast.v.grad, ref.v.grad)
    torch.testing.assert_close(fast.f.grad, ref.f.grad, rtol=1e-4, atol=1e-5)
    assert bool((fast.v.grad == 0).any()) and bool((fast.v.grad != 0).any())   # clamped codes get no gradient
    for a, b in zip(fast.export(), ref.export()):
        assert torch.equal(a, b)


def test_fake_quant_falls_back_to_gathers_for_permuted_groups():
    from qflow.finetune.fakequant import FakeQuantLinear, contiguous_group

    start = grid_start(8, 4)
    assert contiguous_group(start.col_group, 4) == 16
    assert contiguous_group(start.col_group.flip(0), 4) == 0      # act-order g_idx: columns not in runs
    assert contiguous_group(start.col_group, 3) == 0
    frozen = FakeQuantLinear(start, None, rounding=False, scale=False)
    assert frozen.weight_hat() is frozen.weight_hat()           # nothing to train: Ŵ made once


def test_lsq_initialisation_and_gradient_scale():
    from qflow.finetune.fakequant import LayerStart
    from qflow.finetune.lsq import LSQLinear
    from qflow.quant.spec import QuantSpec

    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=32)
    start = LayerStart("x", spec, w, torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2), torch.full((4, 2), 4.0),
                       torch.arange(64) // 32, None)
    layer = LSQLinear(start, None)
    qp = 3  # 2^(3-1) - 1
    torch.testing.assert_close(layer.step[1, 0], 2 * w[1, :32].abs().mean() / qp ** 0.5)
    (layer.weight_hat().sum()).backward()
    grad_scaled = layer.step.grad.clone()
    layer.step.grad = None
    layer.grad_scale.fill_(1.0)
    (layer.weight_hat().sum()).backward()
    torch.testing.assert_close(grad_scaled, layer.step.grad / (32 * qp) ** 0.5)
    codes, _, _ = layer.export()
    assert int(codes.max()) <= spec.qmax


@pytest.mark.parametrize("rows,groups", [(8, 4), (1, 4)])
def test_lsq_grouped_view_matches_the_gathered_form(rows, groups):
    from qflow.finetune.lsq import LSQLinear

    start = grid_start(rows, groups)
    grouped, gathered = LSQLinear(start, None, init="start"), LSQLinear(start, None, init="start")
    gathered.group_cols = 0
    assert grouped.group_cols == 64 // groups
    x, r = torch.randn(5, 64), torch.randn(5, 8)
    for layer in (grouped, gathered):
        (layer(x) * r).sum().backward()
    torch.testing.assert_close(grouped.weight_hat(), gathered.weight_hat())
    torch.testing.assert_close(grouped.weight.grad, gathered.weight.grad)
    torch.testing.assert_close(grouped.step.grad, gathered.step.grad, rtol=1e-4, atol=1e-6)


@SLOW
def test_qat_writes_a_real_ir(tmp_path, rtn_start):
    start, calib = rtn_start
    out, ctx = run_stage(tmp_path / "qat", "finetune.qat", start, calib, steps=4, init="start", lr=1e-4)
    assert ctx.metrics["n_layers_frozen"] == 0 and ctx.metrics["train_steps"] == 4
    check_real_ir(out.path, start.path)


@SLOW
def test_lora_merged_or_adapter(tmp_path, rtn_start):
    from safetensors import safe_open

    start, calib = rtn_start
    merged, ctx = run_stage(tmp_path / "m", "finetune.lora", start, calib, steps=4, lr=1e-2, rank=4,
                            targets=r"\.(q_proj|v_proj)$", dropout=0.1, heldout_windows=0)
    check_real_ir(merged.path, start.path)
    assert ctx.metrics["n_adapted_layers"] == 4
    assert 0 < ctx.metrics["merged_codes_changed"] <= 1   # the merge moved codes (measured, not assumed)
    a, s = Checkpoint(merged.path), Checkpoint(start.path)
    changed = [n for n in a.layers if not torch.equal(a.params(n)[0], s.params(n)[0])]
    assert changed and all(n.endswith(("q_proj", "v_proj")) for n in changed)
    tiny, ctx_tiny = run_stage(tmp_path / "t", "finetune.lora", start, calib, steps=1, lr=1e-9, rank=4,
                               targets=r"\.q_proj$", heldout_windows=0)
    assert ctx_tiny.metrics["merged_codes_changed"] == 0   # an update under half a step: said, not hidden
    adapter, _ = run_stage(tmp_path / "a", "finetune.lora", start, calib, steps=2, rank=4, output="adapter")
    b = Checkpoint(adapter.path)
    assert all(torch.equal(b.params(n)[0], s.params(n)[0]) for n in b.layers)
    with safe_open(str(adapter.path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert json.loads((adapter.path / "adapter" / "adapter_config.json").read_text())["r"] == 4


@SLOW
def test_killed_distill_resumes_on_the_same_loss_trajectory(tmp_path, rtn_start, monkeypatch):
    """Bitwise: the checkpoint holds parameters, AdamW moments, the batch generator and the curve, and CPU
    kernels are deterministic for a fixed thread count, so every later step repeats exactly."""
    from qflow.finetune.loop import TrainLoop

    start, calib = rtn_start
    cfg = {"steps": 6, "lr": 2e-2, "eval_every": 2, "checkpoint_every": 2}
    whole, ctx_a = run_stage(tmp_path / "a", "finetune.distill", start, calib, **cfg)
    original = TrainLoop._save

    def save_then_die(self, step, *args):
        original(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt("simulated kill after the step-4 checkpoint")

    monkeypatch.setattr(TrainLoop, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "b", "finetune.distill", start, calib, scratch=tmp_path / "scratch-b", **cfg)
    monkeypatch.setattr(TrainLoop, "_save", original)
    resumed, ctx_b = run_stage(tmp_path / "b2", "finetune.distill", start, calib, scratch=tmp_path / "scratch-b", **cfg)
    curve = lambda ctx: json.loads((ctx.run_dir / "artifacts" / "finetune" / "finetune.json").read_text())["records"]
    assert curve(ctx_a) == curve(ctx_b)
    a, b = Checkpoint(whole.path), Checkpoint(resumed.path)
    for name in a.layers:
        assert torch.equal(a.params(name)[0], b.params(name)[0]) and torch.equal(a.params(name)[1], b.params(name)[1])


# ---------------------------------------------------------------------------
# the CLI: quantize -> fine-tune -> evaluate -> every export format
# ---------------------------------------------------------------------------

@SLOW
def test_recipe_quantize_finetune_evaluate_exports_every_format(tmp_path, tiny_model_dir, runs_dir):
    from .conftest import parse_json_stdout, run_cli, write_recipe

    recipe = write_recipe(tmp_path, f"""
name: tiny-ft
model: {{source: "{tiny_model_dir}"}}
data:
  calib: {{source: "zoo:wiki-pages", seq_len: 64}}
  eval: {{source: "zoo:lee-news", seq_len: 64}}
stages:
  calibrate: {{uses: calibrate, with: {{data: "${{data.calib}}", n_samples: 6, stats: false}}}}
  quantize: {{uses: quantize.rtn, needs: [calibrate], with: {{bits: 4, group_size: 32}}}}
  finetune: {{uses: finetune.blockwise, needs: [quantize, calibrate], with: {{steps: 4, batch_size: 2}}}}
  evaluate:
    uses: evaluate.lm
    needs: [finetune]
    with: {{data: "${{data.eval}}", n_windows: 2, topk: 16, speed: false, layer_report: false}}
  export_st: {{uses: export.safetensors, needs: [finetune]}}
  export_gguf: {{uses: export.gguf, needs: [finetune]}}
  export_onnx: {{uses: export.onnx, needs: [finetune]}}
""")
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir, timeout=1800)   # three exports, each verified
    assert done.returncode == 0, done.stderr[-3000:]
    result = parse_json_stdout(done)
    assert result["status"] == "ok"
    assert all(s["status"] == "ran" for s in result["stages"].values())
    m = result["metrics"]
    assert "finetune/block_mse_ratio" in m   # 4 steps at W4: too short a budget to assert a gain here
    assert m["export_st/roundtrip_kl"] < 1e-6 and m["export_gguf/roundtrip_max_abs_diff"] < 1e-2
    assert "evaluate/kl_mean" in m
