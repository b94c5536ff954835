"""Fuzzing recipes: structure, bytes and override strings never end in a traceback (issue 17).

Each example is one ``qflow run RECIPE [overrides] --dry-run`` through ``qflow.cli.main`` in this
process (compose, audit, validate, plan, keys, preflight; no stage runs). It must return 0 or a
QflowError's exit status 2 with a one-paragraph message; any other exception, or a printed
traceback, is a failure. ``make test-slow`` runs 2,000 examples (500 per strategy family); the
default suite 40 (an example costs 1-2 s, mostly Hydra's compose).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflow import cli

from .conftest import REPO, tiny_recipe

KEYS = ["name", "description", "model", "source", "dtype", "data", "calib", "eval", "seq_len", "field", "params",
        "bits", "group_size", "n_calib", "stages", "uses", "needs", "with", "gates", "inputs", "defaults", "sweep",
        "seed", "device", "n_samples", "n_windows", "topk", "speed", "layers", "ignore", "hydra", "_target_",
        "searchpath", "callbacks", "max", "min", "targets", "scheme", "_self_", "params.bits"]
STAGE_NAMES = ["calibrate", "quantize.rtn", "quantize.awq", "quantize.gptq", "evaluate.lm", "export.gguf", "model.load",
               "no.such", ""]
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)
SPECIAL = st.sampled_from(["${params.bits}", "${nope}", "${oc.env:HOME}", "${data.calib}", "${", "}", "???",
                           "zoo:wiki-pages", "zoo:nope", "/nonexistent", "../../etc/passwd", "hf:a/b@c", "-1",
                           "1e400", "nan", "inf", "null", "~", "[]", "{}", "calibrate.calib", "quantize.model"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    TEXT, SPECIAL, st.sampled_from(KEYS + STAGE_NAMES))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS + STAGE_NAMES), TEXT), inner,
                                                 max_size=4)), max_leaves=12)
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """A valid tiny recipe (as text and as data), a folder for generated recipes, a runs folder."""
    folder = tmp_path_factory.mktemp("fuzz")
    text = tiny_recipe(tiny_model_dir)
    (folder / "runs").mkdir()
    return {"text": text, "data": yaml.safe_load(text), "dir": folder, "runs": folder / "runs"}


def _run(base, content: str | bytes, overrides: list[str], capsys) -> int:
    path: Path = base["dir"] / "recipe.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    capsys.readouterr()
    try:
        status = cli.main(["--runs-dir", str(base["runs"]), "run", str(path), "--dry-run", "--no-track", *overrides])
    except SystemExit as exc:   # argparse refusing an option-like override: usage + status 2, no traceback
        status = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert status in (0, 2), (status, err)
    if status == 2:
        message = err.strip().splitlines()[-1] if err.strip() else ""
        assert message.startswith(("error:", "qflow: error:", "usage:")) or "error:" in err, err
    return status


def _set_at(data, path: list, value):
    """``data`` with the node at ``path`` (a list of choices, resolved modulo the sizes met) replaced."""
    node = data
    for i, choice in enumerate(path):
        if isinstance(node, dict) and node:
            k = sorted(node, key=str)[choice % len(node)]
            if i == len(path) - 1 or not isinstance(node[k], (dict, list)):
                node[k] = value
                return data
            node = node[k]
        elif isinstance(node, list) and node:
            j = choice % len(node)
            if i == len(path) - 1 or not isinstance(node[j], (dict, list)):
                node[j] = value
                return data
            node = node[j]
        else:
            break
    if isinstance(node, dict):
        node[str(value)[:12] if not isinstance(value, (dict, list)) else "extra"] = value
    return data


def _dump(data) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError):
        return json.dumps(data, default=str)


def _mutated_recipe(base, path, value, drop):
    data = copy.deepcopy(base["data"])
    if drop:
        stages = data.get("stages") or {}
        if stages:
            stages.pop(sorted(stages)[path[0] % len(stages)] if path else "evaluate", None)
    return _dump(_set_at(data, path, value))


def _bytes_recipe(base, cut: int, noise: bytes, at: int) -> bytes:
    raw = base["text"].encode()
    at %= len(raw) + 1
    return (raw[:at] + noise + raw[at:])[: max(0, len(raw) + len(noise) - cut)]


OVERRIDE = st.one_of(
    st.builds(lambda k, op, v: f"{op}{k}={v}", st.sampled_from(
        ["params.bits", "params.group_size", "stages.quantize.uses", "stages.quantize.with.bits", "model.source",
         "data.calib.seq_len", "stages.calibrate.needs", "seed", "device", "stages.new", "name", "hydra.run.dir",
         "stages.quantize.with", "defaults", "sweep", "stages.evaluate.gates.ppl.max"]),
        st.sampled_from(["", "+", "++", "~"]), st.one_of(TEXT, SPECIAL, st.integers().map(str))),
    st.text(alphabet="abcdefgh.=+~${}[],:'\"\\ _-0123456789@/", max_size=30),
    TEXT,
)


def _fuzz(n: int):
    return settings(max_examples=n, **FUZZ)


class Tally:
    """Exit statuses of the examples a family ran, for the one-line summary the slow run records."""

    def __init__(self):
        self.status: dict[int, int] = {}

    def __call__(self, status: int) -> None:
        self.status[status] = self.status.get(status, 0) + 1

    def line(self, family: str, seconds: float) -> str:
        n = sum(self.status.values())
        return (f"fuzz {family}: {n} examples, {self.status.get(0, 0)} accepted (exit 0), "
                f"{self.status.get(2, 0)} refused with a one-paragraph error (exit 2), 0 tracebacks, {seconds:.0f} s")


def _structure(n, tally=lambda status: None):
    @_fuzz(n)
    @given(path=st.lists(st.integers(0, 50), min_size=1, max_size=5), value=VALUES, drop=st.booleans())
    def fuzz(base, capsys, path, value, drop):
        tally(_run(base, _mutated_recipe(base, path, value, drop), [], capsys))
    return fuzz


def _documents(n, tally=lambda status: None):
    @_fuzz(n)
    @given(doc=VALUES)
    def fuzz(base, capsys, doc):
        tally(_run(base, _dump(doc), [], capsys))
    return fuzz


def _bytes(n, tally=lambda status: None):
    @_fuzz(n)
    @given(cut=st.integers(0, 400), noise=st.binary(max_size=16), at=st.integers(0, 10**6))
    def fuzz(base, capsys, cut, noise, at):
        tally(_run(base, _bytes_recipe(base, cut, noise, at), [], capsys))
    return fuzz


def _overrides(n, tally=lambda status: None):
    @_fuzz(n)
    @given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3))
    def fuzz(base, capsys, overrides):
        tally(_run(base, base["text"], overrides, capsys))
    return fuzz


FAMILIES = {"structure": _structure, "documents": _documents, "bytes": _bytes, "overrides": _overrides}
FAST_EXAMPLES, SLOW_EXAMPLES = 10, 500    # per family: 40 and 2,000 examples in all (~1-2 s each: Hydra)


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_recipes_fast(family, base, capsys):
    FAMILIES[family](FAST_EXAMPLES)(base, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_recipes_slow(family, base, capsys):
    tally, t0 = Tally(), time.perf_counter()
    FAMILIES[family](SLOW_EXAMPLES, tally)(base, capsys)
    line = tally.line(family, time.perf_counter() - t0)
    with capsys.disabled():
        print("\n" + line)
    with open(REPO / "runs" / "fuzz-counts.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {line}\n")
    # hypothesis stops early only when a strategy's space is exhausted; these spaces are not
    assert sum(tally.status.values()) >= SLOW_EXAMPLES, line


# ---- examples the fuzzers found, kept as fast regression tests ---------------------------------

def _dry_run(base, path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main(["--runs-dir", str(base["runs"]), "run", str(path), "--dry-run", "--no-track"])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("doc,named", [
    ({"defaults": None}, "defaults must be a list, got null"),   # the slow documents fuzzer's find (2026-12-07)
    ({"defaults": {"lib/model": "smollm2"}}, "defaults must be a list, got a mapping"),
    ({"defaults": [1]}, "defaults[0] is 1"),
    ({"defaults": ["lib/model/smollm2", {"a": 1, "b": 2}]}, "defaults[1] is {'a': 1, 'b': 2}"),
    ({"defaults": [{1: "a"}]}, "defaults[0] is {1: 'a'}"),        # Hydra itself: an AssertionError
])
def test_malformed_defaults_list_is_a_recipe_error(base, capsys, doc, named):
    path = base["dir"] / "recipe.yaml"
    path.write_text(_dump(doc))
    status, err = _dry_run(base, path, capsys)
    assert status == 2 and "Traceback" not in err, err
    assert f"{path}: {named}" in err and "Fix: write the defaults list as a YAML list" in err, err


def test_malformed_defaults_list_in_a_library_file_is_a_recipe_error(base, capsys):
    (base["dir"] / "grp").mkdir(exist_ok=True)
    (base["dir"] / "grp" / "bad.yaml").write_text("defaults: 5\nx: 1\n")
    path = base["dir"] / "recipe.yaml"
    path.write_text(base["text"].replace("name: tiny", "defaults: [grp/bad, _self_]\nname: tiny"))
    status, err = _dry_run(base, path, capsys)
    assert status == 2 and "Traceback" not in err, err
    assert "Invalid defaults list in 'grp/bad'" in err and "Fix: write the defaults list" in err, err
