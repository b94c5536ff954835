"""Bad models and data are refused with the layer's name before anything is written (issue 17)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qflow.engine.cache import CacheStore
from qflow.engine.runner import RunOptions, run_recipe
from qflow.errors import PlanError

from .conftest import run_cli, tiny_recipe, write_recipe


def _opts(runs: Path) -> RunOptions:
    return RunOptions(runs_root=runs, track=False, quiet=True)


def _damaged_copy(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of the tiny model folder whose tensor ``name`` is replaced by ``edit(tensor)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


def _entries(runs: Path) -> list[str]:
    store = CacheStore(runs / "cache")
    return [e.key for e in store.items()] if (runs / "cache").exists() else []


def test_nan_weight_refused_at_load_naming_the_tensor(tmp_path, tiny_model_dir):
    def poison(t):
        t[3, 5] = float("nan")
        t[0, 0] = float("inf")
        return t

    model = _damaged_copy(tiny_model_dir, tmp_path / "nan-model", "model.layers.1.mlp.up_proj.weight", poison)
    recipe = write_recipe(tmp_path, tiny_recipe(model))
    result = run_recipe(str(recipe), [], _opts(tmp_path / "runs"))
    assert result.status == "failed"
    load = result.stages["model"]
    assert load.status == "failed"
    assert "model.layers.1.mlp.up_proj.weight (2 of" in load.error and "NaN or Inf" in load.error
    assert all(r.status == "skipped" for sid, r in result.stages.items() if sid != "model")
    assert _entries(tmp_path / "runs") == []          # nothing cached, not even the model stage
    assert not list((tmp_path / "runs" / "cache" / "tmp").glob("*"))


def _huge_norm(t):
    return t * 1e38   # finite weights; the attention scores of this block overflow to Inf/NaN


def test_nonfinite_activations_in_calibrate_name_the_layer(tmp_path, tiny_model_dir):
    model = _damaged_copy(tiny_model_dir, tmp_path / "inf-model", "model.layers.1.input_layernorm.weight", _huge_norm)
    recipe = write_recipe(tmp_path, tiny_recipe(model))
    result = run_recipe(str(recipe), [], _opts(tmp_path / "runs"))
    cal = result.stages["calibrate"]
    assert result.status == "failed" and cal.status == "failed"
    assert "non-finite activations at the input of model.layers.1." in cal.error
    assert result.stages["quantize"].status == "skipped"
    assert len(_entries(tmp_path / "runs")) == 1        # only the model stage (its folder is fine)


def test_nonfinite_activations_in_calibrated_quantize_name_the_layer(tmp_path, tiny_model_dir):
    model = _damaged_copy(tiny_model_dir, tmp_path / "inf-model", "model.layers.1.input_layernorm.weight", _huge_norm)
    extra = ("  quantize: {uses: quantize.gptq, needs: [calibrate], with: {bits: 4, group_size: 32}}\n")
    text = tiny_recipe(model).replace('n_samples: "${params.n_calib}"}}',
                                      'n_samples: "${params.n_calib}", stats: false}}')
    text = text.split("  quantize:\n")[0] + extra
    recipe = write_recipe(tmp_path, text)
    result = run_recipe(str(recipe), [], _opts(tmp_path / "runs"))
    q = result.stages["quantize"]
    assert result.status == "failed" and q.status == "failed", q
    assert "model.layers.1" in q.error and "non-finite" in q.error
    assert len(_entries(tmp_path / "runs")) == 2        # model and calibrate; no quantize entry
    assert not list((tmp_path / "runs" / "cache" / "tmp").glob("*"))


def test_short_calibration_text_refused_in_preflight(tmp_path, tiny_model_dir):
    text = tmp_path / "short.txt"
    text.write_text("A few sentences of text. " * 40)     # ~200 tokens: three 64-token windows
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir).replace(
        'calib: {source: "zoo:wiki-pages"', f'calib: {{source: "{text}"'))
    runs = tmp_path / "runs"
    with pytest.raises(PlanError, match=r"yields only 3 windows of 64 tokens .*, 4 requested"):
        run_recipe(str(recipe), [], _opts(runs))
    assert not (runs / "runs").exists() and _entries(runs) == []    # no stage ran, not even the model's
    # the bundled text, too many windows asked for: the CLI's one-paragraph error, exit 2, no traceback
    done = run_cli("run", str(write_recipe(tmp_path, tiny_recipe(tiny_model_dir), "big.yaml")),
                   "params.n_calib=100000", "--no-track", runs_dir=runs)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "stages.calibrate (calibrate): with.data: zoo:wiki-pages yields only" in done.stderr
    assert "100000 requested" in done.stderr
    assert not (runs / "runs").exists()
