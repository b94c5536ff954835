"""`qflow lint` (issue 16): one test per finding, the exit code and --json; the tiny 2-layer model's
configuration is built on the meta device (its weights are never read)."""

from __future__ import annotations

import json

from qflow.cli import main
from tests.conftest import tiny_recipe, write_recipe


def base(model_dir, **kw) -> str:
    """The tiny recipe with the evaluation taking the calibration set (so every stage's output is used)."""
    return tiny_recipe(model_dir, **kw).replace("needs: [quantize]", "needs: [quantize, calibrate]")


def lint(capsys, tmp_path, text: str, *extra: str) -> tuple[int, list[dict]]:
    recipe = write_recipe(tmp_path, text)
    capsys.readouterr()
    code = main(["--runs-dir", str(tmp_path / "runs"), "lint", str(recipe), "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out)["findings"]


def codes(findings) -> list[str]:
    return [f["code"] for f in findings]


def test_clean_recipe_has_no_findings(tmp_path, capsys, tiny_model_dir):
    code, findings = lint(capsys, tmp_path, base(tiny_model_dir))
    assert (code, findings) == (0, [])


def test_schema_error(tmp_path, capsys, tiny_model_dir):
    code, findings = lint(capsys, tmp_path, base(tiny_model_dir).replace("bits: 4,", "bits: four,"))
    assert code == 1 and codes(findings) == ["schema"]
    assert findings[0]["where"] == "stages.quantize.with.bits"


def test_unknown_key(tmp_path, capsys, tiny_model_dir):
    text = base(tiny_model_dir).replace('group_size: "${params.group_size}"}', 'group_sise: 32}')
    code, findings = lint(capsys, tmp_path, text)
    assert code == 1 and "unknown-key" in codes(findings)
    f = findings[codes(findings).index("unknown-key")]
    assert f["where"] == "stages.quantize.with.group_sise" and "group_size" in f["fix"]


def test_layer_pattern_matching_no_module(tmp_path, capsys, tiny_model_dir):
    text = base(tiny_model_dir).replace('group_size: "${params.group_size}"}',
                                               'group_size: "${params.group_size}", '
                                               'layers: {"re:.*down_projj": {bits: 8}}, ignore: [model.layers.5.mlp.up_proj]}')
    code, findings = lint(capsys, tmp_path, text)
    assert code == 1 and codes(findings) == ["pattern-matches-nothing", "pattern-matches-nothing"]
    assert "down_projj" in findings[0]["message"] and "model.layers.1.mlp.down_proj" in findings[0]["message"]
    assert findings[1]["where"].endswith("with.ignore")


def test_group_size_not_dividing_the_shapes(tmp_path, capsys, tiny_model_dir):
    # hidden 64 and intermediate 128: 48 divides neither; a layers override fixes the down projections only
    text = base(tiny_model_dir, group_size=48)
    code, findings = lint(capsys, tmp_path, text)
    assert code == 1 and codes(findings) == ["group-size"]
    assert "14 linear(s)" in findings[0]["message"]
    fixed = text.replace('group_size: "${params.group_size}"}',
                         'group_size: "${params.group_size}", layers: {"re:.*": {group_size: 32}}}')
    assert lint(capsys, tmp_path, fixed) == (0, [])


def test_unused_param(tmp_path, capsys, tiny_model_dir):
    text = base(tiny_model_dir).replace("params: {", "params: {alpha: 0.5, ")
    code, findings = lint(capsys, tmp_path, text)
    assert code == 1 and codes(findings) == ["unused-param"] and findings[0]["where"] == "params.alpha"
    # a sweep over it uses it
    code, findings = lint(capsys, tmp_path, text + "sweep: {params: {params.alpha: [0.5, 0.8]}}\n")
    assert (code, findings) == (0, [])


def test_gate_on_a_metric_no_stage_produces(tmp_path, capsys, tiny_model_dir):
    text = base(tiny_model_dir).replace("layer_report: false}", "layer_report: false}\n    gates: "
                                               "{ppl_ratio: {max: 2.0}, perplexity_ratio: {max: 2.0}}")
    code, findings = lint(capsys, tmp_path, text)
    assert code == 1 and codes(findings) == ["gate-metric"]
    assert findings[0]["where"] == "stages.evaluate.gates.perplexity_ratio"


def test_stage_whose_outputs_nothing_consumes(tmp_path, capsys, tiny_model_dir):
    # RTN takes no calibration and the evaluation does not list calibrate in its needs
    text = tiny_recipe(tiny_model_dir)
    code, findings = lint(capsys, tmp_path, text)
    assert code == 1 and codes(findings) == ["unconsumed-output"] and findings[0]["where"] == "stages.calibrate"


def test_text_output_lists_findings(tmp_path, capsys, tiny_model_dir):
    recipe = write_recipe(tmp_path, base(tiny_model_dir).replace("params: {", "params: {alpha: 0.5, "))
    capsys.readouterr()
    assert main(["--runs-dir", str(tmp_path / "runs"), "lint", str(recipe), "--no-model"]) == 1
    out = capsys.readouterr().out
    assert "[unused-param]" in out and out.strip().endswith("1 finding in 1 recipe")


def test_gates_on_export_and_allocation_metrics(tmp_path, capsys, tiny_model_dir):
    """Export and allocate-bits declare what they log: a gate on a real name passes lint, a misspelt one
    is found; `peak_rss_mb` (logged by the engine for every stage) is gateable everywhere."""
    extra = """  export:
    uses: export.safetensors
    needs: [quantize]
    gates: {roundtrip_kl: {max: 0.01}, size_bytes: {max: 1.0e9}, peak_rss_mb: {max: 1.0e5}, roundtrip_kld: {max: 0.01}}
  sensitivity: {uses: sensitivity-analyze, needs: [calibrate], with: {bits: [2, 4], group_sizes: [32]}}
  allocate:
    uses: allocate-bits
    needs: [sensitivity]
    with: {bpw: 3.5}
    gates: {predicted_bpw: {max: 3.6}, solver_optimal: {min: 1}, bpw: {max: 3.6}}
"""
    code, findings = lint(capsys, tmp_path, base(tiny_model_dir, extra=extra), "--no-model")
    gates = sorted(f["where"] for f in findings if f["code"] == "gate-metric")
    assert code == 1 and gates == ["stages.allocate.gates.bpw", "stages.export.gates.roundtrip_kld"]
    said = {f["where"]: f["message"] for f in findings}
    assert "predicted_bpw" in said["stages.allocate.gates.bpw"]   # the message lists what the stage logs
