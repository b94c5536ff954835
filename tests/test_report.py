"""Pareto sets (strict dominance), Pareto reports, `qflow report`, and HTML rendering in headless Chromium."""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from qflow.evaluation.pareto import pareto_front, parse_objectives
from qflow.evaluation.report import cli_report, pareto_report_for_points

from .conftest import run_cli, tiny_recipe, write_recipe

CHROMIUM = Path("/usr/bin/chromium")

MINMIN = {"bpw": "min", "kl": "min"}


def pts(*pairs):
    return [{"bpw": b, "kl": k} for b, k in pairs]


# ---- pareto_front -------------------------------------------------------------------------------

def test_dominated_points_are_dropped():
    points = pts((4.0, 0.10), (3.0, 0.20), (4.5, 0.10), (3.0, 0.30), (2.0, 0.50), (5.0, 0.05))
    # (4.5, .10) is dominated by (4.0, .10): equal KL, larger bpw; (3.0, .30) by (3.0, .20)
    assert pareto_front(points, MINMIN) == [0, 1, 4, 5]


def test_exact_duplicates_collapse_to_the_first():
    points = pts((3.0, 0.2), (4.0, 0.1), (3.0, 0.2), (4.0, 0.1), (3.0, 0.2))
    assert pareto_front(points, MINMIN) == [0, 1]


def test_ties_that_are_not_dominated_are_kept():
    # equal bpw and equal KL in different pairs: each is better somewhere, none dominates
    points = [{"bpw": 3.0, "kl": 0.2, "tps": 10}, {"bpw": 3.0, "kl": 0.2, "tps": 12},
              {"bpw": 3.0, "kl": 0.1, "tps": 8}, {"bpw": 2.5, "kl": 0.3, "tps": 8}]
    assert pareto_front(points, {"bpw": "min", "kl": "min", "tps": "max"}) == [1, 2, 3]
    # point 0 is dominated only through the maximized metric (12 > 10 with the rest equal)


def test_directions_and_missing_values():
    points = [{"kl": 0.1, "tps": 5}, {"kl": 0.1, "tps": 7}, {"kl": float("nan"), "tps": 100}, {"tps": 1000},
              {"kl": 0.05, "tps": 1}]
    assert pareto_front(points, {"kl": "min", "tps": "max"}) == [1, 4]
    assert pareto_front(points, {"kl": "min", "tps": "min"}) == [4]          # (0.05, 1) beats both 0.1s
    assert pareto_front([], MINMIN) == []
    with pytest.raises(ValueError, match="min' or 'max"):
        pareto_front(points, {"kl": "down"})
    assert parse_objectives("bpw_quantized:min, decode_tps:max") == {"bpw_quantized": "min", "decode_tps": "max"}


def test_methods_section9_example_front():
    """docs/METHODS.md §9: 27 assignments of three layers -> 14 Pareto points starting (2.5, 7.0), (2.6176, 6.3)..."""
    n = {"a": 4096 * 4096, "b": 4096 * 11008, "c": 11008 * 4096}
    bpw = [2.5, 3.25, 4.25]
    err = {"a": [1.0, 0.30, 0.08], "b": [2.0, 0.50, 0.12], "c": [4.0, 1.20, 0.20]}
    total = sum(n.values())
    points = []
    for choice in itertools.product(range(3), repeat=3):
        size = sum(n[l] * bpw[o] for l, o in zip("abc", choice)) / total
        points.append({"size": size, "err": round(sum(err[l][o] for l, o in zip("abc", choice)), 10)})
    front = sorted((points[i]["size"], points[i]["err"]) for i in pareto_front(points, {"size": "min", "err": "min"}))
    assert len(front) == 14
    expected = [(2.5, 7.0), (2.6176, 6.3), (2.7745, 6.08), (2.8162, 4.2)]
    assert [(round(s, 4), e) for s, e in front[:4]] == expected


# ---- reports ------------------------------------------------------------------------------------

def sweep_points(protocols=("p1",)):
    raw = []
    grid = [(2, 64, 2.56, 0.90, 60.0), (3, 64, 3.56, 0.20, 35.0), (3, 128, 3.28, 0.25, 36.0),
            (4, 64, 4.56, 0.05, 30.0), (4, 128, 4.28, 0.06, 30.5), (4, 32, 5.13, 0.06, 30.6)]
    for job, (bits, g, b, kl, ppl) in enumerate(grid):
        raw.append({"job": job, "status": "ok", "overrides": [f"params.bits={bits}", f"params.group_size={g}"],
                    "metrics": {"evaluate/bpw_quantized": b, "evaluate/kl_mean": kl, "evaluate/ppl": ppl,
                                "quantize/bpw_quantized": b},
                    "protocol_hash": protocols[job % len(protocols)], "run_dir": "", "stages": {}})
    return raw


def test_pareto_report_for_points_writes_files_and_labels(tmp_path):
    folder = pareto_report_for_points(sweep_points(), tmp_path / "pareto")
    assert folder == tmp_path / "pareto"
    doc = json.loads((folder / "pareto.json").read_text())
    front = {p["label"] for p in doc["points"] if p["on_front"]}
    # (4, 32) has 5.13 bpw and the same KL as (4, 128) at 4.28: dominated
    assert front == {"bits=2 group_size=64", "bits=3 group_size=128", "bits=3 group_size=64", "bits=4 group_size=128",
                     "bits=4 group_size=64"}
    assert doc["warning"] is None and doc["protocols"] == ["p1"]
    for name in ("bpw_kl.png", "bpw_ppl.png", "report.html", "pareto.csv"):
        assert (folder / name).is_file(), name
    assert pareto_report_for_points([{"job": 0, "status": "failed", "overrides": [], "metrics": {}}],
                                    tmp_path / "none") is None


def test_pareto_report_says_which_kl_and_which_bpw(tmp_path):
    html = (pareto_report_for_points(sweep_points(), tmp_path / "exact") / "report.html").read_text()
    assert "kl_mean = KL (exact, full vocabulary), mean, nats (lower is better)" in html
    assert "kl_mean vs bpw_quantized: KL (exact, full vocabulary), mean, nats" in html
    assert "top-k estimate" not in html
    raw = sweep_points()
    for pt in raw:
        pt["metrics"] = {"evaluate/kl_topk_mean" if k == "evaluate/kl_mean" else k: v for k, v in pt["metrics"].items()}
    folder = pareto_report_for_points(raw, tmp_path / "topk", objectives={"bpw_model": "min", "kl_topk_mean": "min"})
    assert folder is None                     # no run has bpw_model: nothing to compare
    for pt in raw:
        pt["metrics"]["evaluate/bpw_model"] = pt["metrics"]["evaluate/bpw_quantized"] + 2
    folder = pareto_report_for_points(raw, tmp_path / "topk", objectives={"bpw_model": "min", "kl_topk_mean": "min"})
    html = (folder / "report.html").read_text()
    assert "kl_topk_mean vs bpw_model: KL top-k estimate (lower bound), mean, nats" in html
    assert "bpw_model = bits/weight, whole model (unquantized tensors at their deployment dtype)" in html
    assert (folder / "bpw_kl.png").is_file()


def test_constraints_apply_before_the_front(tmp_path):
    folder = pareto_report_for_points(sweep_points(), tmp_path / "c",
                                      constraints=["evaluate/bpw_quantized<=4.5", "ppl<40"])
    doc = json.loads((folder / "pareto.json").read_text())
    by_label = {p["label"]: p for p in doc["points"]}
    assert not by_label["bits=2 group_size=64"]["feasible"]          # ppl 60
    assert not by_label["bits=4 group_size=64"]["feasible"]          # 4.56 bpw
    assert {lbl for lbl, p in by_label.items() if p["on_front"]} == {
        "bits=3 group_size=64", "bits=3 group_size=128", "bits=4 group_size=128"}


def test_mixed_protocols_are_labeled_not_compared(tmp_path):
    folder = pareto_report_for_points(sweep_points(("aaaa",) * 5 + ("bbbb",)), tmp_path / "m")
    doc = json.loads((folder / "pareto.json").read_text())
    assert doc["protocols"] == ["aaaa", "bbbb"] and "not comparable" in doc["warning"]
    # job 5 (4-bit g32, the only run of protocol bbbb) would be dominated by job 4 but is never compared with it
    assert [p["on_front"] for p in doc["points"]] == [True, True, True, True, True, True]
    assert "Mixed protocols" in (folder / "report.html").read_text()


def _report_args(target, output=None, objectives="bpw_quantized:min,kl_mean:min", constraint=(), as_json=True):
    return argparse.Namespace(target=str(target), objectives=objectives, constraint=list(constraint),
                              output=str(output) if output else None, json=as_json)


def test_cli_report_on_a_sweep_folder_and_on_an_experiment(tmp_path, runs_dir, capsys):
    sweep = runs_dir / "sweeps" / "20260101-000000-000000-grid"
    for pt in sweep_points():
        (sweep / str(pt["job"])).mkdir(parents=True)
        (sweep / str(pt["job"]) / "point.json").write_text(json.dumps(pt))
    assert cli_report(_report_args(sweep.name), runs_dir) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "sweep" and sum(p["on_front"] for p in out["points"]) == 5
    assert (runs_dir / "reports" / sweep.name / "report.html").is_file()

    from qflow.tracking import Tracker, get_run, list_artifacts

    for i, (b, kl, proto) in enumerate([(4.25, 0.02, "h1"), (3.25, 0.08, "h1"), (4.25, 0.03, "h1"), (3.0, 0.5, "h2")]):
        t = Tracker(runs_dir, "exp")
        t.start(f"r{i}", {"qflow.protocol_hash": proto})
        t.log_params({"params.bits": str(round(b)), "params.seed": "0"})
        t.log_metrics({"evaluate/bpw_quantized": b, "evaluate/kl_mean": kl})
        t.end()
    assert cli_report(_report_args("exp", tmp_path / "rep"), runs_dir) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["kind"] == "experiment" and sorted(out["protocols"]) == ["h1", "h2"]
    assert "2 different evaluation protocols" in captured.err
    on = sorted((p["values"]["bpw_quantized"], p["protocol"]) for p in out["points"] if p["on_front"])
    assert on == [(3.0, "h2"), (3.25, "h1"), (4.25, "h1")]
    run = get_run(runs_dir, out["mlflow_run_id"])
    assert run["tags"]["qflow.report.target"] == "exp"
    assert "report/report.html" in list_artifacts(runs_dir, out["mlflow_run_id"])
    # a report run never becomes a point of the next report of the same experiment
    assert cli_report(_report_args("exp", tmp_path / "rep2"), runs_dir) == 0
    assert len(json.loads(capsys.readouterr().out)["points"]) == 4

    from qflow.errors import QflowError

    with pytest.raises(QflowError, match="no runs found"):
        cli_report(_report_args("no-such-experiment"), runs_dir)
    with pytest.raises(QflowError, match="has every objective"):
        cli_report(_report_args("exp", objectives="bpw_quantized:min,decode_tps:max"), runs_dir)


# ---- end to end: a failing gate keeps the artifacts; the summary; `qflow report` ---------------

def test_failing_gate_keeps_report_artifacts_and_report_reads_the_run(tmp_path, tiny_model_dir, runs_dir, capsys):
    from qflow.tracking import get_run, list_artifacts

    extra = ("    gates: {kl_mean: {max: 0.0}}\n")
    text = tiny_recipe(tiny_model_dir).replace(
        "topk: 16, speed: false, layer_report: false}", 'topk: 16, layer_tokens: 32, speed_prefill_tokens: 32, speed_decode_tokens: 2, '
                     'speed_repeats: 1, bootstrap_resamples: 200}\n' + extra)
    recipe = write_recipe(tmp_path / "r", text)
    done = run_cli("run", str(recipe), runs_dir=runs_dir)
    assert done.returncode == 1, done.stderr
    for shown in ("evaluate/ppl ", "evaluate/ppl_ratio", "evaluate/kl_mean ", "evaluate/top1_agree",
                  "evaluate/kl_topk_mean ", "evaluate/size_bytes_deploy ", "evaluate/size_bytes_checkpoint ",
                  "evaluate/bpw_quantized", "evaluate/bpw_model", "evaluate/prefill_tps_refpath",
                  "evaluate/decode_tps_refpath", "gate FAIL evaluate/kl_mean",
                  "evaluate/kl_mean: KL (exact, full vocabulary)", "evaluate/kl_topk_mean: KL top-k estimate (lower bound)",
                  "evaluate/bpw_model: all parameters; quantized layers as stored, unquantized tensors at float16"):
        assert shown in done.stdout, shown
    assert "dequantize-then-matmul" in done.stderr          # the speed line says which path ran
    run_dir = Path(next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("run folder")))
    assert (run_dir / "report.html").is_file()
    for name in ("report.html", "layers.csv", "layers.json", "layer_sqnr.png", "kl_hist.png", "metrics.json"):
        assert (run_dir / "artifacts" / "evaluate" / name).is_file(), name
    run_id = next(line.split()[2] for line in done.stdout.splitlines() if line.startswith("mlflow run:"))
    run = get_run(runs_dir, run_id)
    assert run["status"] == "FAILED" and run["tags"]["qflow.gates"] == "failed"
    assert "artifacts/evaluate/report.html" in list_artifacts(runs_dir, run_id)
    proto = json.loads((run_dir / "artifacts" / "evaluate" / "metrics.json").read_text())["protocol_hash"]
    if "qflow.protocol_hash" in run["tags"]:                 # copied by the runner from ctx.info["tags"]
        assert run["tags"]["qflow.protocol_hash"] == proto
    assert run["tags"]["qflow.metric.kl_mean"].startswith("KL (exact, full vocabulary)")
    assert "evaluate/kl_topk_mean" in run["metrics"] and "evaluate/size_bytes_deploy" in run["metrics"]

    assert cli_report(_report_args("tiny", tmp_path / "rep"), runs_dir) == 0   # in process: no second start-up
    out = json.loads(capsys.readouterr().out)
    assert len(out["points"]) == 1 and out["points"][0]["on_front"] and out["points"][0]["protocol"] in (proto, "unknown")


# ---- HTML in headless Chromium ------------------------------------------------------------------

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


class Chromium:
    """A minimal DevTools client over ``--remote-debugging-pipe`` (fds 3/4, NUL-separated JSON): stdlib only."""

    def __init__(self, user_data_dir: Path):
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        hi_in = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        hi_out = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)

        def wire():  # in the child: the pipe ends become fds 3 (commands) and 4 (replies)
            os.dup2(hi_in, 3)
            os.dup2(hi_out, 4)

        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={user_data_dir}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     pass_fds=(3, 4), preexec_fn=wire,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_child_r, from_child_w, hi_in, hi_out):
            os.close(fd)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        reply = self.wait(lambda m, i=self._id: m.get("id") == i, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, predicate, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._r], [], [], left)[0]:
                    raise TimeoutError("Chromium did not answer in time")
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            msg = json.loads(raw)
            if predicate(msg):
                return msg
            self.events.append(msg)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def render(page: Path, user_data_dir: Path) -> tuple[list[list], list[str]]:
    """Load ``page``; return its images as [complete, naturalWidth] and every console error/exception/log error."""
    browser = Chromium(user_data_dir)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        images = browser.send("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth]))",
            "returnByValue": True}, session=session)["result"]["value"]
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush pending events
    finally:
        browser.close()
    errors = []
    for m in browser.events:
        p = m.get("params", {})
        if m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(json.dumps(p.get("args"))[:300])
        elif m.get("method") == "Runtime.exceptionThrown":
            errors.append(json.dumps(p.get("exceptionDetails"))[:300])
        elif m.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
    return json.loads(images), errors


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="/usr/bin/chromium is missing: apt-get install -y chromium")


@needs_chromium
def test_html_reports_render_in_headless_chromium(tmp_path):
    import math

    import numpy as np

    from qflow.evaluation.run_report import write_run_report

    rows = [{"index": i, "layer": f"model.layers.{i // 7}.x{i % 7}", "bits": 3 if i % 3 else 4,
             "weight_sqnr_db": 20.0 + i, "isolated_sqnr_db": (15.0 + i) if i != 4 else math.inf,
             "isolated_cos": 0.99, "accumulated_sqnr_db": 10.0 + i / 2, "accumulated_cos": 0.98,
             "worst_rank": i + 1 if i < 10 else 0} for i in range(21)]
    kl = np.random.default_rng(0).lognormal(-6, 1, size=500)
    metrics = {"ppl": 31.0, "ppl_fp": 29.4, "ppl_ratio": 1.05, "kl_mean": float(kl.mean()),
               "kl_median": float(np.median(kl)), "kl_p99": float(np.quantile(kl, 0.99)), "bpw_quantized": 4.25,
               "prefill_tps_ratio": 0.8}
    files = write_run_report(tmp_path / "run", title="evaluate <&> test", metrics=metrics,
                             protocol={"hash": "abc", "seq_len": 512}, layer_rows=rows, layer_source="eval windows",
                             kl=kl, speed={"path": "CPU: dequantize-then-matmul", "backend": "numba"}, size={})
    sweep = pareto_report_for_points(sweep_points(("p1", "p2")), tmp_path / "pareto")

    # the checker itself must see a console error and a broken image
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<img src="missing.png"><script>console.error("boom")</script></body></html>')
    images, errors = render(bad, tmp_path / "profile-0")
    assert images == [[True, 0]] and any("boom" in e for e in errors) and any("missing.png" in e for e in errors)

    for k, page in enumerate((files["html"], sweep / "report.html")):
        images, errors = render(page, tmp_path / f"profile-{k + 1}")
        assert len(images) >= 2 and all(done and width > 0 for done, width in images), (page, images)
        assert errors == [], (page, errors)


def test_one_report_over_a_mixed_precision_sweep_and_a_uniform_sweep(tmp_path, runs_dir, capsys):
    """`qflow report MIXED UNIFORM`: one Pareto set over both, each point marked with its series."""
    uniform = sweep_points()
    mixed = [{"job": j, "status": "ok", "overrides": [f"params.bpw={b}"], "protocol_hash": "p1", "run_dir": "",
              "stages": {}, "metrics": {"evaluate/bpw_quantized": b, "evaluate/kl_mean": kl, "evaluate/ppl": 31.0,
                                        "allocate/predicted_bpw": b}}
             for j, (b, kl) in enumerate([(3.0, 0.30), (3.5, 0.12), (4.25, 0.045)])]
    names = []
    for name, points in (("20260101-000000-000000-mixed", mixed), ("20260101-000000-000001-uniform", uniform)):
        for pt in points:
            (runs_dir / "sweeps" / name / str(pt["job"])).mkdir(parents=True)
            (runs_dir / "sweeps" / name / str(pt["job"]) / "point.json").write_text(json.dumps(pt))
        names.append(name)
    args = _report_args(names[0], tmp_path / "both")
    args.target = names
    assert cli_report(args, runs_dir) == 0
    out = json.loads(capsys.readouterr().out)
    series = {p["name"]: p["series"] for p in out["points"]}
    assert sum(s == "mixed" for s in series.values()) == 3 and sum(s == "uniform" for s in series.values()) == 6
    assert all(n.startswith(names[0]) == (s == "mixed") for n, s in series.items())
    front = {(p["series"], p["values"]["bpw_quantized"]) for p in out["points"] if p["on_front"]}
    # the mixed 4.25 point (KL 0.045) dominates uniform (4,128) at 4.28 and (4,64) at 4.56
    assert ("mixed", 4.25) in front and ("uniform", 4.28) not in front and ("uniform", 4.56) not in front
    assert (tmp_path / "both" / "bpw_kl.png").is_file()
