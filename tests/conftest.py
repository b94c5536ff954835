"""Shared fixtures: offline environment, a tiny random Llama folder, CLI helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]
SESSION_CACHE = REPO / "runs" / "test-cache"


@pytest.fixture(scope="session")
def bundled_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled model's tokenizer files (the model folder is converted once per machine)."""
    from qflow.models.sources import resolve_model

    return resolve_model("zoo:smollm2-135m", SESSION_CACHE).path


@pytest.fixture(scope="session")
def bundled_model_dir(bundled_tokenizer_dir) -> Path:
    return bundled_tokenizer_dir


def make_tiny_llama(folder: Path, tokenizer_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), bundled_tokenizer_dir)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite store (creating one costs ~9 s; copying it, nothing)."""
    from qflow.tracking import prepare_store

    folder = tmp_path_factory.mktemp("mlflow-template")
    prepare_store(folder)
    return folder / "mlflow.db"


@pytest.fixture()
def runs_dir(tmp_path, mlflow_template) -> Path:
    import shutil

    path = tmp_path / "runs"
    path.mkdir()
    shutil.copy(mlflow_template, path / "mlflow.db")
    return path


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def run_cli(*args: str, runs_dir: Path | None = None, check: bool = False, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Call the CLI as a user would (a subprocess)."""
    full_env = dict(os.environ, **(env or {}))
    if runs_dir is not None:
        full_env["QFLOW_RUNS_DIR"] = str(runs_dir)
    done = subprocess.run([sys.executable, "-m", "qflow.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"qflow {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def tiny_recipe(model_dir: Path, *, bits: int = 4, group_size: int = 32, n_windows: int = 2, seq_len: int = 64,
                extra: str = "") -> str:
    return f"""
name: tiny
model: {{source: "{model_dir}"}}
data:
  calib: {{source: "zoo:wiki-pages", seq_len: {seq_len}}}
  eval: {{source: "zoo:lee-news", seq_len: {seq_len}}}
params: {{bits: {bits}, group_size: {group_size}, n_calib: 4, n_eval_windows: {n_windows}}}
stages:
  calibrate: {{uses: calibrate, with: {{data: "${{data.calib}}", n_samples: "${{params.n_calib}}"}}}}
  quantize:
    uses: quantize.rtn
    needs: [calibrate]
    with: {{bits: "${{params.bits}}", group_size: "${{params.group_size}}"}}
  evaluate:
    uses: evaluate.lm
    needs: [quantize]
    with: {{data: "${{data.eval}}", n_windows: "${{params.n_eval_windows}}", topk: 16, speed: false, layer_report: false}}
{extra}
"""


def parse_json_stdout(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout)


def quantize_calibrated(ctx, net, ids, method: str, n_grid: int):
    """AWQ (``n_grid`` ratios) or GPTQ, W4 g32, on ``net`` in place; the result with its checkpoint folder."""
    from qflow.models.adapters import get_adapter
    from qflow.quant.algos.awq import AWQOptions, quantize_model_awq
    from qflow.quant.algos.gptq_model import GPTQOptions, quantize_model_gptq

    adapter = get_adapter(net)
    if method == "awq":
        return quantize_model_awq(ctx, net, adapter, ids, AWQOptions(bits=4, group_size=32, n_grid=n_grid),
                                  base_model="tiny", batch_size=4)
    return quantize_model_gptq(ctx, net, adapter, ids, GPTQOptions(bits=4, group_size=32),
                               base_model="tiny", batch_size=4)


def fold_random_scales(adapter, seed: int = 3) -> int:
    """Fold a random scale in [0.5, 2) into every AWQ site of every block (an exact rewrite); the number of sites."""
    import torch

    from qflow.quant.algos.awq import fold_scale

    gen = torch.Generator().manual_seed(seed)
    n_sites = 0
    with torch.no_grad():
        for block in adapter.blocks():
            for site in adapter.awq_sites(block):
                linears = [block.get_submodule(n) for n in site.linears]
                fold_scale(block.get_submodule(site.prev), linears,
                           0.5 + 1.5 * torch.rand(linears[0].in_features, generator=gen))
                n_sites += 1
    return n_sites
