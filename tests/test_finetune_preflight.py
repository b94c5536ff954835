"""Fine-tune stages before they run: peak-memory estimates and the held-out window checks (preflight)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qflow.artifacts import CalibSet, ModelRef
from qflow.registry import Upstream

from .conftest import parse_json_stdout, run_cli, write_recipe

METHODS = ("finetune.blockwise", "finetune.distill", "finetune.qat", "finetune.lora")
LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}


def planned_calib(n: int, seq_len: int) -> dict:
    return {"planned": {"n_samples": n, "data": {"source": "zoo:wiki-pages", "seq_len": seq_len}}}


def model_dir_with(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


def estimate(uses: str, model_dir: Path, calib, **cfg) -> int | None:
    from qflow import registry

    stage_cls = registry.get(uses)
    upstream = [Upstream("model", "model.load", {}, {"model": ModelRef(model_dir)})]
    meta = {"model": {"planned": {"bits": 3}}, "calib": calib}
    return stage_cls().estimate_peak_bytes(stage_cls.Config(**cfg), meta, upstream)


def check(uses: str, calib, **cfg) -> list[str]:
    from qflow import registry

    stage_cls = registry.get(uses)
    return stage_cls().check(stage_cls.Config(**cfg), {"model": {"planned": {}}, "calib": calib})


@pytest.mark.parametrize("uses", METHODS)
def test_every_finetune_stage_estimates_its_peak_once_the_model_is_known(tmp_path, uses):
    big = model_dir_with(tmp_path / "8b", LLAMA_8B)
    assert estimate(uses, tmp_path / "none", planned_calib(32, 512)) is None   # no config.json: unknown
    assert estimate(uses, big, {"planned": {}}) is None                          # calibration shape unknown
    small = estimate(uses, big, planned_calib(32, 512), batch_size=1)
    larger = estimate(uses, big, planned_calib(32, 512), batch_size=4)
    assert small and larger > small   # a training step's saved activations grow with the batch
    if uses != "finetune.blockwise":   # end-to-end: more calibration windows = a larger teacher cache
        assert estimate(uses, big, planned_calib(128, 512), batch_size=1) > small


def test_estimates_order_by_what_each_method_holds(tmp_path):
    from qflow.models.memory import model_params

    big = model_dir_with(tmp_path / "8b", LLAMA_8B)
    fp32_model = 4 * model_params(LLAMA_8B)
    est = {u: estimate(u, big, planned_calib(32, 512), batch_size=2) for u in METHODS}
    # one block at a time: well below the fp32 model; the end-to-end methods hold it whole, plus per-weight state
    assert est["finetune.blockwise"] < 0.5 * fp32_model
    assert est["finetune.lora"] > fp32_model
    assert est["finetune.qat"] > est["finetune.distill"] > est["finetune.lora"] > est["finetune.blockwise"]
    assert est["finetune.distill"] > 3 * fp32_model   # per weight: V, its gradient, AdamW's moments, ...


@pytest.mark.parametrize("uses", METHODS)
def test_heldout_windows_must_leave_training_windows_in_preflight(uses):
    assert check(uses, planned_calib(8, 64), heldout_windows=2) == []
    problems = check(uses, planned_calib(3, 64), heldout_windows=3)
    assert len(problems) == 1
    assert "with.heldout_windows" in problems[0] and "at most 2" in problems[0] and "n_samples" in problems[0]


def test_eval_every_without_heldout_windows_is_refused():
    problems = check("finetune.distill", planned_calib(8, 64), heldout_windows=0, eval_every=5)
    assert len(problems) == 1 and "with.eval_every" in problems[0] and "heldout_windows" in problems[0]
    assert check("finetune.distill", planned_calib(8, 64), heldout_windows=0) == []


def write_calib(root: Path, ids: torch.Tensor) -> CalibSet:
    root.mkdir(parents=True, exist_ok=True)
    torch.save(ids, root / "ids.pt")
    (root / "info.json").write_text(json.dumps({"source": "t", "seq_len": ids.shape[1], "n_samples": ids.shape[0],
                                                "fingerprint": "t"}))
    return CalibSet(root, source="t", seq_len=int(ids.shape[1]), n_samples=int(ids.shape[0]))


def test_a_computed_calibration_set_whose_heldout_window_repeats_a_training_window_is_refused(tmp_path):
    ids = torch.arange(6 * 16).reshape(6, 16)
    assert check("finetune.blockwise", write_calib(tmp_path / "ok", ids), heldout_windows=2) == []
    ids[5] = ids[1]   # the text repeats a passage: the last (held-out) window equals training window 1
    problems = check("finetune.blockwise", write_calib(tmp_path / "rep", ids), heldout_windows=2)
    assert len(problems) == 1 and "held-out window 1 repeats a training window" in problems[0]
    assert check("finetune.blockwise", write_calib(tmp_path / "rep2", ids), heldout_windows=0) == []


def test_cli_refuses_too_many_heldout_windows_before_any_stage_and_estimates_the_peak(tmp_path, tiny_model_dir,
                                                                                     runs_dir):
    body = f"""
model: {{source: "{tiny_model_dir}"}}
stages:
  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: 64}}, n_samples: 4, stats: false}}}}
  quantize: {{uses: quantize.rtn, needs: [calibrate], with: {{bits: 3, group_size: 32}}}}
  finetune: {{uses: finetune.distill, needs: [quantize, calibrate], with: {{steps: 2, heldout_windows: HELD}}}}
"""
    bad = write_recipe(tmp_path / "bad", "name: ft-bad" + body.replace("HELD", "4"))
    done = run_cli("run", str(bad), "--no-track", runs_dir=runs_dir)
    assert done.returncode != 0
    assert "stages.finetune (finetune.distill): with.heldout_windows: 4" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(runs_dir.glob("**/calib/ids.pt"))   # refused before calibrate ran
    good = write_recipe(tmp_path / "good", "name: ft-good" + body.replace("HELD", "1"))
    head = body[: body.index("  quantize:")]   # the same model and calibrate stages: the same cache keys
    run_cli("run", str(write_recipe(tmp_path / "calib", "name: ft-calib" + head)), "--no-track", runs_dir=runs_dir,
            check=True)
    calib_ids = list(runs_dir.glob("**/calib/ids.pt"))
    assert len(calib_ids) == 1, calib_ids   # where a calibrate stage writes: the refused run wrote none
    dry = parse_json_stdout(run_cli("run", str(good), "--dry-run", "--json", runs_dir=runs_dir, check=True))
    assert dry["stages"]["finetune"].get("peak_estimate_bytes"), dry["stages"]["finetune"]
