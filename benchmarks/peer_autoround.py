"""Side-by-side benchmark: qflow's mixed precision vs auto-round's AutoScheme (the peer).

Same model (qflow's float folder of ``zoo:smollm2-135m``), same calibration token ids
(``zoo:wiki-pages``, the first ``--n-calib`` 512-token windows, exactly what qflow's
``calibrate`` stage uses), same evaluation (docs/METHODS.md §11/§13: ``zoo:lee-news``,
``--n-eval-windows`` 512-token windows, all 147 by default; PPL = exp(mean NLL over every
scored token), exact full-vocabulary KL(p_fp || p_q) per scored token). Per-layer options
for both tools: W2 / W3 / W4 / W8, group 64, asymmetric, RTN rounding; every decoder
Linear quantized, embeddings and the tied head kept float.

For each target average bits B (``--avg-bits``, default 3.0 and 3.5), back to back:

* the peer in its own venv ``benchmarks/.autoround-venv`` (torch 2.13.0 CPU, auto-round
  0.16.1) through ``benchmarks/_autoround_worker.py``: ``AutoScheme(avg_bits=B, options=W2/W3/
  W4/W8 g64 asym)`` + ``iters=0`` (RTN), timed; it checks the weights really are quantized
  (<= 2^bits distinct values per group of 64, fails loudly otherwise), reports each layer's
  bits and evaluates;
* the peer's realised bpw, computed by qflow's own byte accounting
  (``qflow.quant.ir.layer_nbytes``): 8 x the bytes qflow would store for the decoder linears
  with the peer's per-layer bits (packed b-bit codes in int32 words, an fp16 scale and a
  uint8 zero point per group of 64: ASYM-Z) / their number of weights. This is the same
  formula as qflow's ``evaluate/bpw_quantized_measured``, so both tools' bpw are counted
  one way. (auto-round's own count, ``b + (16 + b) / 64`` per weight, is printed too.)
* qflow: ``recipes/llama-mixed.yaml`` with RTN as the base method (``stages.quantize.uses=
  quantize.rtn``, sensitivity priced on RTN's ASYM-Z grid), options bits [2,3,4,8] x group
  [64], sensitivity estimator ``fisher``, the recipe's allocate constraints dropped
  (``stages.allocate.with.constraints=[]``: the peer has none), budget ``params.bpw`` = the
  peer's realised bpw (rounded down at 1e-6), the same n_calib and evaluation windows,
  evaluate's per-layer report and speed pass off, no export.

Seconds: the peer's ``quantize()`` wall time (scoring every layer x option with forward +
backward passes, the allocation and the rounding) vs qflow's calibrate + sensitivity-analyze
+ allocate-bits + quantize stage seconds. All targets share one qflow runs folder, so the
second target finds calibrate and sensitivity cached: a cached stage is charged the seconds it
took when it ran earlier in this benchmark (the cost of producing it from scratch), as the
peer recomputes its scores per target.

Usage (repository root, qflow's venv)::

    .venv/bin/python benchmarks/peer_autoround.py                         # B = 3.0, 3.5; n_calib 32; 147 windows
    .venv/bin/python benchmarks/peer_autoround.py --avg-bits 3.0 --n-calib 8 --n-eval-windows 16 --no-results
    .venv/bin/python benchmarks/peer_autoround.py --skip-install

Prints one table per target and appends it (date, machine load, protocol) to
``benchmarks/RESULTS.md`` under "## Peer: auto-round" unless ``--no-results``; the peer's full
per-layer bits go to ``<runs-dir>/peer/peer-autoscheme-<B>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != HERE]
sys.path.insert(0, str(ROOT))

PEER_VENV = HERE / ".autoround-venv"
PEER_PY = PEER_VENV / "bin" / "python"
TORCH_PIN = "2.13.0"
AR_PIN = "0.16.1"
RESULTS = HERE / "RESULTS.md"
SECTION = "## Peer: auto-round"
GROUP = 64
OPTION_BITS = (2, 3, 4, 8)
TARGET_KL_RATIO = 0.9
QFLOW_MIXED = ["stages.quantize.uses=quantize.rtn", "~stages.quantize.with.n_search_tokens",
               "stages.sensitivity.with.method=rtn", f"stages.sensitivity.with.bits=[{','.join(map(str, OPTION_BITS))}]",
               f"stages.sensitivity.with.group_sizes=[{GROUP}]", "params.estimator=fisher",
               "stages.allocate.with.constraints=[]",
               "+stages.evaluate.with.layer_report=false", "+stages.evaluate.with.speed=false", "~stages.export"]
PRODUCE = ("calibrate", "sensitivity", "allocate", "quantize")   # qflow stages timed against the peer


def log(msg: str) -> None:
    print(f"[peer-ar {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return os.getloadavg()[0]


def _peer_llmc():
    """benchmarks/peer_llmcompressor.py, for its input preparation (model folder + token ids) and helpers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("peer_llmcompressor", HERE / "peer_llmcompressor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- peer venv

def _peer_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json\n"
            "out = {}\n"
            "for n in ('torch', 'auto-round', 'transformers'):\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    r = subprocess.run([str(PEER_PY), "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def ensure_peer_venv(skip_install: bool) -> dict[str, str]:
    """Create/reuse benchmarks/.autoround-venv: torch==2.13.0 first, then auto-round pinned against it."""
    if not skip_install:
        if not PEER_PY.exists():
            log(f"creating {PEER_VENV}")
            subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        v = _peer_versions()
        pip = [str(PEER_PY), "-m", "pip", "install", "-q"]
        if v.get("torch", "").split("+")[0] != TORCH_PIN:
            # first and alone: an unpinned torch would pull a multi-GB CUDA build
            log(f"installing torch=={TORCH_PIN} into the peer venv")
            subprocess.run(pip + [f"torch=={TORCH_PIN}"], check=True)
        if v.get("auto-round") != AR_PIN:
            constraints = PEER_VENV / "constraints.txt"
            constraints.write_text(f"torch=={TORCH_PIN}\n")
            log(f"installing auto-round=={AR_PIN} (constrained to torch=={TORCH_PIN})")
            subprocess.run(pip + ["-c", str(constraints), f"auto-round=={AR_PIN}"], check=True)
    if not PEER_PY.exists():
        raise SystemExit(f"{PEER_VENV} does not exist: run without --skip-install")
    v = _peer_versions()
    if v.get("torch", "").split("+")[0] != TORCH_PIN or v.get("auto-round") != AR_PIN:
        raise SystemExit(f"peer venv has {v}; expected torch {TORCH_PIN} and auto-round {AR_PIN}")
    return v


# ---------------------------------------------------------------- bpw, one formula for both tools

def qflow_bpw(layers: dict[str, int], shapes: dict[str, list[int]]) -> float:
    """8 x bytes qflow stores (ASYM-Z, fp16 scales, group 64) for these per-layer bits / number of weights."""
    from qflow.quant.ir import layer_nbytes
    from qflow.quant.spec import QuantSpec

    nbytes = sum(layer_nbytes(QuantSpec(bits=b, group_size=GROUP, scheme="asym_z", scale_dtype="float16"), *shapes[k])
                 for k, b in layers.items())
    return 8.0 * nbytes / sum(o * i for o, i in shapes.values())


def bits_by_type(layers: dict[str, int]) -> dict[str, dict[int, int]]:
    out: dict[str, Counter] = {}
    for name, b in layers.items():
        out.setdefault(name.rsplit(".", 1)[-1], Counter())[b] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(out.items())}


def _fmt_types(by_type: dict) -> str:
    return "; ".join(f"{t}: " + " ".join(f"W{b}x{n}" for b, n in c.items()) for t, c in by_type.items())


# ---------------------------------------------------------------- runs

def run_peer(avg_bits: float, inputs: dict, work: Path, timeout: float, low_mem: bool) -> dict:
    out_json = work / f"peer-autoscheme-{avg_bits:g}.json"
    cmd = [str(PEER_PY), str(HERE / "_autoround_worker.py"), "--model", inputs["model_dir"], "--calib", inputs["calib"],
           "--eval", inputs["eval"], "--avg-bits", str(avg_bits), "--group-size", str(GROUP), "--out", str(out_json)]
    if low_mem:
        cmd.append("--low-mem")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log(f"peer  avg_bits {avg_bits}: auto-round AutoScheme in {PEER_VENV.name}")
    t0, load0 = time.perf_counter(), loadavg()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        (work / f"peer-autoscheme-{avg_bits:g}.stderr.txt").write_text(str(e.stderr or ""))
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    (work / f"peer-autoscheme-{avg_bits:g}.stderr.txt").write_text(r.stderr or "")
    out = {"rc": r.returncode, "wall_s": time.perf_counter() - t0, "load_start": load0, "load_end": loadavg()}
    if r.returncode != 0 or not out_json.exists():
        msg = next((ln for ln in (r.stderr or "").splitlines() if "PEER VERIFICATION FAILED" in ln), None)
        return out | {"ok": False, "error": msg or _peer_llmc()._short_error(r.stderr)}
    res = json.loads(out_json.read_text())
    bpw = qflow_bpw(res["layers"], res["layer_shapes"])
    return out | {"ok": True, "ppl": res["ppl"], "ppl_fp": res["ppl_fp"], "kl": res["kl_full_mean"],
                  "kl_topk": res["kl_topk_mean"], "seconds": res["seconds"], "bpw": bpw,
                  "peer_avg_bits": res["peer_avg_bits"], "layers": res["layers"], "result": res,
                  "json": str(out_json)}


def ran_seconds(runs_dir: Path) -> dict[str, tuple[float, str]]:
    """Cache key -> (seconds, run folder) of every stage that ran in a run under ``runs_dir/runs``."""
    found = {}
    for summary in sorted((runs_dir / "runs").glob("*/summary.json")):
        try:
            stages = json.loads(summary.read_text()).get("stages", {})
        except (OSError, ValueError):
            continue
        for s in stages.values():
            if s.get("status") == "ran" and s.get("key") and s.get("seconds") is not None:
                found.setdefault(s["key"], (float(s["seconds"]), summary.parent.name))
    return found


def charge_stages(st: dict, runs_dir: Path, produced: dict[str, float],
                  stages: tuple[str, ...] = PRODUCE) -> tuple[float, list[str]]:
    """qflow's seconds for ``stages``: a stage that ran now counts its seconds; a cached one the seconds it took
    when it ran (an earlier row, else the run under ``runs_dir`` that computed that cache entry)."""
    seconds, charged, earlier = 0.0, [], None
    for sid in stages:
        s = st.get(sid, {})
        if s.get("status") == "ran":
            produced[sid] = float(s.get("seconds") or 0.0)
            seconds += produced[sid]
        elif sid in produced:
            seconds += produced[sid]
            charged.append(sid)
        else:
            earlier = ran_seconds(runs_dir) if earlier is None else earlier
            if s.get("key") in earlier:
                took, run = earlier[s["key"]]
                seconds += took
                charged.append(f"{sid} ({took:.0f} s in run {run})")
            else:
                charged.append(f"{sid} (cached, its cost unknown)")
    return seconds, charged


def run_qflow(bpw: float, n_calib: int, n_eval: int | None, runs_dir: Path, work: Path, timeout: float,
              produced: dict[str, float], extra: list[str]) -> dict:
    budget = math.floor(bpw * 1e6) / 1e6
    # `python -m qflow.cli` from the repository root runs this checkout's qflow (a worktree's overlay venv may
    # have a `qflow` launcher whose interpreter imports another checkout's code)
    cmd = [sys.executable, "-m", "qflow.cli", "--runs-dir", str(runs_dir), "run", "recipes/llama-mixed.yaml",
           f"params.bpw={budget}", f"params.n_calib={n_calib}",
           f"params.n_eval_windows={'null' if n_eval is None else n_eval}", *QFLOW_MIXED, *extra, "--json", "--no-track"]
    log(f"qflow bpw {budget}: {' '.join(cmd[6:])}")
    t0, load0 = time.perf_counter(), loadavg()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "cmd": cmd}
    (work / f"qflow-mixed-{budget}.stderr.txt").write_text(r.stderr or "")
    (work / f"qflow-mixed-{budget}.stdout.txt").write_text(r.stdout or "")
    out = {"cmd": cmd, "rc": r.returncode, "wall_s": time.perf_counter() - t0, "load_start": load0,
           "load_end": loadavg(), "budget": budget}
    js = next((json.loads(ln) for ln in reversed((r.stdout or "").splitlines()) if ln.startswith("{")), None)
    if js is None:
        return out | {"ok": False, "error": _peer_llmc()._short_error(r.stderr or r.stdout)}
    st, m = js.get("stages", {}), js.get("metrics", {})
    if "evaluate/kl_mean" not in m:
        failed = {k: v.get("error") for k, v in st.items() if v.get("status") == "failed"}
        return out | {"ok": False, "error": str(failed or js.get("status"))[:400]}
    seconds, charged = charge_stages(st, runs_dir, produced)
    return out | {"ok": True, "ppl": m["evaluate/ppl"], "ppl_fp": m.get("evaluate/ppl_fp"),
                  "kl": m["evaluate/kl_mean"], "kl_topk": m.get("evaluate/kl_topk_mean"),
                  "bpw": m.get("evaluate/bpw_quantized_measured"), "predicted_bpw": m.get("allocate/predicted_bpw"),
                  "seconds": seconds, "charged_cached": charged,
                  "refine": {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("allocate/refine_")},
                  "stage_seconds": {k: (v.get("status"), v.get("seconds")) for k, v in st.items()},
                  "status": js.get("status")}


# ---------------------------------------------------------------- table

def _f(x, fmt):
    return "—" if x is None or x != x else format(x, fmt)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _load_range(*sides: dict) -> str:
    vals = [d[k] for d in sides for k in ("load_start", "load_end") if k in d]
    return f"{min(vals):.1f}-{max(vals):.1f}" if vals else "—"


def table(rows: list[dict]) -> str:
    head = ("| target avg bits (peer) | peer bpw (qflow count / own count) | peer KL | peer ppl | peer s "
            "| qflow bpw (budget / realised) | qflow KL | qflow ppl | qflow s | KL ratio qflow/peer | time ratio qflow/peer "
            "| target | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p, q = r["peer"], r["qflow"]
        kl_ratio = _ratio(q.get("kl"), p.get("kl")) if p.get("ok") and q.get("ok") else None
        verdict = "—" if kl_ratio is None else ("PASS" if kl_ratio <= TARGET_KL_RATIO else "FAIL")
        cells = [f"{r['avg_bits']:g}",
                 f"{_f(p.get('bpw'), '.4f')} / {_f(p.get('peer_avg_bits'), '.4f')}" if p.get("ok")
                 else f"FAILED: {p.get('error')}",
                 _f(p.get("kl"), ".4f"), _f(p.get("ppl"), ".3f"), _f(p.get("seconds"), ".0f"),
                 f"{_f(q.get('budget'), '.4f')} / {_f(q.get('bpw'), '.4f')}" if q.get("ok")
                 else f"FAILED: {q.get('error', 'not run')}",
                 _f(q.get("kl"), ".4f"), _f(q.get("ppl"), ".3f"), _f(q.get("seconds"), ".0f"),
                 _f(kl_ratio, ".3f"), _f(_ratio(q.get("seconds"), p.get("seconds")), ".2f"),
                 f"KL <= {TARGET_KL_RATIO}: {verdict}",
                 _load_range(p, q)]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def report(rows, args, inputs, versions, started, elapsed, loads, date) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "qflow", "stages", "recipes"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    n_eval = args.n_eval_windows or 147
    fp_q = next((r["qflow"].get("ppl_fp") for r in rows if r["qflow"].get("ok")), None)
    fp_p = next((r["peer"].get("ppl_fp") for r in rows if r["peer"].get("ok")), None)
    settings = next((r["peer"]["result"].get("settings") for r in rows if r["peer"].get("ok")), None)
    lines = [
        f"### {date}: AutoScheme W2/W3/W4/W8 g{GROUP} asym RTN vs qflow allocate-bits + RTN, avg bits "
        f"{', '.join(f'{b:g}' for b in args.avg_bits)}, n_calib={args.n_calib}, n_eval_windows={n_eval}",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU, shared with other "
        f"jobs: 1-min load average {min(loads):.1f}-{max(loads):.1f} during the run (timings are noisy; the peer and "
        f"qflow ran back to back per row). Total wall time {elapsed / 60:.1f} min, started {started}.",
        f"qflow: commit {commit}{' + uncommitted changes in qflow/stages/recipes' if dirty else ''}, `qflow run "
        f"recipes/llama-mixed.yaml params.bpw=<peer bpw> params.n_calib={args.n_calib} params.n_eval_windows="
        f"{args.n_eval_windows or 'null'} {' '.join(QFLOW_MIXED + args.qflow_override)} --json --no-track` "
        "(allocate constraints dropped for parity: the peer has none).",
        f"Peer: auto-round {versions.get('auto-round')}, transformers {versions.get('transformers')}, torch "
        f"{versions.get('torch')}; settings {json.dumps(settings)}; calibration loader replaced by qflow's token ids "
        "(benchmarks/_autoround_worker.py step 3). Verified per decoder Linear: bits in {2,3,4,8}, group 64 asym, "
        "<= 2^bits distinct values per group, differs from float; embeddings unchanged.",
        f"Data: calibration zoo:wiki-pages {inputs['calib_shape']} sha256 {inputs['calib_sha256'][:16]}…, evaluation "
        f"zoo:lee-news {inputs['eval_shape']} sha256 {inputs['eval_sha256'][:16]}…; float ppl qflow "
        f"{_f(fp_q, '.3f')} / peer worker {_f(fp_p, '.3f')}.",
        "",
        table(rows),
        "",
        "KL = mean exact full-vocabulary KL(p_fp‖p_q) per scored token (qflow's `evaluate.lm` kl_mean; the worker "
        "computes the same). bpw = 8 x stored bytes of the decoder linears / their weights, qflow's count for both "
        "(`qflow.quant.ir.layer_nbytes`, ASYM-Z: packed codes + fp16 scale + uint8 zero per group of 64; the peer's "
        "from its per-layer bits); \"own count\" = auto-round's b + (16 + b)/64. Seconds: peer `quantize()` wall "
        "(AutoScheme scoring + allocation + RTN) vs qflow calibrate + sensitivity (fisher) + allocate + quantize; "
        "a stage found cached is charged the seconds it took when it ran (an earlier row, or the run in the same "
        "runs folder that computed that cache entry, named below).",
    ]
    for r in rows:
        p, q = r["peer"], r["qflow"]
        if p.get("ok"):
            lines.append(f"- peer bits per layer at {r['avg_bits']:g} ({len(p['layers'])} linears; full list "
                         f"{Path(p['json']).relative_to(ROOT) if Path(p['json']).is_relative_to(ROOT) else p['json']}): "
                         f"{_fmt_types(bits_by_type(p['layers']))}")
        else:
            lines.append(f"- peer at {r['avg_bits']:g} failed: {p.get('error')}")
        if q.get("ok") and q.get("refine"):
            f = q["refine"]
            lines.append(f"- qflow at {r['avg_bits']:g}: allocate-bits refine measured "
                         f"{f.get('refine_candidates', 0):.0f} candidate plans on calibration windows: chosen KL "
                         f"{_f(f.get('refine_kl'), '.4f')} vs unrefined {_f(f.get('refine_unrefined_kl'), '.4f')} "
                         f"({_f(f.get('refine_kl_ratio'), '.3f')}x), {f.get('refine_n_low', 0):.0f} layers at the "
                         f"lowest width, {_f(f.get('refine_seconds'), '.0f')} s (in allocate's seconds)")
        if not q.get("ok"):
            lines.append(f"- qflow at {r['avg_bits']:g} failed: {q.get('error', 'not run')}")
        elif q.get("charged_cached"):
            lines.append(f"- qflow at {r['avg_bits']:g}: cached stages charged {', '.join(q['charged_cached'])}; "
                         f"predicted bpw {_f(q.get('predicted_bpw'), '.4f')}")
    return "\n".join(lines) + "\n"


def append_results(block: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + (f"\n\n{SECTION}\n\nqflow's sensitivity-analyze + allocate-bits + RTN vs auto-round's "
                                    "AutoScheme (RTN, iters=0) on the bundled SmolLM2-135M at the same realised bpw; "
                                    "written by `benchmarks/peer_autoround.py` (newest run last).\n")
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt + 1
    section = text[start:end].rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text[:start] + section + ("\n" + text[end:] if nxt >= 0 else ""))


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--avg-bits", default="3.0,3.5", help="AutoScheme targets (auto-round's own bit count)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration windows of 512 tokens, both tools")
    p.add_argument("--n-eval-windows", type=int, default=None, help="evaluation windows (default: all 147)")
    p.add_argument("--skip-install", action="store_true", help="use benchmarks/.autoround-venv as it is")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench-peer-ar", help="qflow runs dir")
    p.add_argument("--qflow-override", action="append", default=[], help="extra qflow override")
    p.add_argument("--peer-low-mem", action="store_true",
                   help="AutoScheme's block-by-block low-memory scoring (much slower on a CPU)")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per tool run")
    p.add_argument("--rebuild-from", type=Path, default=None,
                   help="print (and append) the table of a finished run from its <runs-dir>/peer/rows.json, "
                        "charging cached qflow stages by their cache keys (runs nothing)")
    p.add_argument("--no-results", action="store_true", help="print only, do not append to RESULTS.md")
    p.add_argument("--date", default=_dt.date.today().isoformat())
    args = p.parse_args(argv)
    args.avg_bits = [float(b) for b in str(args.avg_bits).split(",") if b.strip()]

    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    runs_dir = args.runs_dir.resolve()
    work = runs_dir / "peer"
    work.mkdir(parents=True, exist_ok=True)
    versions = ensure_peer_venv(args.skip_install)
    log(f"peer venv: {versions}")
    n_eval = args.n_eval_windows or 147
    inputs = _peer_llmc().prepare_inputs(work, args.n_calib, n_eval)
    log(f"model {inputs['model_dir']}; calib {inputs['calib_shape']} {inputs['calib_sha256'][:16]}; "
        f"eval {inputs['eval_shape']} {inputs['eval_sha256'][:16]}")
    rows, loads, produced = [], [loadavg()], {}
    if args.rebuild_from:
        rows = json.loads(args.rebuild_from.read_text())
        for r in rows:
            q = r["qflow"]
            if q.get("ok"):
                out_file = work / f"qflow-mixed-{q['budget']}.stdout.txt"
                js = next(json.loads(ln) for ln in reversed(out_file.read_text().splitlines()) if ln.startswith("{"))
                q["seconds"], q["charged_cached"] = charge_stages(js.get("stages", {}), runs_dir, produced)
            loads += [r["peer"].get("load_start"), r["peer"].get("load_end"), q.get("load_end")]
        loads = [x for x in loads if x is not None]
        args.avg_bits = [r["avg_bits"] for r in rows]
    for b in ([] if args.rebuild_from else args.avg_bits):
        pr = run_peer(b, inputs, work, args.timeout, args.peer_low_mem)
        log(f"peer  {b}: " + (f"bpw {pr['bpw']:.4f} (own {pr['peer_avg_bits']:.4f}) KL {pr['kl']:.4f} ppl "
                              f"{pr['ppl']:.3f} {pr['seconds']:.0f} s" if pr.get("ok") else f"FAILED {pr.get('error')}"))
        q = {"ok": False, "error": "not run: the peer failed, so there is no budget"}
        if pr.get("ok"):
            q = run_qflow(pr["bpw"], args.n_calib, args.n_eval_windows, runs_dir, work, args.timeout, produced,
                          args.qflow_override)
            log(f"qflow {b}: " + (f"bpw {q['bpw']} KL {q['kl']:.4f} ppl {q['ppl']:.3f} {q['seconds']:.0f} s"
                                  if q.get("ok") else f"FAILED {q.get('error')}"))
        rows.append({"avg_bits": b, "peer": pr, "qflow": q})
        loads += [pr.get("load_start", loadavg()), pr.get("load_end", loadavg()), q.get("load_end", loadavg())]
        (work / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    elapsed = time.perf_counter() - t_start
    if args.rebuild_from:   # the finished run's wall time and start, from its rows
        elapsed = sum(float(r[k].get("wall_s") or 0.0) for r in rows for k in ("peer", "qflow"))
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(args.rebuild_from.stat().st_mtime - elapsed))
    block = report(rows, args, inputs, versions, started, elapsed, loads, args.date)
    print(block)
    if not args.no_results:
        append_results(block)
        log(f"appended to {RESULTS.relative_to(ROOT)}")
    ok = all(r["peer"].get("ok") and r["qflow"].get("ok") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
