"""Cache keys, atomic commits, resume after a crash, explain, gc, verify (toy stages)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qflow.artifacts import Artifact, EvalReport
from qflow.engine.cache import CacheStore, canonical_json, diff_ingredients, make_key
from qflow.engine.keys import compute_keys, environment
from qflow.engine.plan import build_plan
from qflow.engine.runner import RunOptions, execute
from qflow.errors import PlanError
from qflow.recipe.validate import validate_shape
from qflow.registry import Stage, StageConfig, register

CALLS: list[str] = []
MEMO_DIRS: list[Path] = []


class _Cfg(StageConfig):
    value: int = 1
    fail: bool = False


@register("test.source")
class _Source(Stage):
    """A toy stage writing its value to a file."""

    version = 1
    Config = _Cfg
    outputs = {"report": EvalReport}

    def run(self, ctx, cfg):
        CALLS.append(ctx.stage_id)
        MEMO_DIRS.append(ctx.memo_dir)
        out = ctx.output("report")
        (out / "value.txt").write_text(str(cfg.value))
        ctx.log_metric("value", cfg.value)
        if cfg.fail:
            raise RuntimeError("boom")
        return {"report": EvalReport(out, value=cfg.value)}


@register("test.sink")
class _Sink(Stage):
    """A toy stage reading its upstream value."""

    version = 1
    Config = _Cfg
    inputs = {"report": EvalReport}
    outputs = {"report": EvalReport}

    def run(self, ctx, cfg, report):
        CALLS.append(ctx.stage_id)
        up = int((report.path / "value.txt").read_text())
        out = ctx.output("report")
        (out / "partial.txt").write_text("half-written")
        if cfg.fail:
            raise RuntimeError("boom")
        (out / "value.txt").write_text(str(up + cfg.value))
        ctx.log_metric("total", up + cfg.value)
        return {"report": EvalReport(out)}


@register("test.gpu")
class _NeedsGPU(_Source):
    """A toy stage that declares it needs a CUDA GPU."""

    requires_gpu = True


@register("test.estimate")
class _Estimate(_Sink):
    """A toy stage whose memory estimate lists what the engine tells it about its upstream."""

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        ESTIMATED.append([(u.stage_id, u.uses, u.config["value"], sorted(u.outputs)) for u in upstream])
        values = [u.outputs["report"].meta["value"] for u in upstream if u.outputs and "value" in u.outputs["report"].meta]
        return 2**20 * values[0] if values else None


ESTIMATED: list[list] = []


def toy_plan(a: int = 1, b: int = 10, fail_b: bool = False, order_swap: bool = False):
    stages = {"a": {"uses": "test.source", "with": {"value": a}},
              "b": {"uses": "test.sink", "needs": ["a"], "with": {"value": b, "fail": fail_b}}}
    if order_swap:
        stages = {"b": {"needs": ["a"], "with": {"fail": fail_b, "value": b}, "uses": "test.sink"},
                  "a": {"with": {"value": a}, "uses": "test.source"}}
    data = {"name": "toy", "stages": stages}
    return build_plan(validate_shape(data, "toy.yaml"), data, "toy.yaml")


def keys_of(plan, tmp_path):
    env = environment("cpu")
    return {sid: k for sid, (k, _) in compute_keys(plan, CacheStore(tmp_path / "cache"), env).items()}


def test_keys_change_with_config_version_and_upstream(tmp_path, monkeypatch):
    base = keys_of(toy_plan(), tmp_path)
    assert keys_of(toy_plan(), tmp_path) == base
    changed_b = keys_of(toy_plan(b=11), tmp_path)
    assert changed_b["a"] == base["a"] and changed_b["b"] != base["b"]
    changed_a = keys_of(toy_plan(a=2), tmp_path)
    assert changed_a["a"] != base["a"] and changed_a["b"] != base["b"]  # upstream change chains down
    monkeypatch.setattr(_Sink, "version", 2)
    bumped = keys_of(toy_plan(), tmp_path)
    assert bumped["a"] == base["a"] and bumped["b"] != base["b"]


def test_reordering_yaml_keys_keeps_keys(tmp_path):
    assert keys_of(toy_plan(order_swap=True), tmp_path) == keys_of(toy_plan(), tmp_path)


def test_canonical_json_is_order_free():
    assert canonical_json({"b": 1, "a": {"y": 2, "x": 1}}) == canonical_json({"a": {"x": 1, "y": 2}, "b": 1})
    assert make_key({"a": 1}) != make_key({"a": 2})


def test_second_run_is_cached_and_only_changes_recompute(tmp_path):
    opts = RunOptions(runs_root=tmp_path, track=False, quiet=True)
    CALLS.clear()
    r1 = execute(toy_plan(), opts)
    assert r1.status == "ok" and CALLS == ["a", "b"]
    assert {k: v for k, v in r1.metrics.items() if "peak_rss" not in k} == {"a/value": 1.0, "b/total": 11.0}
    assert r1.metrics["b/peak_rss_mb"] > 0
    r2 = execute(toy_plan(), opts)
    assert [r.status for r in r2.stages.values()] == ["cached", "cached"]
    assert r2.metrics == r1.metrics and CALLS == ["a", "b"]
    execute(toy_plan(b=5), opts)
    assert CALLS == ["a", "b", "b"]
    r4 = execute(toy_plan(), RunOptions(runs_root=tmp_path, track=False, quiet=True, force=["a"]))
    assert r4.stages["a"].status == "ran" and r4.stages["b"].status == "cached"


def test_stages_keep_memos_in_the_old_cache_folder(tmp_path):
    """ctx.memo_dir is the folder stages used as runs_root/cache before, so what they memoised stays valid."""
    MEMO_DIRS.clear()
    execute(toy_plan(), RunOptions(runs_root=tmp_path, track=False, quiet=True))
    assert MEMO_DIRS == [tmp_path / "cache"]


def test_dry_run_only_lists_the_other_stages_as_skipped_or_cached(tmp_path):
    def dry(only):
        result = execute(toy_plan(), RunOptions(runs_root=tmp_path, track=False, quiet=True, dry_run=True, only=only))
        return {sid: r.status for sid, r in result.stages.items()}, result.stages

    statuses, stages = dry("b")  # nothing cached: a run with --only b would fail on a
    assert statuses == {"a": "skipped", "b": "will run"} and "not cached" in stages["a"].error
    statuses, stages = dry("a")
    assert statuses == {"a": "will run", "b": "skipped"} and stages["b"].error is None
    execute(toy_plan(), RunOptions(runs_root=tmp_path, track=False, quiet=True, only="a"))
    assert dry("b")[0] == {"a": "cached", "b": "will run"}
    assert dry("a")[0] == {"a": "cached", "b": "skipped"}


def test_a_stage_that_needs_a_gpu_is_refused_before_anything_runs(tmp_path):
    data = {"name": "gpu", "device": "cpu", "stages": {"a": {"uses": "test.source"},
                                                       "g": {"uses": "test.gpu", "with": {"value": 2}}}}
    plan = build_plan(validate_shape(data, "gpu.yaml"), data, "gpu.yaml")
    CALLS.clear()
    with pytest.raises(PlanError) as err:
        execute(plan, RunOptions(runs_root=tmp_path, track=False, quiet=True))
    assert "stages.g (test.gpu) needs a CUDA GPU" in str(err.value) and "device: cpu" in str(err.value)
    assert CALLS == [] and not (tmp_path / "runs").exists()


def test_estimates_see_the_whole_cached_ancestry(tmp_path):
    """c's input is b (not cached); the engine still hands it a's cached output, nearest stage first."""
    data = {"name": "est", "stages": {"a": {"uses": "test.source", "with": {"value": 3}},
                                      "b": {"uses": "test.sink", "needs": ["a"]},
                                      "c": {"uses": "test.estimate", "needs": ["b"]}}}
    plan = build_plan(validate_shape(data, "est.yaml"), data, "est.yaml")
    opts = RunOptions(runs_root=tmp_path, track=False, quiet=True)
    ESTIMATED.clear()
    assert execute(plan, RunOptions(**{**vars(opts), "dry_run": True})).stages["c"].peak_estimate_bytes is None
    execute(plan, RunOptions(**{**vars(opts), "only": "a"}))
    ESTIMATED.clear()
    dry = execute(plan, RunOptions(**{**vars(opts), "dry_run": True}))
    assert dry.stages["c"].peak_estimate_bytes == 3 * 2**20
    assert ESTIMATED == [[("b", "test.sink", 1, []), ("a", "test.source", 3, ["report"])]]


def test_failure_leaves_no_entry_and_resume_reuses_upstream(tmp_path):
    opts = RunOptions(runs_root=tmp_path, track=False, quiet=True)
    CALLS.clear()
    r = execute(toy_plan(fail_b=True), opts)
    assert r.status == "failed" and r.stages["b"].status == "failed" and "boom" in r.stages["b"].error
    store = CacheStore(tmp_path / "cache")
    assert store.get(r.stages["b"].key) is None
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    r2 = execute(toy_plan(fail_b=True), opts)
    assert r2.stages["a"].status == "cached"


def test_killed_run_leaves_no_partial_entry_and_rerun_resumes(tmp_path):
    """SIGKILL a real process in the middle of a stage, then re-run."""
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from qflow.artifacts import EvalReport
        from qflow.registry import Stage, StageConfig, register
        from qflow.engine.plan import build_plan
        from qflow.engine.runner import RunOptions, execute
        from qflow.recipe.validate import validate_shape

        class C(StageConfig):
            value: int = 1

        @register("crash.a")
        class A(Stage):
            Config = C
            outputs = {{"report": EvalReport}}
            def run(self, ctx, cfg):
                out = ctx.output("report")
                (out / "a.txt").write_text("a")
                return {{"report": EvalReport(out)}}

        @register("crash.b")
        class B(Stage):
            Config = C
            inputs = {{"report": EvalReport}}
            outputs = {{"report": EvalReport}}
            def run(self, ctx, cfg, report):
                out = ctx.output("report")
                (out / "half.bin").write_bytes(b"x" * 1000)
                if os.environ.get("CRASH"):
                    print("READY", flush=True)
                    time.sleep(60)
                return {{"report": EvalReport(out)}}

        data = {{"name": "crash", "stages": {{"a": {{"uses": "crash.a"}}, "b": {{"uses": "crash.b", "needs": ["a"]}}}}}}
        plan = build_plan(validate_shape(data, "x"), data, "x")
        r = execute(plan, RunOptions(runs_root=__import__("pathlib").Path({str(tmp_path)!r}), track=False, quiet=True))
        print({{k: v.status for k, v in r.stages.items()}}, flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, CRASH="1"))
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = CacheStore(tmp_path / "cache")
    entries = list(store.entries())
    assert len(entries) == 1  # only stage a committed; b left nothing in the store
    assert all(not store.verify(e) for e in entries)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert "'a': 'cached'" in done.stdout and "'b': 'ran'" in done.stdout, done.stderr


def test_diff_ingredients_lines():
    old = {"config": {"group_size": 128, "bits": 4}, "inputs": {"model": "k1"}}
    new = {"config": {"group_size": 64, "bits": 4}, "inputs": {"model": "k1"}}
    assert diff_ingredients(old, new) == ["config.group_size: 128 -> 64"]


def test_verify_detects_corruption(tmp_path):
    opts = RunOptions(runs_root=tmp_path, track=False, quiet=True)
    r = execute(toy_plan(), opts)
    store = CacheStore(tmp_path / "cache")
    entry = store.get(r.stages["b"].key)
    assert store.verify(entry) == []
    (entry.outputs / "report" / "value.txt").write_text("999")
    assert store.verify(entry)


def test_artifact_roundtrip(tmp_path):
    art = EvalReport(tmp_path / "x", protocol={"a": 1})
    Artifact.save(art, tmp_path / "x")
    back = Artifact.load(tmp_path / "x")
    assert isinstance(back, EvalReport) and back.meta == {"protocol": {"a": 1}}
