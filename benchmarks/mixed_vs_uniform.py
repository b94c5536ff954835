"""Mixed precision vs uniform quantization at the same size, on the bundled model.

For each base method (AWQ, RTN) and each budget B (bits per weight over the quantized
decoder linears, as stored: codes + scales + zeros, ``evaluate/bpw_quantized_measured``):

* the allocated plan: ``recipes/llama-mixed.yaml`` (calibrate -> sensitivity-analyze ->
  allocate-bits with ``params.bpw=B`` -> quantize with the plan -> evaluate), its realised bpw
  and the allocate stage's predicted bpw;
* every uniform configuration of the same method (bits {2, 3, 4} x group {32, 64, -1 = per
  output channel}; 128 does not divide the model's 576-wide inputs) whose stored bpw is
  <= the largest budget, run through ``recipes/llama-<method>.yaml``; the "best uniform" at B is
  the one with the lowest exact KL among those whose measured bpw <= B;
* the ratio plan KL / best uniform KL (target <= 0.85) and |realised bpw - B| (target <= 0.01).

Protocol (docs/PROTOCOL.md): evaluation on all 147 windows of ``zoo:lee-news`` (512 tokens,
exact full-vocabulary KL(p_fp || p_q) per scored token, ``kl_mean``; PPL = exp(mean NLL));
calibration = protocol ``ci`` (the first 32 windows of ``zoo:wiki-pages``, AWQ search on 4096
tokens per block), the same for every point. All points share one runs folder
(``--runs-dir``), so calibrate, the float reference and sensitivity are computed once and a
re-run of this script recomputes nothing it already has; evaluate's per-layer report and
speed pass are off (they do not change ppl / KL).

Usage (repository root, qflow's venv)::

    .venv/bin/python benchmarks/mixed_vs_uniform.py                    # awq + rtn, budgets 3.0 3.5 4.25
    .venv/bin/python benchmarks/mixed_vs_uniform.py --methods rtn --phase uniform
    .venv/bin/python benchmarks/mixed_vs_uniform.py --estimator kl-fit --no-results

Appends the table (date, machine load) to ``benchmarks/RESULTS.md`` under
"## Mixed precision vs uniform" unless ``--no-results``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QFLOW = ROOT / ".venv" / "bin" / "qflow"
RECIPES = {"awq": "recipes/llama-awq.yaml", "rtn": "recipes/llama-rtn.yaml"}
UNIFORM_ASYM = {"awq": ["params.zero_point=true"], "rtn": ["params.scheme=asym_z"]}
EVAL = ["params.n_eval_windows=null", "+stages.evaluate.with.layer_report=false",
        "+stages.evaluate.with.speed=false"]
# the mixed recipe's quantize stage is AWQ; for RTN the plan is priced on RTN's grid (asym_z)
MIXED_METHOD = {"awq": [], "rtn": ["stages.quantize.uses=quantize.rtn", "~stages.quantize.with.n_search_tokens",
                               "stages.sensitivity.with.method=rtn"]}
TARGET_KL_RATIO = 0.85
TARGET_BPW_GAP = 0.01


def log(msg: str) -> None:
    print(f"[mixed-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return os.getloadavg()[0]


def qflow(args: list[str], runs_dir: Path, timeout: float) -> dict:
    cmd = [str(QFLOW), "--runs-dir", str(runs_dir), "run", *args, "--json", "--no-track"]
    log(" ".join(cmd[3:]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    wall = time.perf_counter() - t0
    js = next((json.loads(line) for line in reversed(r.stdout.splitlines()) if line.startswith("{")), None)
    if js is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": " | ".join(tail)[:400], "wall_s": wall}
    m = js.get("metrics", {})
    if "evaluate/kl_mean" not in m:
        failed = {k: v.get("error") for k, v in js.get("stages", {}).items() if v.get("status") == "failed"}
        return {"ok": False, "error": str(failed)[:400], "wall_s": wall}
    return {"ok": True, "wall_s": wall, "kl": m["evaluate/kl_mean"], "ppl": m["evaluate/ppl"],
            "ppl_fp": m.get("evaluate/ppl_fp"), "bpw": m["evaluate/bpw_quantized_measured"],
            "predicted_bpw": m.get("allocate/predicted_bpw"),
            "statuses": {k: v.get("status") for k, v in js.get("stages", {}).items()}}


def _drop_export(recipe: str) -> list[str]:
    """This comparison is quantize + evaluate: drop the recipe's export stage and evaluate's gates where it has them."""
    text = (ROOT / recipe).read_text()
    return (["~stages.export"] if "\n  export:" in text else []) + (["~stages.evaluate.gates"] if "gates:" in text else [])


def uniform_grid(method: str, max_budget: float) -> list[tuple[int, int, float]]:
    """(bits, group, stored bpw over the model's decoder linears) with bpw <= max_budget, computed from shapes."""
    sys.path.insert(0, str(ROOT))
    from qflow.evaluation.sensitivity import METHOD_SPECS
    from qflow.quant.ir import layer_nbytes
    from qflow.quant.spec import QuantSpec

    shapes = model_shapes()
    n = sum(o * i for o, i in shapes)
    out = []
    for bits in (2, 3, 4):
        for group in (32, 64, -1):
            spec = QuantSpec(bits=bits, group_size=group, scale_dtype="float16", **METHOD_SPECS[method])
            bpw = 8.0 * sum(layer_nbytes(spec, o, i) for o, i in shapes) / n
            if bpw <= max_budget + 1e-9:
                out.append((bits, group, bpw))
    return out


def model_shapes() -> list[tuple[int, int]]:
    """[out, in] of every decoder linear of SmolLM2-135M (hidden 576, MLP 1536, 30 blocks, 9 heads / 3 KV heads).

    Only used to skip uniform points that can never fit the largest budget; the table uses the
    bpw each run measures.
    """
    h, f, kv, n = 576, 1536, 192, 30
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="awq,rtn")
    p.add_argument("--budgets", default="3.0,3.5,4.25")
    p.add_argument("--estimator", default=None, help="sensitivity estimator (default: the recipe's)")
    p.add_argument("--phase", choices=["all", "uniform", "mixed"], default="all")
    p.add_argument("--uniform", default=None,
                   help="bits:group list to measure (default: every uniform point of the grid that fits the largest "
                        "budget), e.g. 2:32,3:-1,3:32,4:-1")
    p.add_argument("--mixed-first", action="store_true", help="run the plans before the uniform points")
    p.add_argument("--table-from-log", action="store_true",
                   help="run nothing: build the table from the points logged in <runs-dir>/mixed_vs_uniform.jsonl "
                        "(the latest successful entry of each point; e.g. after runs split over several invocations)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench-mixed")
    p.add_argument("--extra", action="append", default=[], help="extra override for the mixed runs")
    p.add_argument("--timeout", type=float, default=3 * 3600)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    load0 = loadavg()
    t_start = time.perf_counter()
    if args.table_from_log:
        return _table_from_log(args, methods, budgets)
    uniform: dict[str, list[dict]] = {m: [] for m in methods}
    mixed: dict[tuple[str, float], dict] = {}
    wanted = None if args.uniform is None else [tuple(int(v) for v in x.split(":")) for x in args.uniform.split(",")]
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    points_log = args.runs_dir / "mixed_vs_uniform.jsonl"   # every point as it finishes (survives an interrupted run)
    for method in methods:
        def run_uniform():
            grid = uniform_grid(method, max(budgets))
            if wanted is not None:
                grid = sorted((x for x in grid if x[:2] in wanted), key=lambda x: wanted.index(x[:2]))
            for bits, group, bpw in grid:
                r = qflow([RECIPES[method], f"params.bits={bits}", f"params.group_size={group}",
                           *UNIFORM_ASYM[method], *EVAL, *_drop_export(RECIPES[method])],
                          args.runs_dir, args.timeout)
                r |= {"bits": bits, "group": group, "bpw_nominal_shapes": bpw}
                log(f"  uniform {method} W{bits} g{group}: {_fmt(r)}")
                _append(points_log, {"kind": "uniform", "method": method, **r})
                uniform[method].append(r)

        def run_mixed():
            for b in budgets:
                extra = [f"params.bpw={b}", *MIXED_METHOD[method], *EVAL, *_drop_export("recipes/llama-mixed.yaml"),
                         *args.extra]
                if args.estimator:
                    extra.append(f"params.estimator={args.estimator}")
                r = qflow(["recipes/llama-mixed.yaml", *extra], args.runs_dir, args.timeout)
                log(f"  mixed {method} bpw {b}: {_fmt(r)}")
                _append(points_log, {"kind": "mixed", "method": method, "budget": b, **r})
                mixed[(method, b)] = r

        phases = [("mixed", run_mixed), ("uniform", run_uniform)]
        for name, fn in (phases if args.mixed_first else phases[::-1]):
            if args.phase in ("all", name):
                fn()
    if args.phase != "all":
        return 0
    header = (f"\n### {_dt.date.today().isoformat()} — estimator {args.estimator or 'recipe default'}; "
              f"load {load0:.1f} -> {loadavg():.1f} (2-core machine), {time.perf_counter() - t_start:.0f} s\n")
    return _report(args, methods, budgets, uniform, mixed, header)


def _table_from_log(args, methods, budgets) -> int:
    uniform: dict[str, dict] = {m: {} for m in methods}
    mixed: dict[tuple[str, float], dict] = {}
    walls = []
    for line in (args.runs_dir / "mixed_vs_uniform.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not row.get("ok") or row.get("method") not in methods:
            continue
        walls.append(row["wall_s"])
        if row["kind"] == "uniform":
            uniform[row["method"]][(row["bits"], row["group"])] = row
        elif row["budget"] in budgets:
            mixed[(row["method"], row["budget"])] = row
    header = (f"\n### {_dt.date.today().isoformat()} — estimator {args.estimator or 'recipe default'}; "
              f"points logged in {args.runs_dir.name}/mixed_vs_uniform.jsonl (wall per point "
              f"{min(walls, default=0):.0f}-{max(walls, default=0):.0f} s on the 2-core machine under load)\n")
    return _report(args, methods, budgets, {m: list(v.values()) for m, v in uniform.items()}, mixed, header)


def _report(args, methods, budgets, uniform, mixed, header) -> int:
    lines = table(methods, budgets, uniform, mixed)
    text = header + "\n".join(lines) + "\n"
    print(text)
    if not args.no_results:
        path = ROOT / "benchmarks" / "RESULTS.md"
        content = path.read_text()
        if "## Mixed precision vs uniform" not in content:
            content += ("\n## Mixed precision vs uniform (benchmarks/mixed_vs_uniform.py)\n\n"
                        "Protocol: all 147 evaluation windows (exact KL, `kl_mean`), calibration = protocol ci "
                        "(32 windows, AWQ search on 4096 tokens); bpw = stored bytes of the decoder linears x 8 / "
                        "their weights (`bpw_quantized_measured`). Best uniform = lowest KL among the uniform "
                        "configurations of the same method with measured bpw <= the budget.\n")
        path.write_text(content + text)
    ok = all(r.get("pass") for r in _rows(methods, budgets, uniform, mixed))
    return 0 if ok else 1


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **row}, default=str) + "\n")


def _fmt(r: dict) -> str:
    if not r.get("ok"):
        return f"FAILED: {r.get('error')}"
    return f"KL {r['kl']:.4f} ppl {r['ppl']:.2f} bpw {r['bpw']:.4f} ({r['wall_s']:.0f} s)"


def _rows(methods, budgets, uniform, mixed) -> list[dict]:
    rows = []
    for method in methods:
        for b in budgets:
            plan = mixed.get((method, b), {})
            fits = [u for u in uniform[method] if u.get("ok") and u["bpw"] <= b + 1e-9]
            best = min(fits, key=lambda u: u["kl"]) if fits else None
            row = {"method": method, "budget": b, "plan": plan, "best": best}
            if plan.get("ok") and best:
                row["ratio"] = plan["kl"] / best["kl"]
                row["gap"] = abs(plan["bpw"] - b)
                row["pass"] = row["ratio"] <= TARGET_KL_RATIO and row["gap"] <= TARGET_BPW_GAP
            rows.append(row)
    return rows


def table(methods, budgets, uniform, mixed) -> list[str]:
    out = ["| method | budget bpw | plan bpw (predicted / realised) | plan KL | plan ppl | best uniform | "
           "its bpw | its KL | its ppl | KL ratio plan/uniform | target |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in _rows(methods, budgets, uniform, mixed):
        plan, best = row["plan"], row["best"]
        pcol = (f"{plan.get('predicted_bpw', float('nan')):.4f} / {plan['bpw']:.4f} | {plan['kl']:.4f} | "
                f"{plan['ppl']:.2f}" if plan.get("ok") else f"failed: {plan.get('error', 'not run')[:80]} | | ")
        bcol = (f"W{best['bits']} g{best['group']} | {best['bpw']:.4f} | {best['kl']:.4f} | {best['ppl']:.2f}"
                if best else "none fits | | | ")
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else "n/a"
        verdict = ("met" if row.get("pass") else "missed") if "ratio" in row else "n/a"
        out.append(f"| {row['method']} | {row['budget']} | {pcol} | {bcol} | {ratio} | "
                   f"<= {TARGET_KL_RATIO}, gap <= {TARGET_BPW_GAP}: {verdict} |")
    out.append("")
    out.append("Uniform points measured: " + "; ".join(
        f"{m} W{u['bits']} g{u['group']}: bpw {u['bpw']:.3f} KL {u['kl']:.4f} ppl {u['ppl']:.2f}"
        for m in methods for u in uniform[m] if u.get("ok")))
    return out


if __name__ == "__main__":
    sys.exit(main())
