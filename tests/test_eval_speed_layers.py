"""evaluate.lm's speed pass (adaptive repeats, reference-path labels) and per-layer pass (recorded fold
factors, lock-step cost)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from qflow.artifacts import ModelRef
from qflow.quant.sqnr import sqnr_db
from qflow.evaluation.speed import MIN_CI_SAMPLES, RepeatPolicy, measure_speed, median_ci
from qflow.quant import dispatch
from qflow.models.adapters import get_adapter
from qflow.models.quantized import apply_checkpoint
from qflow.quant.ir import Checkpoint, CheckpointWriter
from qflow.quant.spec import QuantSpec
from qflow.registry import get

from .test_blockwise import calib_ids, make_ctx, tiny_llama
from .test_evaluate import EVAL, run_stage

# ---- speed: the median's CI and the stopping rule -----------------------------------------------


def binomial_coverage(n: int, j: int) -> float:
    """P(x_(j) <= median <= x_(n+1-j)) for n continuous samples: 1 - 2·P(Bin(n, 1/2) <= j-1)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0 ** n


@pytest.mark.parametrize("n", [5, 6, 7, 10, 20, 51])
def test_median_ci_is_the_tightest_95_percent_order_statistic_interval(n):
    values = list(np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0)))   # sorted: 1..n
    low, high = median_ci(values)
    if n < MIN_CI_SAMPLES:
        assert math.isnan(low) and math.isnan(high)
        return
    j = int(low)                                     # value k sits at rank k
    assert high == n + 1 - j
    assert binomial_coverage(n, j) >= 0.95 > binomial_coverage(n, j + 1)
    assert (n, j) != (20, 6) or (low, high) == (6.0, 15.0)


def stepping_clock(steps):
    """A clock that advances by the next value of ``steps`` on every reading (deterministic timings)."""
    now = [0.0]
    it = iter(steps)

    def clock():
        now[0] += next(it)
        return now[0]
    return clock


@pytest.fixture(scope="module")
def fp_and_refpath(tmp_path_factory):
    """A tiny float Llama and its RTN W4 twin running qflow's reference path (QLinear, no cached weight)."""
    fp = tiny_llama(layers=2, seed=3, vocab=97)
    spec = QuantSpec(bits=4, group_size=32)
    writer = CheckpointWriter(tmp_path_factory.mktemp("speed") / "ckpt", base_model="tiny", method="rtn")
    for name, mod in fp.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.detach()
            scale, zero = dispatch.compute_params(w, spec)
            writer.add_quantized(name, spec, dispatch.quantize(w, scale, zero, spec), scale, zero)
    ckpt = writer.close()
    q = apply_checkpoint(tiny_llama(layers=2, seed=3, vocab=97), ckpt, mode="qlinear", cache_weight=False)
    return fp, q, calib_ids(1, 24, seed=4)


def test_stable_timings_stop_at_the_first_round_with_a_tight_ci(fp_and_refpath):
    fp, q, prompt = fp_and_refpath
    metrics, info = measure_speed(fp, q, prompt, decode_tokens=3, warmup=1,
                                  policy=RepeatPolicy(budget_seconds=1e9), clock=stepping_clock(itertools.repeat(0.5)))
    assert info["stop"] == "converged" and info["rounds"] == MIN_CI_SAMPLES == metrics["speed_samples"]
    assert metrics["speed_noisy"] == 0 and metrics["speed_rel_ci_max"] == 0 and not info["noisy_series"]
    assert metrics["prefill_tps_refpath"] == pytest.approx(24 / 0.5) and metrics["decode_tps_fp"] == pytest.approx(6)
    # the reference path is labelled as such; no quantized/float "speed ratio" anywhere
    assert set(metrics) == {"prefill_tps_fp", "decode_tps_fp", "prefill_tps_refpath", "decode_tps_refpath",
                            "speed_samples", "speed_noisy", "speed_rel_ci_max"}
    assert "reference path" in info["measures"] and not any("ratio" in k for k in metrics)
    st = info["series"]["decode_refpath"]
    assert st["samples"] == 6 and "p90_seconds" not in st          # p90 of 6 samples would be the maximum
    assert "every median's 95% CI within 5%" in info["label"]


def test_spread_runs_until_the_budget_or_max_repeats_and_is_labelled_noisy(fp_and_refpath):
    fp, q, prompt = fp_and_refpath
    rng = np.random.default_rng(0)
    jitter = (float(v) for v in rng.lognormal(0.0, 0.8, size=100_000))   # spread far beyond 5%
    metrics, info = measure_speed(fp, q, prompt, decode_tokens=2, warmup=0,
                                  policy=RepeatPolicy(budget_seconds=40.0), clock=stepping_clock(jitter))
    assert info["stop"] == "budget" and metrics["speed_noisy"] == 1
    assert info["rounds"] == metrics["speed_samples"] < 10
    assert all(st["samples"] == info["rounds"] for st in info["series"].values())
    assert info["label"].startswith("NOISY: ") and set(info["noisy_series"]) == set(info["series"])

    jitter = (float(v) for v in rng.lognormal(0.0, 0.8, size=100_000))
    metrics, info = measure_speed(fp, q, prompt, decode_tokens=2, warmup=0,
                                  policy=RepeatPolicy(budget_seconds=1e9, max_repeats=12), clock=stepping_clock(jitter))
    assert info["stop"] == "max_repeats" and info["rounds"] == 12 and metrics["speed_noisy"] == 1
    st = info["series"]["prefill_fp"]
    assert st["p90_seconds"] == sorted(info["seconds"]["prefill_fp"])[10]       # nearest rank 11 of 12
    assert st["ci_low_seconds"] <= st["median_seconds"] <= st["ci_high_seconds"]
    assert st["rel_ci_half_width"] > 0.05 and st["iqr_rel"] > 0


def test_fixed_repeats_and_float_only(fp_and_refpath):
    fp, _, prompt = fp_and_refpath
    metrics, info = measure_speed(fp, None, prompt, decode_tokens=0, warmup=0, policy=RepeatPolicy(fixed=3))
    assert info["stop"] == "fixed" and info["rounds"] == 3 and set(info["series"]) == {"prefill_fp"}
    assert metrics["speed_noisy"] == 1 and "fewer than 6 samples" in info["label"]
    assert set(metrics) == {"prefill_tps_fp", "speed_samples", "speed_noisy"}


def test_speed_config_rejects_min_above_max():
    cls = get("evaluate.lm")
    with pytest.raises(ValueError, match="speed_min_repeats .8. exceeds speed_max_repeats .4."):
        cls.Config.model_validate({**EVAL, "speed_min_repeats": 8, "speed_max_repeats": 4})


def test_stage_labels_the_reference_path_and_noisy_speed(tmp_path, tiny_model_dir):
    _, ckpt = run_stage(tmp_path, "quantize.rtn", {"bits": 4, "group_size": 32}, model=ModelRef(tiny_model_dir))
    cfg = {**EVAL, "speed_repeats": 2, "layer_report": False}
    ctx, out = run_stage(tmp_path, "evaluate.lm", cfg, stage_id="evaluate", model=ckpt["model"])
    m = ctx.metrics
    assert {"prefill_tps_refpath", "decode_tps_refpath", "prefill_tps_fp", "decode_tps_fp"} <= set(m)
    assert not any(k.endswith("_ratio") and "tps" in k for k in m) and m["speed_samples"] == 2
    assert m["speed_noisy"] == 1
    doc = json.loads((out["report"].path / "metrics.json").read_text())
    assert doc["speed"]["label"].startswith("NOISY") and doc["speed"]["series"]["decode_refpath"]["samples"] == 2
    assert "reference path" in doc["speed"]["path"]
    html = (out["report"].path / "report.html").read_text()
    assert "qflow reference path" in html and "NOISY" in html and "speed ratio" not in html
    # what the protocol hash means, in words: evaluation windows and calibration set
    summary = f"protocol {doc['protocol_hash']}: 3 x 64-token windows of zoo:lee-news (evaluation); " \
              "calibration: none (calibration-free method)"
    assert doc["protocol_summary"] == summary and ctx.info["tags"]["qflow.protocol"] == summary and summary in html


# ---- per-layer: recorded fold factors -------------------------------------------------------------

def _awq_like_mlp_checkpoint(tmp_path, fp, bits: int, record: bool):
    """Block 0's MLP as AWQ folds it: norm / s1, gate/up columns * s1, up rows / s2, down columns * s2."""
    g = torch.Generator().manual_seed(7)
    hidden, inter = fp.config.hidden_size, fp.config.intermediate_size
    s1 = torch.rand(hidden, generator=g) * 3 + 0.25
    s2 = torch.rand(inter, generator=g) * 3 + 0.25
    spec = QuantSpec(bits=bits, group_size=32)
    p = "model.layers.0"
    writer = CheckpointWriter(tmp_path / f"ckpt-{record}", base_model="tiny", method="awq-like")
    writer.add_float(f"{p}.post_attention_layernorm.weight",
                     fp.get_parameter(f"{p}.post_attention_layernorm.weight").detach() / s1)
    w = {n: fp.get_submodule(f"{p}.mlp.{n}").weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}
    folded = {"gate_proj": w["gate_proj"] * s1, "up_proj": (w["up_proj"] / s2[:, None]) * s1,
              "down_proj": w["down_proj"] * s2}
    row = {"gate_proj": torch.ones(inter), "up_proj": 1 / s2, "down_proj": torch.ones(hidden)}
    col = {"gate_proj": s1, "up_proj": s1, "down_proj": s2}
    expected = {}
    for n, wf in folded.items():
        scale, zero = dispatch.compute_params(wf, spec)
        codes = dispatch.quantize(wf, scale, zero, spec)
        writer.add_quantized(f"{p}.mlp.{n}", spec, codes, scale, zero)
        w_hat = dispatch.dequantize(codes, scale, zero, spec)
        back = w_hat / row[n][:, None] / col[n][None, :]
        expected[f"{p}.mlp.{n}"] = sqnr_db(w[n], back)
    if record:
        writer.add_fold(f"{p}.post_attention_layernorm", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], s1)
        writer.add_fold(f"{p}.mlp.up_proj", [f"{p}.mlp.down_proj"], s2)
    return writer.close(), expected


def test_recorded_fold_factors_give_the_exact_weight_sqnr(tmp_path):
    from qflow.evaluation.layers import layer_report

    fp = tiny_llama(layers=2, seed=11)
    ids = calib_ids(2, 24, seed=3)
    rows = {}
    for record in (True, False):
        ckpt, expected = _awq_like_mlp_checkpoint(tmp_path, fp, bits=3, record=record)
        q = apply_checkpoint(tiny_llama(layers=2, seed=11), Checkpoint(ckpt.path), mode="dequant")
        rows[record] = {r["layer"]: r for r in layer_report(fp, q, Checkpoint(ckpt.path), ids)}
    for name, want in expected.items():
        exact, fitted = rows[True][name], rows[False][name]
        assert exact["fold"] == "recorded" and fitted["fold"] == "fitted" and exact["fold_corrected"]
        assert exact["weight_sqnr_db"] == pytest.approx(want, abs=1e-4), name
        # the least-squares fit trades rounding error against its scales: off by a fraction of a dB or more
        assert abs(fitted["weight_sqnr_db"] - want) > 0.05, (name, fitted["weight_sqnr_db"], want)
        assert math.isfinite(exact["isolated_sqnr_db"]) and math.isfinite(exact["accumulated_sqnr_db"])
    gate = rows[True]["model.layers.0.mlp.gate_proj"]   # first quantized layer: both modes see the same input
    assert gate["accumulated_sqnr_db"] == pytest.approx(gate["isolated_sqnr_db"], rel=1e-6)


def _count_calls(model, names):
    counts = dict.fromkeys(names, 0)
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: counts.__setitem__(n, counts[n] + 1)) for n in names]
    return counts, handles


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_folding_methods_record_their_factors_and_the_report_uses_them(tmp_path, method):
    """A real AWQ / SmoothQuant checkpoint records every fold: the folded norm equals γ / s exactly, the
    per-layer report maps back with those factors, and it costs one forward of each model per window."""
    from qflow.evaluation.layers import layer_report
    from qflow.quant.algos.awq import AWQOptions, quantize_model_awq
    from qflow.quant.algos.smoothquant_model import SmoothQuantOptions, collect_act_max, quantize_model_smoothquant

    fp = tiny_llama(layers=2, seed=5)
    ids = calib_ids(8, 48, seed=2)
    work = tiny_llama(layers=2, seed=5)
    adapter = get_adapter(work)
    if method == "awq":
        res = quantize_model_awq(make_ctx(tmp_path), work, adapter, ids, AWQOptions(bits=3, group_size=32, n_grid=5),
                                 base_model="tiny", batch_size=8)
        sites = ("input_layernorm", "post_attention_layernorm", "mlp.up_proj")    # GQA: no v -> o site
    else:
        res = quantize_model_smoothquant(make_ctx(tmp_path), work, adapter, collect_act_max(work, adapter, ids),
                                         SmoothQuantOptions(alpha=0.5), base_model="tiny")
        sites = ("input_layernorm", "post_attention_layernorm")
    ckpt = Checkpoint(res.checkpoint_dir)
    assert sorted(ckpt.folds) == sorted(f"model.layers.{i}.{s}" for i in range(2) for s in sites)
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            prev = f"model.layers.{i}.{norm}"
            gamma = fp.get_parameter(f"{prev}.weight").detach()
            torch.testing.assert_close(ckpt.float_tensor(f"{prev}.weight"), gamma / ckpt.fold_scale(prev),
                                       rtol=0, atol=0)
        assert ckpt.folds[f"model.layers.{i}.input_layernorm"]["linears"] == [
            f"model.layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    if method == "awq":
        r, c = ckpt.fold_factors("model.layers.0.mlp.up_proj")
        torch.testing.assert_close(r, 1 / ckpt.fold_scale("model.layers.0.mlp.up_proj"))
        torch.testing.assert_close(c, ckpt.fold_scale("model.layers.0.post_attention_layernorm"))
        assert ckpt.fold_factors("model.layers.0.self_attn.o_proj") == (None, None)

    q = apply_checkpoint(tiny_llama(layers=2, seed=5), ckpt, mode="qlinear" if method == "smoothquant" else "dequant")
    watched = ["model.layers.0", "model.layers.1", "model.norm", "lm_head", "model.embed_tokens"]
    fp_calls, h1 = _count_calls(fp, watched)
    q_calls, h2 = _count_calls(q, watched)
    windows = calib_ids(3, 32, seed=9)
    try:
        rows = layer_report(fp, q, ckpt, windows)
    finally:
        for h in h1 + h2:
            h.remove()
    n = windows.shape[0]
    for calls in (fp_calls, q_calls):    # one pass of the decoder stack per model and window; no head
        assert calls == {"model.layers.0": n, "model.layers.1": n, "model.norm": 0, "lm_head": 0,
                         "model.embed_tokens": n}, calls
    assert len(rows) == 14 and all(r["fold"] == "recorded" and r["n_tokens"] == 3 * 32 for r in rows)
    floor = 20 if method == "awq" else 30     # W3 g32 / W8A8 on a random tiny Llama
    assert all(r["weight_sqnr_db"] > floor - 10 and r["isolated_sqnr_db"] > floor - 15 for r in rows), rows
