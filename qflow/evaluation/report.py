"""Pareto reports across runs: a sweep's points, an MLflow experiment, or a list of run ids.

Hard constraints first, then the N-dimensional Pareto set (strict dominance,
per-metric direction; :mod:`qflow.evaluation.pareto`), **within each evaluation
protocol**: runs whose ``qflow.protocol_hash`` differ are never compared; the
report labels each group and says so at the top (runs without a hash form the
group ``unknown``). Outputs, in one folder: ``pareto.json``, ``pareto.csv``,
``bpw_kl.png``, ``bpw_ppl.png`` (front drawn, points labeled by the parameters
that differ between runs) and ``report.html`` embedding them.

Where it is logged: ``qflow report`` logs the folder as the artifacts (under
``report/``) of a new MLflow run named ``report-<target>`` in the experiment
``qflow-reports`` (kept apart so that reports never show up as runs of the
experiment they summarize); a sweep logs it to its parent run (``pareto/``).

Example::

    qflow report llama-rtn --objectives bpw_quantized:min,kl_mean:min,decode_tps:max \\
        --constraint evaluate/bpw_quantized<=4.5
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import QflowError
from ..specs import parse_constraint
from .pareto import check_objectives, pareto_front, parse_objectives
from .protocol import TAG as PROTOCOL_TAG

DEFAULT_OBJECTIVES = {"bpw_quantized": "min", "kl_mean": "min"}
REPORT_EXPERIMENT = "qflow-reports"
UNKNOWN_PROTOCOL = "unknown"
_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
        ">": lambda a, b: a > b, "==": lambda a, b: a == b}


@dataclass
class Point:
    ref: str                                   # sweep job number or MLflow run id
    name: str
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    status: str = ""
    protocol: str = UNKNOWN_PROTOCOL
    label: str = ""
    feasible: bool = True
    violated: list[str] = field(default_factory=list)
    on_front: bool = False

    @property
    def series(self) -> str:
        """``mixed`` for a per-layer plan (an allocate-bits stage ran: ``*predicted_bpw``), else ``uniform``."""
        return "mixed" if any(k.endswith("predicted_bpw") for k in self.metrics) else "uniform"


# ---- metric names and constraints -------------------------------------------------------------

def resolve_metric(name: str, keys: Iterable[str]) -> str | None:
    """A metric key for ``name``: itself, or ``STAGE/name`` (``evaluate/`` preferred, else the first)."""
    keys = list(keys)
    if name in keys:
        return name
    matches = sorted(k for k in keys if k.rsplit("/", 1)[-1] == name)
    if not matches:
        return None
    return next((k for k in matches if k.startswith("evaluate/")), matches[0])


def _metric_value(p: Point, name: str) -> float | None:
    key = resolve_metric(name, p.metrics)
    if key is None:
        return None
    v = p.metrics[key]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def apply_constraints(points: list[Point], constraints: Iterable[str]) -> None:
    parsed = [parse_constraint(c) for c in constraints]
    for p in points:
        for (name, op, bound), text in zip(parsed, constraints):
            v = _metric_value(p, name)
            if v is None or not _OPS[op](v, bound):
                p.feasible = False
                p.violated.append(text if v is not None else f"{name} missing")


# ---- labels -----------------------------------------------------------------------------------

def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1].rsplit("/", 1)[-1]


def label_points(points: list[Point], max_items: int = 4) -> None:
    """Label each point by the parameters whose values differ between points (else by its name)."""
    keys = sorted({k for p in points for k in p.params}, key=lambda k: (len(k), k))
    differing, seen = [], set()
    for k in keys:
        column = tuple(p.params.get(k) for p in points)
        if len(set(column)) > 1 and column not in seen:   # params.bits and stages.q.with.bits: say it once
            seen.add(column)
            differing.append(k)
    shorts = [_short(k) for k in differing]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, differing)]
    for p in points:
        parts = [f"{n}={p.params.get(k, '-')}" for n, k in zip(names, differing)][:max_items]
        p.label = " ".join(parts) if parts else p.name


# ---- points from a sweep or from MLflow -------------------------------------------------------

def _overrides_params(overrides: Iterable[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        if "=" in o:
            k, v = o.split("=", 1)
            out[k.lstrip("+~")] = v
    return out


def _hashes_from_run_dir(point: dict[str, Any]) -> set[str]:
    """Protocol hashes of a sweep point: its evaluate artifacts, else the cache manifests of its stages."""
    found: set[str] = set()
    run_dir = Path(point["run_dir"]) if point.get("run_dir") else None
    if run_dir is None:
        return found
    for f in run_dir.glob("artifacts/*/metrics.json"):
        try:
            h = json.loads(f.read_text()).get("protocol_hash")
        except (OSError, ValueError):
            continue
        if h:
            found.add(h)
    if found:
        return found
    cache = run_dir.parent.parent / "cache"        # <runs>/runs/<run> -> <runs>/cache
    for st in point.get("stages", {}).values():
        key = st.get("key")
        manifest = cache / key[:2] / key / "manifest.json" if key else None
        if manifest and manifest.is_file():
            try:
                tags = (json.loads(manifest.read_text()).get("info") or {}).get("tags") or {}
            except (OSError, ValueError):
                continue
            if tags.get(PROTOCOL_TAG):
                found.add(tags[PROTOCOL_TAG])
    return found


def points_from_sweep(raw: list[dict[str, Any]]) -> list[Point]:
    out = []
    for pt in raw:
        hashes = set(filter(None, [pt.get("protocol_hash")])) or set(
            v for k, v in (pt.get("tags") or {}).items() if k == PROTOCOL_TAG) or _hashes_from_run_dir(pt)
        out.append(Point(ref=str(pt.get("job", "")), name=f"job {pt.get('job', '?')}",
                         metrics={k: float(v) for k, v in (pt.get("metrics") or {}).items()
                                  if isinstance(v, (int, float))},
                         params=_overrides_params(pt.get("overrides", [])), status=str(pt.get("status", "")),
                         protocol="+".join(sorted(hashes)) or UNKNOWN_PROTOCOL))
    return out


def points_from_runs(runs: list[dict[str, Any]]) -> list[Point]:
    return [Point(ref=r["run_id"], name=r.get("name") or r["run_id"][:8], metrics=dict(r["metrics"]),
                  params=dict(r.get("params") or {}), status=r.get("status", ""),
                  protocol=(r.get("tags") or {}).get(PROTOCOL_TAG) or UNKNOWN_PROTOCOL) for r in runs]


# ---- the report -------------------------------------------------------------------------------

@dataclass
class Report:
    folder: Path
    points: list[Point]
    objectives: dict[str, str]
    constraints: list[str]
    protocols: list[str]

    @property
    def front(self) -> list[Point]:
        return [p for p in self.points if p.on_front]

    def warning(self) -> str | None:
        if len(self.protocols) > 1:
            return (f"these runs used {len(self.protocols)} different evaluation protocols "
                    f"({', '.join(self.protocols)}): their numbers are not comparable, so each protocol gets "
                    f"its own Pareto set")
        return None

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "objectives": self.objectives, "constraints": self.constraints,
                "protocols": self.protocols, "warning": self.warning(),
                "points": [{"ref": p.ref, "name": p.name, "label": p.label, "status": p.status, "series": p.series,
                            "protocol": p.protocol, "feasible": p.feasible, "violated": p.violated,
                            "on_front": p.on_front,
                            "values": {o: _metric_value(p, o) for o in self.objectives}} for p in self.points]}


def build_report(points: list[Point], folder: Path, objectives: dict[str, str] | None = None,
                 constraints: Iterable[str] = (), title: str = "Pareto report") -> Report | None:
    """Constraints, per-protocol Pareto sets, files. None when no point has every objective."""
    objectives = dict(objectives or DEFAULT_OBJECTIVES)
    check_objectives(objectives)
    constraints = list(constraints)
    points = [p for p in points if all(_metric_value(p, o) is not None for o in objectives)]
    if not points:
        return None
    label_points(points)
    apply_constraints(points, constraints)
    protocols = list(dict.fromkeys(p.protocol for p in points))
    for proto in protocols:
        group = [p for p in points if p.protocol == proto and p.feasible]
        values = [{o: _metric_value(p, o) for o in objectives} for p in group]
        for i in pareto_front(values, objectives):
            group[i].on_front = True
    report = Report(Path(folder), points, objectives, constraints, protocols)
    _write(report, title)
    return report


def _write(report: Report, title: str) -> None:
    from . import html as H
    from .labels import metric_label
    from .plots import pareto_scatter

    folder = report.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pareto.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
    objectives = list(report.objectives)
    with open(folder / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ref", "name", "label", "protocol", "status", "feasible", "on_front", *objectives])
        for p in report.points:
            w.writerow([p.ref, p.name, p.label, p.protocol, p.status, p.feasible, p.on_front,
                        *[_metric_value(p, o) for o in objectives]])
    parts = []
    if report.warning():
        parts.append(H.note("Mixed protocols: " + report.warning() + ".", "warn"))
    better = {"min": "lower", "max": "higher"}
    parts.append(H.note("Objectives: " + ", ".join(f"{k} = {metric_label(k)} ({better[v]} is better)"
                                                   for k, v in report.objectives.items())
                        + ". Constraints: " + (", ".join(report.constraints) or "none")
                        + ". Pareto set by strict dominance, per protocol; red: on the set."))
    feasible = [p for p in report.points if p.feasible]
    x_name = next((o for o in report.objectives if o.startswith("bpw")), "bpw_quantized")
    # the KL axis follows the objectives: the exact KL unless only the top-k estimate is asked for
    kl_name = next((o for o in report.objectives if o.startswith("kl_")), "kl_mean")
    for y_name, fname in ((kl_name, "bpw_kl.png"), ("ppl", "bpw_ppl.png")):
        pts = [p for p in feasible if _metric_value(p, x_name) is not None and _metric_value(p, y_name) is not None]
        if not pts:
            continue
        path = pareto_scatter([_metric_value(p, x_name) for p in pts], [_metric_value(p, y_name) for p in pts],
                              [p.label for p in pts], [i for i, p in enumerate(pts) if p.on_front],
                              _groups(pts), folder / fname, xlabel=metric_label(x_name),
                              ylabel=metric_label(y_name), title=f"{y_name} vs {x_name}")
        parts.append(H.section(f"{y_name} vs {x_name}: {metric_label(y_name)}", H.image(path, f"{y_name} vs {x_name}")))
    header = ["on set", "protocol", "label", "name", "status", *objectives, "excluded by"]
    ordered = sorted(report.points, key=lambda p: (p.protocol, not p.on_front, not p.feasible,
                                                   [_metric_value(p, o) * (1 if d == "min" else -1)
                                                    for o, d in report.objectives.items()]))
    rows = [["yes" if p.on_front else "", p.protocol, p.label, p.name, p.status,
             *[_metric_value(p, o) for o in objectives], "; ".join(p.violated)] for p in ordered]
    parts.append(H.section("Runs", H.table(header, rows, ["front" if p.on_front else "" for p in ordered])))
    H.write_page(folder / "report.html", title, parts)


def _groups(points: list[Point]) -> list[str]:
    """Plot groups: the series (mixed precision vs uniform) when both occur, and the protocol when several do."""
    series = len({p.series for p in points}) > 1
    protocols = len({p.protocol for p in points}) > 1
    names = {"mixed": "mixed precision (allocate-bits)", "uniform": "uniform"}
    return [", ".join(filter(None, [names[p.series] if series else "", f"protocol {p.protocol}" if protocols else ""]))
            or "all" for p in points]


def pareto_report_for_points(points: list[dict[str, Any]], folder: Path,
                             objectives: dict[str, str] | None = None,
                             constraints: Iterable[str] = ()) -> Path | None:
    """The sweep hook: a Pareto report of a sweep's points in ``folder`` (None when nothing to compare)."""
    try:
        report = build_report(points_from_sweep(points), Path(folder), objectives, constraints,
                              title=f"Pareto report: sweep {Path(folder).parent.name}")
    except Exception as exc:  # the sweep's results stand without the report: say why it is missing
        print(f"warning: no Pareto report for this sweep ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    return report.folder if report else None


# ---- qflow report -----------------------------------------------------------------------------

def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "report"


def _sweep_dir(target: str, runs_root: Path) -> Path | None:
    for cand in (Path(target), runs_root / "sweeps" / target):
        if cand.is_dir() and any(cand.glob("*/point.json")):
            return cand
    return None


def load_target(target: str, runs_root: Path) -> tuple[str, list[Point]]:
    """(kind, points) of a sweep folder/name, comma-separated run ids, or an experiment name."""
    sweep = _sweep_dir(target, runs_root)
    if sweep is not None:
        raw = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/point.json"), key=lambda p: int(p.parent.name))]
        return "sweep", points_from_sweep(raw)
    from ..tracking import search_runs

    ids = [t.strip() for t in target.split(",") if t.strip()]
    if "," in target or re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            runs = search_runs(runs_root, run_ids=ids)
        except Exception as exc:  # mlflow raises its own error type for an unknown id
            raise QflowError(f"cannot read MLflow run(s) {target}: {exc}".splitlines()[0], where="qflow report",
                             fix="check the run ids (qflow ui lists them)") from None
        return "runs", points_from_runs(runs)
    runs = search_runs(runs_root, experiment=target)
    runs = [r for r in runs if not r["tags"].get("qflow.report") and r["tags"].get("qflow.sweep") != "parent"]
    if not runs:
        raise QflowError(f"no runs found for '{target}'", where="qflow report",
                         fix="give an experiment name (the recipe's name), a sweep folder or its name under "
                             f"{runs_root / 'sweeps'}, or MLflow run ids separated by commas")
    return "experiment", points_from_runs(runs)


def cli_report(args, runs_root: Path) -> int:
    """``qflow report TARGET [--objectives ...] [--constraint ...] [-o DIR] [--json]``."""
    runs_root = Path(runs_root)
    try:
        objectives = parse_objectives(args.objectives) if args.objectives else dict(DEFAULT_OBJECTIVES)
    except ValueError as exc:
        raise QflowError(str(exc), where="qflow report --objectives",
                         fix="write metric:min|max pairs, e.g. bpw_quantized:min,kl_mean:min") from None
    for c in args.constraint or []:
        parse_constraint(c, where="qflow report --constraint")
    targets = args.target if isinstance(args.target, list) else [args.target]
    kinds, points = [], []
    for target in targets:
        kind, pts = load_target(target, runs_root)
        if len(targets) > 1:
            for p in pts:
                p.name = f"{target}: {p.name}"
        kinds.append(kind)
        points += pts
    kind = "+".join(dict.fromkeys(kinds))
    args.target = " + ".join(targets)
    folder = Path(args.output) if args.output else runs_root / "reports" / _safe_name("+".join(targets))
    report = build_report(points, folder, objectives, args.constraint or [],
                          title=f"Pareto report: {kind} {args.target}")
    if report is None:
        have = sorted({k for p in points for k in p.metrics})
        raise QflowError(f"none of the {len(points)} runs of {args.target} has every objective "
                         f"({', '.join(objectives)})", where="qflow report",
                         fix=f"choose objectives among the recorded metrics: {', '.join(have[:40]) or 'none'}")
    run_id = _log_report(runs_root, args.target, kind, report)
    if report.warning():
        print(f"warning: {report.warning()}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({**report.to_json(), "kind": kind, "mlflow_run_id": run_id}, default=str))
        return 0
    print(f"{kind} {args.target}: {len(report.points)} runs, objectives "
          + ", ".join(f"{k}:{v}" for k, v in objectives.items()))
    for proto in report.protocols:
        front = [p for p in report.front if p.protocol == proto]
        print(f"Pareto set (protocol {proto}): {len(front)} of "
              f"{sum(p.protocol == proto for p in report.points)}")
        for p in sorted(front, key=lambda p: [_metric_value(p, o) for o in objectives]):
            values = " ".join(f"{o}={_metric_value(p, o):.5g}" for o in objectives)
            print(f"  {p.label:<40} {values}  ({p.name})")
    infeasible = [p for p in report.points if not p.feasible]
    if infeasible:
        print(f"{len(infeasible)} runs excluded by constraints")
    print(f"report: {report.folder / 'report.html'}")
    if run_id:
        print(f"mlflow run: {run_id} (experiment {REPORT_EXPERIMENT})")
    return 0


def _log_report(runs_root: Path, target: str, kind: str, report: Report) -> str | None:
    try:
        from ..tracking import Tracker

        tracker = Tracker(runs_root, REPORT_EXPERIMENT)
        run_id = tracker.start(f"report-{_safe_name(target)}", {"qflow.report": "1", "qflow.report.target": target,
                                                              "qflow.report.kind": kind})
        tracker.log_params({"objectives": ",".join(f"{k}:{v}" for k, v in report.objectives.items()),
                            "constraints": ";".join(report.constraints), "target": target})
        tracker.log_artifacts(report.folder, "report")
        tracker.end("FINISHED")
        return run_id
    except Exception as exc:  # the files are written; tracking must not lose them
        print(f"warning: MLflow tracking failed ({type(exc).__name__}: {exc}); the report is in {report.folder}",
              file=sys.stderr)
        return None
