"""Recipe composition, overrides, validation errors and the plan (no model work)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qflow import registry
from qflow.engine.plan import build_plan
from qflow.engine.runner import RunOptions, load_plan
from qflow.errors import PlanError, RecipeError
from qflow.recipe.compose import compose_recipe, to_plain
from qflow.recipe.validate import validate_shape

from .conftest import REPO, run_cli, write_recipe

BASE = """
name: t
model: {source: "zoo:smollm2-135m"}
data:
  calib: {source: "zoo:wiki-pages", seq_len: 64}
  eval: {source: "zoo:lee-news", seq_len: 64}
params: {bits: 4, group_size: 32}
stages:
  calibrate: {uses: calibrate, with: {data: "${data.calib}", n_samples: 2}}
  quantize: {uses: quantize.rtn, needs: [calibrate], with: {bits: "${params.bits}", group_size: "${params.group_size}"}}
  evaluate: {uses: evaluate.lm, needs: [quantize], with: {data: "${data.eval}", n_windows: 2}}
"""


def plan_of(tmp_path: Path, text: str, overrides: list[str] | None = None):
    path = write_recipe(tmp_path, text)
    return load_plan(str(path), overrides or [], RunOptions(runs_root=tmp_path / "runs"))


def test_flagship_recipe_composes_with_defaults_and_overrides():
    cfg = to_plain(compose_recipe(REPO / "recipes/llama-rtn.yaml", ["params.bits=3", "params.group_size=32"]))
    assert cfg["model"]["source"] == "zoo:smollm2-135m"
    assert cfg["stages"]["quantize"]["with"]["bits"] == 3
    assert cfg["stages"]["quantize"]["with"]["group_size"] == 32
    assert cfg["stages"]["evaluate"]["with"]["data"]["source"] == "zoo:lee-news"


def test_add_and_delete_overrides(tmp_path):
    path = write_recipe(tmp_path, BASE)
    cfg = to_plain(compose_recipe(path, ["+params.extra=7", "~stages.evaluate"]))
    assert cfg["params"]["extra"] == 7
    assert "evaluate" not in cfg["stages"]


def test_model_source_override_swaps_model(tmp_path):
    plan = plan_of(tmp_path, BASE, ["model.source=gguf:/tmp/x.gguf"])
    assert plan.stages["model"].config.source == "gguf:/tmp/x.gguf"


def test_plan_order_and_implicit_model(tmp_path):
    plan = plan_of(tmp_path, BASE)
    assert plan.order() == ["model", "calibrate", "quantize", "evaluate"]
    assert plan.stages["quantize"].bindings == {"model": ("model", "model")}
    assert plan.stages["evaluate"].bindings == {"model": ("quantize", "model")}


def test_the_model_section_becomes_the_stage_that_declares_it(tmp_path):
    """The plan asks the registry which stage the recipe's model: section becomes; a second claim is refused."""
    plan = plan_of(tmp_path, BASE)
    declared = registry.section_stage("model")
    assert declared is not None and declared.recipe_section == "model"
    assert plan.stages["model"].implicit and plan.stages["model"].cls is declared
    rival = type("RivalModelLoad", (registry.Stage,), {"recipe_section": "model", "__module__": __name__})
    with pytest.raises(ValueError, match="both declare recipe_section 'model'"):
        registry.register("test.rival_model")(rival)
    assert registry.get("test.rival_model") is None and registry.section_stage("model") is declared


def test_every_builtin_stage_module_is_an_entry_point():
    """The registry finds stages only through the qflow.stages entry points (it may not import the
    stages package, a layer above it), so pyproject.toml must name every module of stages/."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["qflow.stages"]
    modules = {f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py") if not p.name.startswith("_")}
    assert set(declared.values()) == modules
    reg = registry.discover()
    assert not reg.broken and set(reg.origins.values()) >= modules


def _err(tmp_path, text, overrides=None) -> str:
    with pytest.raises((RecipeError, PlanError)) as info:
        plan_of(tmp_path, text, overrides)
    return str(info.value)


def test_unknown_key_suggests_closest(tmp_path):
    msg = _err(tmp_path, BASE.replace("group_size: \"${params.group_size}\"", "group_sze: 32"))
    assert "stages.quantize.with.group_sze" in msg and "did you mean 'group_size'" in msg
    assert "recipe.yaml" in msg


def test_unknown_stage_lists_registered(tmp_path):
    msg = _err(tmp_path, BASE.replace("uses: quantize.rtn", "uses: quantize.rnt"))
    assert "unknown stage 'quantize.rnt'" in msg and "quantize.rtn" in msg


def test_wrong_type_names_path_and_value(tmp_path):
    msg = _err(tmp_path, BASE.replace("n_samples: 2", "n_samples: many"))
    assert "stages.calibrate.with.n_samples" in msg and "'many'" in msg


def test_invalid_bits_is_rejected_before_running(tmp_path):
    msg = _err(tmp_path, BASE, ["params.bits=7"])
    assert "bits must be one of" in msg and "stages.quantize.with" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _err(tmp_path, BASE + "stagse: {}\n")
    assert "unknown key 'stagse'" in msg and "did you mean 'stages'" in msg


def test_missing_stages(tmp_path):
    msg = _err(tmp_path, "name: t\n")
    assert "stages" in msg and "missing" in msg


def test_cycle_is_detected(tmp_path):
    text = BASE.replace("needs: [calibrate]", "needs: [calibrate, evaluate]")
    msg = _err(tmp_path, text)
    assert "cycle" in msg and "quantize" in msg and "evaluate" in msg


def test_unknown_need(tmp_path):
    msg = _err(tmp_path, BASE.replace("needs: [calibrate]", "needs: [calibrat]"))
    assert "unknown stage 'calibrat'" in msg and "did you mean 'calibrate'" in msg


def test_type_mismatch_between_output_and_input(tmp_path):
    text = BASE.replace("needs: [quantize], with", "needs: [quantize], inputs: {model: calibrate.calib}, with")
    msg = _err(tmp_path, text)
    assert "type mismatch" in msg and "CalibSet" in msg and "ModelRef" in msg


def test_bad_override_syntax(tmp_path):
    msg = _err(tmp_path, BASE, ["params.bits=="])
    assert "override" in msg


def test_override_of_missing_key_says_use_plus(tmp_path):
    msg = _err(tmp_path, BASE, ["params.bitz=3"])
    assert "+key=value" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    msg = _err(tmp_path, "name: t\nstages: {a: [\n")
    assert "not valid YAML" in msg and "line" in msg


def test_bad_interpolation(tmp_path):
    msg = _err(tmp_path, BASE.replace("${params.bits}", "${params.bitz}"))
    assert "interpolation" in msg and "params.bitz" in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        compose_recipe(tmp_path / "nope.yaml")


def test_gate_needs_a_bound(tmp_path):
    msg = _err(tmp_path, BASE.replace("n_windows: 2}}", "n_windows: 2}, gates: {ppl: {}}}"))
    assert "gates" in msg


def test_library_folder_on_search_path(tmp_path):
    lib = tmp_path / "teamlib" / "lib" / "model"
    lib.mkdir(parents=True)
    (lib / "tiny.yaml").write_text('# @package _global_\nmodel: {source: "./team-model"}\n')
    text = "defaults:\n  - lib/model/tiny\n  - _self_\n" + BASE.replace('model: {source: "zoo:smollm2-135m"}\n', "")
    path = write_recipe(tmp_path / "r", text)
    cfg = to_plain(compose_recipe(path, [], libraries=[str(tmp_path / "teamlib")]))
    assert cfg["model"]["source"] == "./team-model"


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([-1, 32, 64, 128]),
       scheme=st.sampled_from(["asym_z", "asym_a", "sym_f", "sym_r"]))
def test_override_values_reach_stage_config(tmp_path_factory, bits, group, scheme):
    tmp = tmp_path_factory.mktemp("h")
    path = write_recipe(tmp, BASE)
    cfg = to_plain(compose_recipe(path, [f"params.bits={bits}", f"params.group_size={group}",
                                         f"+stages.quantize.with.scheme={scheme}"]))
    plan = build_plan(validate_shape(cfg, str(path)), cfg, str(path))
    qcfg = plan.stages["quantize"].config
    assert (qcfg.bits, qcfg.group_size, qcfg.scheme) == (bits, group, scheme)


def test_cli_error_has_no_traceback(tmp_path):
    path = write_recipe(tmp_path, BASE.replace("group_size: \"${params.group_size}\"", "group_sze: 32"))
    done = run_cli("run", str(path), "--dry-run", runs_dir=tmp_path / "runs")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "did you mean 'group_size'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one paragraph


def test_schema_includes_stage_configs(tmp_path):
    out = tmp_path / "schema.json"
    done = run_cli("schema", "-o", str(out))
    assert done.returncode == 0, done.stderr
    import json

    schema = json.loads(out.read_text())
    variants = schema["properties"]["stages"]["additionalProperties"]["oneOf"]
    names = {v["properties"]["uses"]["const"] for v in variants}
    assert {"calibrate", "quantize.rtn", "evaluate.lm"} <= names
    rtn = next(v for v in variants if v["properties"]["uses"]["const"] == "quantize.rtn")
    assert "group_size" in rtn["properties"]["with"]["properties"]
