"""Side-by-side benchmark: qflow's ``finetune.blockwise`` vs auto-round's SignRound (the peer).

Same model (qflow's float folder of ``zoo:smollm2-135m``), same calibration token ids (the
first ``--n-calib`` 512-token windows of ``zoo:wiki-pages``, exactly what qflow's ``calibrate``
stage uses), same evaluation (``zoo:lee-news``, ``--n-eval-windows`` windows of 512 tokens, all
147 by default; exact full-vocabulary KL(p_fp || p_q) per scored token, PPL = exp(mean NLL)).
Uniform W``b`` g64 asymmetric integer weights for every decoder Linear; embeddings and the tied
head float. For each ``--bits`` b, back to back:

* the peer in ``benchmarks/.autoround-venv`` (torch 2.13.0 CPU, auto-round 0.16.1) through
  ``benchmarks/_signround_worker.py``: SignRound with ``iters=--iters``, ``batch_size=--batch-size``,
  ``nsamples=n_calib``, seqlen 512, auto-round's defaults otherwise (lr 1/iters, min/max tuning,
  quantized inputs, the iteration of lowest training loss kept), fp32; verified to hold at most
  2^b values per group of 64; timed around ``quantize()``;
* qflow: ``recipes/llama-w3-finetune.yaml`` (calibrate -> quantize.rtn Wb g64 ASYM-Z ->
  finetune.blockwise -> evaluate) with ``params.ft_steps=--iters`` (per block, as auto-round's
  iters), ``params.ft_batch=--batch-size``, ``params.n_calib=n_calib`` and
  ``params.ft_heldout=--qflow-heldout`` (0 by default: both tools train on the same n windows;
  with h > 0 qflow trains on n - h and keeps the parameters of the best held-out block MSE);
  seconds = calibrate + quantize + finetune (a cached calibrate is charged what it took when
  it ran earlier in this benchmark, or in the run of the same runs folder that computed it).

Targets (issue 14): KL ratio qflow/peer <= 1.00 and time ratio <= 1.0.

    .venv/bin/python benchmarks/peer_signround.py                          # W3 and W4, 25 iters, 16 windows
    .venv/bin/python benchmarks/peer_signround.py --bits 3 --iters 2 --n-calib 4 --n-eval-windows 4 --no-results

Prints one table and appends it to ``benchmarks/RESULTS.md`` under "## Peer: auto-round SignRound"
unless ``--no-results``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Peer: auto-round SignRound"
GROUP = 64
TARGET_KL, TARGET_TIME = 1.0, 1.0


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def log(msg: str) -> None:
    print(f"[peer-sr {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_peer(bits: int, args, inputs: dict, work: Path, peer_py: Path) -> dict:
    out_json = work / f"peer-signround-w{bits}.json"
    cmd = [str(peer_py), str(HERE / "_signround_worker.py"), "--model", inputs["model_dir"], "--calib", inputs["calib"],
           "--eval", inputs["eval"], "--bits", str(bits), "--group-size", str(GROUP), "--iters", str(args.iters),
           "--batch-size", str(args.batch_size), "--out", str(out_json)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log(f"peer  W{bits}: auto-round SignRound, {args.iters} iters")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout:.0f} s"}
    (work / f"peer-signround-w{bits}.stderr.txt").write_text(r.stderr or "")
    out = {"wall_s": time.perf_counter() - t0, "load_start": load0, "load_end": os.getloadavg()[0]}
    if r.returncode != 0 or not out_json.exists():
        tail = [ln for ln in (r.stderr or "").splitlines() if ln.strip()][-1:] or ["no output"]
        return out | {"ok": False, "error": tail[0][:300]}
    res = json.loads(out_json.read_text())
    return out | {"ok": True, "kl": res["kl_full_mean"], "ppl": res["ppl"], "ppl_fp": res["ppl_fp"],
                  "seconds": res["seconds"], "max_distinct": res["max_distinct"], "settings": res.get("settings"),
                  "peak_rss_bytes": res.get("peak_rss_bytes")}


def run_qflow(bits: int, args, runs_dir: Path, work: Path, produced: dict) -> dict:
    cmd = [sys.executable, "-m", "qflow.cli", "--runs-dir", str(runs_dir), "run", "recipes/llama-w3-finetune.yaml",
           f"params.bits={bits}", f"params.group_size={GROUP}", f"params.n_calib={args.n_calib}",
           f"params.ft_steps={args.iters}", f"params.ft_batch={args.batch_size}", f"params.ft_heldout={args.qflow_heldout}",
           f"params.n_eval_windows={args.n_eval_windows or 'null'}", "stages.finetune.uses=finetune.blockwise",
           "+stages.evaluate.with.layer_report=false", "+stages.evaluate.with.speed=false", "~stages.export",
           "--json", "--no-track"]
    log(f"qflow W{bits}: {' '.join(cmd[6:])}")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout:.0f} s"}
    (work / f"qflow-w{bits}.stderr.txt").write_text(r.stderr or "")
    out = {"wall_s": time.perf_counter() - t0, "load_start": load0, "load_end": os.getloadavg()[0], "cmd": cmd[3:]}
    js = next((json.loads(ln) for ln in reversed((r.stdout or "").splitlines()) if ln.startswith("{")), None)
    if js is None or "evaluate/kl_mean" not in js.get("metrics", {}):
        tail = [ln for ln in (r.stderr or "").splitlines() if ln.strip()][-1:] or ["no output"]
        return out | {"ok": False, "error": tail[0][:300]}
    st, m = js["stages"], js["metrics"]
    seconds, charged = _load("peer_autoround").charge_stages(st, runs_dir, produced, ("calibrate", "quantize", "finetune"))
    return out | {"ok": True, "kl": m["evaluate/kl_mean"], "ppl": m["evaluate/ppl"], "ppl_fp": m.get("evaluate/ppl_fp"),
                  "seconds": seconds, "charged_cached": charged,
                  "stage_seconds": {k: (v.get("status"), v.get("seconds")) for k, v in st.items()}}


def _f(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| weights | peer KL | peer ppl | peer s | qflow KL | qflow ppl | qflow s | KL ratio qflow/peer "
             "| time ratio qflow/peer | target | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, q = r["peer"], r["qflow"]
        kl = q["kl"] / p["kl"] if p.get("ok") and q.get("ok") else None
        tm = q["seconds"] / p["seconds"] if p.get("ok") and q.get("ok") else None
        verdict = "—" if kl is None else ("met" if kl <= TARGET_KL and tm <= TARGET_TIME else
                                          f"{'KL met' if kl <= TARGET_KL else 'KL missed'}, "
                                          f"{'time met' if tm <= TARGET_TIME else 'time missed'}")
        loads = [d[k] for d in (p, q) for k in ("load_start", "load_end") if k in d]
        lines.append(f"| W{r['bits']} g{GROUP} asym | " + (f"{p['kl']:.4f} | {p['ppl']:.2f} | {p['seconds']:.0f}"
                                                          if p.get("ok") else f"FAILED: {p.get('error')} | | ")
                     + " | " + (f"{q['kl']:.4f} | {q['ppl']:.2f} | {q['seconds']:.0f}" if q.get("ok")
                                else f"FAILED: {q.get('error')} | | ")
                     + f" | {_f(kl, '.3f')} | {_f(tm, '.2f')} | KL <= {TARGET_KL}, time <= {TARGET_TIME}: {verdict} | "
                     + (f"{min(loads):.1f}-{max(loads):.1f}" if loads else "—") + " |")
    return "\n".join(lines)


def report(rows, args, inputs, versions, elapsed, date) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    settings = next((r["peer"].get("settings") for r in rows if r["peer"].get("ok")), None)
    fp = next((r["qflow"].get("ppl_fp") for r in rows if r["qflow"].get("ok")), None)
    return "\n".join([
        f"### {date}: SignRound vs finetune.blockwise, {args.iters} iterations per block, batch {args.batch_size}, "
        f"n_calib={args.n_calib}, n_eval_windows={args.n_eval_windows or 147}",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; the tools ran back "
        f"to back per row (load column: 1-min load average at their starts and ends). Total {elapsed / 60:.1f} min. "
        f"qflow commit {commit}: `qflow run {' '.join(rows[0]['qflow'].get('cmd', [])[3:]) if rows else ''}` "
        f"(per row params.bits). Peer: auto-round {versions.get('auto-round')}, torch {versions.get('torch')}, "
        f"settings {json.dumps(settings)}; calibration loader replaced by qflow's token ids; verified per decoder "
        "Linear: the row's bits, group 64 asym, <= 2^bits values per group, differs from float; embeddings unchanged.",
        f"Data: calibration zoo:wiki-pages {inputs['calib_shape']} sha256 {inputs['calib_sha256'][:16]}…, evaluation "
        f"zoo:lee-news {inputs['eval_shape']} sha256 {inputs['eval_sha256'][:16]}…; float ppl {_f(fp, '.3f')}. "
        f"qflow trains on {args.n_calib - args.qflow_heldout} of the windows and holds out {args.qflow_heldout}.",
        "",
        table(rows),
        "",
        "KL = mean exact full-vocabulary KL(p_fp‖p_q) per scored token. Seconds: peer `quantize()` wall vs qflow "
        "calibrate + quantize.rtn + finetune.blockwise stage seconds.",
        "",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--iters", type=int, default=25, help="SignRound iterations per block, both tools")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per iteration, both tools")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval-windows", type=int, default=None, help="default: all 147")
    ap.add_argument("--qflow-heldout", type=int, default=0)
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench-peer-sr")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--date", default=_dt.date.today().isoformat())
    args = ap.parse_args(argv)
    par = _load("peer_autoround")
    versions = par.ensure_peer_venv(args.skip_install)
    runs_dir = args.runs_dir.resolve()
    work = runs_dir / "peer"
    work.mkdir(parents=True, exist_ok=True)
    inputs = par._peer_llmc().prepare_inputs(work, args.n_calib, args.n_eval_windows or 147)
    t0, rows, produced = time.perf_counter(), [], {}
    for bits in [int(b) for b in args.bits.split(",") if b.strip()]:
        p = run_peer(bits, args, inputs, work, par.PEER_PY)
        log(f"peer  W{bits}: " + (f"KL {p['kl']:.4f} ppl {p['ppl']:.2f} {p['seconds']:.0f} s" if p.get("ok")
                                  else f"FAILED {p.get('error')}"))
        q = run_qflow(bits, args, runs_dir, work, produced)
        log(f"qflow W{bits}: " + (f"KL {q['kl']:.4f} ppl {q['ppl']:.2f} {q['seconds']:.0f} s" if q.get("ok")
                                  else f"FAILED {q.get('error')}"))
        rows.append({"bits": bits, "peer": p, "qflow": q})
        (work / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    block = report(rows, args, inputs, versions, time.perf_counter() - t0, args.date)
    print(block)
    if not args.no_results:
        text = RESULTS.read_text()
        if SECTION not in text:
            text = text.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by `benchmarks/peer_signround.py` (newest run last).\n"
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt < 0 else nxt + 1
        RESULTS.write_text(text[:start] + text[start:end].rstrip("\n") + "\n\n" + block
                           + ("\n" + text[end:] if nxt >= 0 else ""))
    return 0 if all(r["peer"].get("ok") and r["qflow"].get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
