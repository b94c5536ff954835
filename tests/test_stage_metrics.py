"""``Stage.metrics`` (issue 16): every stage declares the metric names it logs, so `qflow lint` can check
every gate; the engine warns (``UndeclaredMetricWarning``) when a stage logs a name its declaration does
not match, and pyproject's pytest settings turn that warning into an error: every test that runs a stage
in-process (tests/test_export_*.py, test_finetune.py, test_allocate.py, test_sensitivity.py, ...) checks
the declaration of the stages it runs, on the settings it runs them with."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from qflow.engine.runner import _check_metric_names
from qflow.registry import UndeclaredMetricWarning, discover, undeclared_metrics


def test_every_registered_stage_declares_its_metrics():
    reg = discover()
    # qflow's own stages (other test modules register throwaway stages in the same process)
    shipped = {name: cls for name, cls in reg.stages.items() if cls.__module__.startswith(("stages.", "qflow."))}
    missing = [name for name, cls in shipped.items() if getattr(cls, "metrics", None) is None]
    assert len(shipped) >= 15 and not missing, f"stages without Stage.metrics: {missing}"


def test_names_are_matched_against_the_declared_patterns():
    onnx = discover().stages["export.onnx"]
    assert undeclared_metrics(onnx, ["roundtrip_kl_acc4", "decode_ms_acc4_mt", "n_linear_nbits", "peak_rss_mb"]) == []
    assert undeclared_metrics(onnx, ["roundtrip_kld", "size_bytes"]) == ["roundtrip_kld", "size_bytes"]
    assert undeclared_metrics(SimpleNamespace(metrics=None), ["anything"]) == []   # undeclared: not checked


def test_the_engine_warns_on_an_undeclared_metric():
    st = SimpleNamespace(id="export", uses="export.gguf", cls=discover().stages["export.gguf"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_metric_names(st, {"roundtrip_kl": 0.1, "size_bytes": 3.0, "peak_rss_mb": 9.0})   # all declared
    with pytest.warns(UndeclaredMetricWarning, match=r"export.gguf \(export\) logged roundtrip_kld,"):
        _check_metric_names(st, {"roundtrip_kld": 0.1, "size_bytes": 3.0})


def test_show_stage_lists_what_gates_may_name(capsys):
    from qflow.cli import main

    assert main(["show", "stage", "allocate-bits"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("metrics: "))
    assert line.split(": ", 1)[1].split(", ") == [*discover().stages["allocate-bits"].metrics, "peak_rss_mb"]
