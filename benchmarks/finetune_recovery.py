"""How much of the 3-bit loss each fine-tune stage recovers, on the bundled model.

For each starting point (``quantize.rtn`` and ``quantize.awq``, W3 g64, their recipe
defaults: RTN asym_z, AWQ asym_a + clip search) and each fine-tune method it runs
``recipes/llama-w3-finetune.yaml`` through the CLI twice in one runs folder, so
calibration and the start are computed once and shared:

* before: ``~stages.finetune stages.evaluate.needs=[quantize]``: the start alone;
* after:  ``stages.finetune.uses=<method> params.ft_steps=<budget>``.

It prints, per (start, method): exact full-vocabulary KL(p_fp || p_q) per token
(``evaluate/kl_mean``, nats) and perplexity on the evaluation text (zoo:lee-news, never
trained on: the fine-tune trains on zoo:wiki-pages calibration windows), before and
after, the ratio after/before, the fine-tune stage's seconds, and the load average
(other processes share this machine). Budgets (``--steps``) are per block for
finetune.blockwise and in total for the others.

    .venv/bin/python benchmarks/finetune_recovery.py                                # everything
    .venv/bin/python benchmarks/finetune_recovery.py --starts rtn --methods blockwise
    .venv/bin/python benchmarks/finetune_recovery.py --steps blockwise=25 distill=100 --n-eval-windows 16
    .venv/bin/python benchmarks/finetune_recovery.py --methods distill qat lora --precision bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/llama-w3-finetune.yaml"
STARTS = {"rtn": "quantize.rtn", "awq": "quantize.awq"}
METHODS = {"blockwise": "finetune.blockwise", "distill": "finetune.distill", "qat": "finetune.qat",
           "lora": "finetune.lora"}
DEFAULT_STEPS = {"blockwise": 30, "distill": 90, "qat": 60, "lora": 60}


def loadavg() -> float:
    return os.getloadavg()[0]


def qflow(runs_dir: Path, overrides: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "qflow.cli", "--runs-dir", str(runs_dir), "run", RECIPE, *overrides, "--json", "--no-track"]
    print("$ qflow " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    js = next((json.loads(line) for line in reversed(r.stdout.splitlines()) if line.startswith("{")), None)
    if js is None or "evaluate/kl_mean" not in js.get("metrics", {}):
        return {"ok": False, "error": (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]}
    m = js["metrics"]
    return {"ok": True, "kl": m["evaluate/kl_mean"], "ppl": m["evaluate/ppl"], "ppl_fp": m.get("evaluate/ppl_fp"),
            "ft_seconds": js["stages"].get("finetune", {}).get("seconds"), "wall": time.perf_counter() - t0,
            "status": js["stages"].get("finetune", {}).get("status")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", nargs="*", default=[], help="method=N budgets (default: %s)" % DEFAULT_STEPS)
    ap.add_argument("--n-eval-windows", type=int, default=None, help="evaluation windows (default: the recipe's protocol)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench-finetune")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--extra", action="append", default=[], metavar="METHOD:OVERRIDE",
                    help="an extra override for one method's run, e.g. qat:+stages.finetune.with.init=start")
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                    help="the end-to-end methods' (distill, qat, lora) training precision; blockwise stays fp32")
    args = ap.parse_args()
    steps = dict(DEFAULT_STEPS)
    for item in args.steps:
        k, _, v = item.partition("=")
        steps[k] = int(v)
    common = [f"params.n_eval_windows={args.n_eval_windows}"] if args.n_eval_windows else []
    rows = []
    for start in args.starts:
        base = common + [f"stages.quantize.uses={STARTS[start]}"]
        before = qflow(args.runs_dir, base + ["~stages.finetune", "~stages.export", "stages.evaluate.needs=[quantize]"],
                       args.timeout)
        for method in args.methods:
            load0 = loadavg()
            precision = args.precision if method != "blockwise" else "float32"
            extra = [f"+stages.finetune.with.precision={precision}"] if precision != "float32" else []
            mine = [e.split(":", 1)[1] for e in args.extra if e.split(":", 1)[0] == method]
            extra += mine
            after = qflow(args.runs_dir, base + [f"stages.finetune.uses={METHODS[method]}",
                                                 f"params.ft_steps={steps[method]}", "~stages.export", *extra],
                          args.timeout)
            label = method if precision == "float32" else f"{method} (bf16)"
            if mine:
                label += " " + " ".join(o.rsplit(".", 1)[-1] for o in mine)
            rows.append({"start": start, "method": label, "steps": steps[method], "before": before, "after": after,
                         "load": (load0 + loadavg()) / 2})
            print(row_text(rows[-1]), flush=True)
    print()
    print(table(rows))


def _ratio(a, b) -> str:
    return f"{a / b:.3f}" if a is not None and b else "n/a"


def row_text(row: dict) -> str:
    b, a = row["before"], row["after"]
    if not (b.get("ok") and a.get("ok")):
        return f"{row['start']} W3 g64 + {row['method']}: failed: {b.get('error') or a.get('error')}"
    return (f"{row['start']} W3 g64 + {row['method']} ({row['steps']} steps): KL {b['kl']:.4f} -> {a['kl']:.4f} "
            f"(x{a['kl'] / b['kl']:.3f}), ppl {b['ppl']:.2f} -> {a['ppl']:.2f} (float {b.get('ppl_fp') or float('nan'):.2f}), "
            f"fine-tune {a['ft_seconds']:.0f} s ({a['status']}), load {row['load']:.1f}")


def table(rows: list[dict]) -> str:
    lines = ["| start W3 g64 | method | steps | KL before | KL after | KL after/before | ppl before | ppl after "
             "| ppl after/before | fine-tune s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        if not (b.get("ok") and a.get("ok")):
            lines.append(f"| {r['start']} | {r['method']} | {r['steps']} | failed: {b.get('error') or a.get('error')} |||||||")
            continue
        lines.append(f"| {r['start']} | {r['method']} | {r['steps']} | {b['kl']:.4f} | {a['kl']:.4f} | {_ratio(a['kl'], b['kl'])} "
                     f"| {b['ppl']:.2f} | {a['ppl']:.2f} | {_ratio(a['ppl'], b['ppl'])} | {a['ft_seconds']:.0f} "
                     f"| {r['load']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
