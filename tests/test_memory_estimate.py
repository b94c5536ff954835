"""Peak-memory estimates: the formulas, `--dry-run`, and the planned-upstream fallback."""

from __future__ import annotations

from qflow.models.memory import calibrated_stage_bytes, model_params, streaming_stage_bytes, whole_model_bytes

from .conftest import parse_json_stdout, run_cli, write_recipe

LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}


def test_formulas_scale_with_what_the_stage_holds():
    assert abs(model_params(LLAMA_8B) - 8.03e9) / 8.03e9 < 0.01  # Llama-3-8B has 8.03 B parameters
    small = calibrated_stage_bytes(LLAMA_8B, n_samples=32, seq_len=512)
    large = calibrated_stage_bytes(LLAMA_8B, n_samples=128, seq_len=512)
    gptq = calibrated_stage_bytes(LLAMA_8B, n_samples=32, seq_len=512, hessians=True)
    assert small < gptq and small < large
    # one block at a time: far below the whole fp32 model (32 GB)
    assert large < 0.5 * whole_model_bytes(LLAMA_8B)
    assert streaming_stage_bytes(LLAMA_8B) < small
    assert calibrated_stage_bytes({"hidden_size": 8}, n_samples=1, seq_len=1) is None  # not a decoder config


def test_dry_run_prints_estimates_once_the_model_is_known(tmp_path, tiny_model_dir, runs_dir):
    recipe = write_recipe(tmp_path / "r", f"""
name: est
model: {{source: "{tiny_model_dir}"}}
stages:
  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: 64}}, n_samples: 4}}}}
  quantize: {{uses: quantize.gptq, needs: [calibrate], with: {{bits: 4, group_size: 32}}}}
  evaluate: {{uses: evaluate.lm, needs: [quantize],
             with: {{data: {{source: "zoo:lee-news", seq_len: 64}}, n_windows: 2, speed: false, layer_report: false}}}}
""")
    before = parse_json_stdout(run_cli("run", str(recipe), "--dry-run", "--json", runs_dir=runs_dir, check=True))
    assert all("peak_estimate_bytes" not in s for s in before["stages"].values())  # model not resolved yet
    run_cli("run", str(recipe), "--only", "model", "--no-track", runs_dir=runs_dir, check=True)
    after = parse_json_stdout(run_cli("run", str(recipe), "--dry-run", "--json", runs_dir=runs_dir, check=True))
    est = {sid: s.get("peak_estimate_bytes") for sid, s in after["stages"].items()}
    # calibrate is only planned: the quantize estimate reads n_samples / seq_len from its config
    assert est["calibrate"] and est["quantize"] and est["evaluate"], est
    text = run_cli("run", str(recipe), "--dry-run", runs_dir=runs_dir, check=True).stdout
    assert "est. peak" in text and " MB" in text
