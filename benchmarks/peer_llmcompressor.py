"""Side-by-side benchmark: qflow vs llm-compressor (the peer) on the bundled model.

Same model (qflow's float folder of ``zoo:smollm2-135m``), same calibration token
ids (``zoo:wiki-pages``, the first ``--n-calib`` 512-token windows, exactly what
qflow's ``calibrate`` stage uses), same evaluation protocol (docs/METHODS.md §11/§13:
``zoo:lee-news``, the first ``--n-eval-windows`` 512-token windows, PPL =
exp(mean NLL over every scored token), KL vs the float model), for RTN / AWQ /
GPTQ at each bit width, group 64, asymmetric, every decoder Linear quantized,
embeddings and the tied head kept float.

For each (bits, method) it runs, back to back so both see the same machine load:

* qflow through its CLI, ``qflow run recipes/llama-<method>.yaml params.bits=B
  params.group_size=64 params.n_calib=N params.n_eval_windows=E (scheme=asym_z | symmetric=false |
  zero_point=true) --json --no-track --runs-dir <fresh dir>`` (a fresh runs dir per
  invocation, so the quantize stage is never a cache hit; evaluate.lm's per-layer
  report and speed timing are switched off unless ``--qflow-full-eval``: they do not
  change ppl / KL); it reads the quantize stage's seconds and peak RSS and the
  evaluate stage's ppl / kl_mean (exact) / kl_topk_mean (estimate);
* the peer in its own venv ``benchmarks/.peer-venv`` (torch 2.13.0 CPU,
  llmcompressor 0.14.0.1) through ``benchmarks/_peer_worker.py``, one process per
  configuration: ``oneshot`` seconds and peak RSS, a check that the weights really
  are quantized (fails loudly otherwise), and the same evaluation.

Then it prints one table (qflow / peer for ppl, KL, quantization seconds, peak
RSS) and appends it, with the date, machine and load, to the section
"## Peer: llm-compressor" of ``benchmarks/RESULTS.md``. A qflow or peer failure is
reported in its row; the run goes on.

Usage (from the repository root, with qflow's venv)::

    .venv/bin/python benchmarks/peer_llmcompressor.py                       # W4+W3 x rtn,awq,gptq, protocol full
    .venv/bin/python benchmarks/peer_llmcompressor.py --protocol ci         # qflow/recipe_lib/qflow/lib/protocol/ci.yaml sizes
    .venv/bin/python benchmarks/peer_llmcompressor.py --bits 4 --n-eval-windows 16   # custom sizes
    .venv/bin/python benchmarks/peer_llmcompressor.py --methods gptq --bits 3 --skip-install

Notes on what is compared:

* KL: qflow's ``evaluate.lm`` reports the exact full-vocabulary KL(p_fp || p_q)
  (``kl_mean``) and the top-128 + tail-bin estimate, a lower bound (``kl_topk_mean``).
  The worker computes both for the peer: the "KL" columns compare the exact values,
  the "KL top-k" columns the estimates.
* Peak RSS: qflow's is the quantize stage's ``peak_rss_bytes`` (the block-wise AWQ /
  GPTQ stages report the process's ``VmHWM``, the peak of its own address space, which
  includes the earlier stages of the same run, so it can only overstate qflow (before
  2026-12-07 they reported ``ru_maxrss``, which Linux carries over from the parent
  process: the driver keeps itself small for those older figures); RTN's is sampled during
  the stage). The peer's is sampled (20 ms) during ``oneshot`` in a process that
  holds the float model and the calibration ids.
* Seconds: qflow's quantize stage (its own forward passes over the calibration ids
  included) vs the wall time of ``oneshot``. qflow's ``model`` and ``calibrate``
  stages (the latter only saves the ids and activation statistics these three
  algorithms do not use) run first in a process of their own, so each measured run
  finds them cached and its quantize stage's peak RSS is not inflated by them.
* Threads: both tools get the same count per row (``--threads``; default qflow's free-core
  policy, qflow/threads.py, sampled at the row's start) and a passive OpenMP wait. Runs before
  this option let the peer's torch take one spinning thread per core while qflow chose its own
  (table column "threads qflow/peer": "own policy/2"): on a loaded machine that slows the peer
  far more than qflow and biases the time ratio in qflow's favour.
* AWQ settings differ by design: qflow follows llm-awq (scale search over activation
  means + clip search, ``n_search_tokens`` tokens per block); the peer runs its
  defaults (n_grid 20, duo_scaling True, all calibration tokens, no clip search).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != HERE]
sys.path.insert(0, str(ROOT))

PEER_VENV = HERE / ".peer-venv"
PEER_PY = PEER_VENV / "bin" / "python"
TORCH_PIN = "2.13.0"
LLMC_PIN = "0.14.0.1"
RESULTS = HERE / "RESULTS.md"
SECTION = "## Peer: llm-compressor"
RECIPES = {"rtn": "recipes/llama-rtn.yaml", "awq": "recipes/llama-awq.yaml", "gptq": "recipes/llama-gptq.yaml"}


PROTOCOLS = {p.stem: p for p in sorted((ROOT / "qflow" / "recipe_lib" / "qflow" / "lib" / "protocol").glob("*.yaml"))}
ALL_EVAL_WINDOWS = 147      # zoo:lee-news at 512 tokens (a preset's null = all of them)


def protocol_preset(name: str) -> dict:
    """``n_calib`` and ``n_eval_windows`` of ``qflow/recipe_lib/qflow/lib/protocol/<name>.yaml`` (the recipes' own source)."""
    import yaml

    params = yaml.safe_load(PROTOCOLS[name].read_text())["params"]
    return {"n_calib": int(params["n_calib"]),
            "n_eval_windows": ALL_EVAL_WINDOWS if params["n_eval_windows"] is None else int(params["n_eval_windows"])}


def _drop_export(method: str) -> list[str]:
    """The flagship recipe also exports; the comparison is quantize + evaluate only."""
    text = (ROOT / RECIPES[method]).read_text()
    return ["~stages.export"] if "\n  export:" in text else []
# asymmetric as each recipe spells it
ASYM_PARAM = {"rtn": "params.scheme=asym_z", "awq": "params.zero_point=true", "gptq": "params.symmetric=false"}
GROUP = 64
# evaluate.lm's per-layer SQNR report and speed timing do not change ppl / KL and cost
# minutes per run on a loaded 2-core machine: off unless --qflow-full-eval
QFLOW_EVAL_EXTRAS_OFF = ["+stages.evaluate.with.layer_report=false", "+stages.evaluate.with.speed=false"]
TARGETS = "quality ratio <= 1.00 (ppl and exact KL), time ratio <= 0.5, peak RSS ratio <= 0.75"


def log(msg: str) -> None:
    print(f"[peer-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- peer venv

def _peer_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json\n"
            "out = {}\n"
            "for n in ('torch', 'llmcompressor', 'compressed-tensors', 'transformers'):\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    r = subprocess.run([str(PEER_PY), "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def ensure_peer_venv(skip_install: bool) -> dict[str, str]:
    """Create/reuse benchmarks/.peer-venv: torch==2.13.0 first, then llmcompressor pinned against it."""
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
        if v.get("llmcompressor") != LLMC_PIN:
            constraints = PEER_VENV / "constraints.txt"
            constraints.write_text(f"torch=={TORCH_PIN}\n")
            log(f"installing llmcompressor=={LLMC_PIN} (constrained to torch=={TORCH_PIN})")
            subprocess.run(pip + ["-c", str(constraints), f"llmcompressor=={LLMC_PIN}"], check=True)
    if not PEER_PY.exists():
        raise SystemExit(f"{PEER_VENV} does not exist: run without --skip-install")
    v = _peer_versions()
    if v.get("torch", "").split("+")[0] != TORCH_PIN or v.get("llmcompressor") != LLMC_PIN:
        raise SystemExit(f"peer venv has {v}; expected torch {TORCH_PIN} and llmcompressor {LLMC_PIN}")
    return v


# ---------------------------------------------------------------- shared inputs

def prepare_inputs(work: Path, n_calib: int, n_eval: int) -> dict:
    """Model folder + the exact calibration / evaluation ids, saved as .pt for the worker."""
    import torch
    from transformers import AutoTokenizer

    from qflow.data.tokens import token_windows, windows_fingerprint
    from qflow.models.sources import resolve_model
    from qflow.specs import DataSpec

    cache = ROOT / "runs" / "cache"
    model_dir = resolve_model("zoo:smollm2-135m", cache).path.resolve()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    calib = token_windows(DataSpec(source="zoo:wiki-pages", seq_len=512), tok, n_calib, cache)
    ev = token_windows(DataSpec(source="zoo:lee-news", seq_len=512), tok, n_eval, cache)
    work.mkdir(parents=True, exist_ok=True)
    torch.save(calib.clone(), work / "calib_ids.pt")
    torch.save(ev.clone(), work / "eval_ids.pt")
    return {"model_dir": str(model_dir), "calib": str(work / "calib_ids.pt"), "eval": str(work / "eval_ids.pt"),
            "calib_sha256": windows_fingerprint(calib), "eval_sha256": windows_fingerprint(ev),
            "calib_shape": list(calib.shape), "eval_shape": list(ev.shape)}


def prepare_inputs_in_child(work: Path, n_calib: int, n_eval: int) -> dict:
    """:func:`prepare_inputs` in a process of its own, so this driver never imports torch.

    A child started by ``subprocess`` (vfork + exec on Linux) starts with the parent's high-water
    RSS as its own ``ru_maxrss``, which is what qflow's block-wise stages report as peak RSS: a
    driver that loaded torch, transformers and the tokenized text (about 1.1 GB) put that floor
    under every qflow figure. This driver stays at a few tens of MiB (checked in :func:`main`).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare-inputs", str(work),
           "--n-calib", str(n_calib), "--n-eval-windows", str(n_eval)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"preparing the calibration / evaluation ids failed: {_short_error(r.stderr)}")
    return json.loads(lines[-1])


def driver_hwm_bytes() -> int:
    """This driver's high-water RSS: the floor of every child's ``ru_maxrss``."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------- runs

def _tail(text: str, n: int = 400) -> str:
    text = (text or "").strip()
    return text[-n:]


def _short_error(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error|FAILED|Exception)", ln):
            return ln[:200]
    return lines[-1][:200] if lines else "no output"


def row_threads(request: str) -> tuple[int, str]:
    """The thread count both tools get for one row: qflow's own policy now (qflow/threads.py: the
    cores other processes leave free) unless ``--threads N``. The peer's torch would otherwise start
    one spinning OpenMP thread per core and slow down far more than qflow on a loaded machine."""
    from qflow.threads import choose_threads, current_choice, usable_cores

    if request != "auto":
        c = choose_threads(usable_cores(), None, None, int(request))
        return c.threads, "--threads"
    c = current_choice()
    return c.threads, c.reason


def run_qflow(method: str, bits: int, n_calib: int, n_eval: int, runs_dir: Path, work: Path,
              extra: list[str], timeout: float, threads: int) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "qflow"), "--runs-dir", str(runs_dir), "run", RECIPES[method],
           f"params.bits={bits}", f"params.group_size={GROUP}", f"params.n_calib={n_calib}",
           f"params.n_eval_windows={n_eval}", ASYM_PARAM[method], *extra, *_drop_export(method), "--json", "--no-track"]
    log(f"qflow {method} w{bits}: {' '.join(cmd[1:])} (QFLOW_THREADS={threads})")
    env = dict(os.environ, QFLOW_THREADS=str(threads))
    t0 = time.perf_counter()
    load0 = loadavg()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "cmd": cmd}
    wall = time.perf_counter() - t0
    (work / f"qflow-{method}-w{bits}.stderr.txt").write_text(r.stderr or "")
    (work / f"qflow-{method}-w{bits}.stdout.txt").write_text(r.stdout or "")
    out = {"cmd": cmd, "rc": r.returncode, "wall_s": wall, "load_start": load0, "load_end": loadavg(),
           "threads": threads}
    js = None
    for line in reversed((r.stdout or "").splitlines()):
        if line.startswith("{"):
            try:
                js = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if js is None:
        return out | {"ok": False, "error": _short_error(r.stderr or r.stdout)}
    out["json"] = js
    st = js.get("stages", {})
    q = st.get("quantize", {})
    m = js.get("metrics", {})
    if q.get("status") == "cached":
        return out | {"ok": False, "error": "quantize stage was a cache hit (runs dir not fresh)"}
    failed = {sid: s.get("error", "failed") for sid, s in st.items() if s.get("status") == "failed"}
    if q.get("status") != "ran" or "evaluate/ppl" not in m:
        err = next(iter(f"{sid}: {e}" for sid, e in failed.items()), None) or _short_error(r.stderr)
        return out | {"ok": False, "error": str(err)[:300]}
    if js.get("status") != "ok":
        # quantize and evaluate ran: the numbers are real; note what else failed (a gate, a later stage)
        out["gate_failed"] = [g for g in js.get("gates", []) if not g.get("passed", g.get("ok", True))]
        out["other_failed"] = {k: str(v)[:200] for k, v in failed.items()}
    rss = q.get("peak_rss_bytes") or m.get("quantize/peak_rss_mb", float("nan")) * 2**20
    return out | {"ok": True, "ppl": m["evaluate/ppl"], "ppl_fp": m.get("evaluate/ppl_fp"),
                  "kl": m.get("evaluate/kl_mean"), "kl_topk": m.get("evaluate/kl_topk_mean"),
                  "top1": m.get("evaluate/top1_agree"),
                  "seconds": q.get("seconds"), "peak_rss_bytes": rss,
                  "calibrate_seconds": st.get("calibrate", {}).get("seconds"),
                  "evaluate_seconds": st.get("evaluate", {}).get("seconds")}


def prepare_qflow_cache(method: str, bits: int, n_calib: int, n_eval: int, runs_dir: Path, work: Path,
                        extra: list[str], timeout: float) -> str:
    """Run only the model and calibrate stages (same keys as the real runs) in a process of their own.

    Then each measured ``qflow run`` finds them cached: its quantize stage's peak RSS (sampled, or the
    process ``VmHWM`` for the block-wise stages) is not inflated by the calibrate stage's forward
    passes, and every method pays the same (nothing) for calibration, like the peer's ``oneshot``.
    """
    cmd = [str(ROOT / ".venv" / "bin" / "qflow"), "--runs-dir", str(runs_dir), "run", RECIPES[method],
           f"params.bits={bits}", f"params.group_size={GROUP}", f"params.n_calib={n_calib}",
           f"params.n_eval_windows={n_eval}", ASYM_PARAM[method], *extra, *_drop_export(method), "~stages.quantize", "~stages.evaluate",
           "--json", "--no-track"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s (the runs will calibrate in-process)"
    (work / "qflow-prepare.stderr.txt").write_text(r.stderr or "")
    try:
        js = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
        return ", ".join(f"{k} {v['status']} {v['seconds']:.0f} s" for k, v in js["stages"].items())
    except (IndexError, json.JSONDecodeError, KeyError):
        return f"failed ({_short_error(r.stderr)}); the runs will calibrate in-process"


def run_peer(method: str, bits: int, inputs: dict, work: Path, timeout: float, threads: int) -> dict:
    out_json = work / f"peer-{method}-w{bits}.json"
    cmd = [str(PEER_PY), str(HERE / "_peer_worker.py"), "--model", inputs["model_dir"], "--calib", inputs["calib"],
           "--eval", inputs["eval"], "--method", method, "--bits", str(bits), "--group-size", str(GROUP),
           "--out", str(out_json)]
    # the same thread count and OpenMP wait policy as qflow (its CLI sets PASSIVE before torch loads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    log(f"peer  {method} w{bits}: llm-compressor oneshot in {PEER_VENV.name} (OMP_NUM_THREADS={threads})")
    t0 = time.perf_counter()
    load0 = loadavg()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    (work / f"peer-{method}-w{bits}.stderr.txt").write_text(r.stderr or "")
    out = {"rc": r.returncode, "wall_s": wall, "load_start": load0, "load_end": loadavg(), "threads": threads}
    if r.returncode != 0 or not out_json.exists():
        msg = next((ln for ln in (r.stderr or "").splitlines() if "PEER VERIFICATION FAILED" in ln), None)
        return out | {"ok": False, "error": msg or _short_error(r.stderr)}
    res = json.loads(out_json.read_text())
    return out | {"ok": True, "ppl": res["ppl"], "ppl_fp": res["ppl_fp"], "kl": res["kl_full_mean"],
                  "kl_topk": res["kl_topk_mean"], "top1": res["top1_agree"], "seconds": res["seconds"],
                  "peak_rss_bytes": res["peak_rss_bytes"], "result": res}


# ---------------------------------------------------------------- table

def _f(x, fmt):
    return "—" if x is None or x != x else format(x, fmt)


def _ratio(a, b):
    try:
        return a / b if a is not None and b else None
    except TypeError:
        return None


def table(rows: list[dict]) -> str:
    head = ("| method | bits | qflow ppl | peer ppl | ppl ratio | qflow KL exact | peer KL exact | KL exact ratio "
            "| qflow KL top-k est. | peer KL top-k est. "
            "| qflow quant s | peer quant s | time ratio | qflow peak RSS MiB | peer peak RSS MiB | RSS ratio | load avg | threads qflow/peer |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        q, p = r["qflow"], r["peer"]
        qo, po = q.get("ok"), p.get("ok")

        def g(d, k, ok):
            return d.get(k) if ok else None

        cells = [r["method"], f"W{r['bits']} g{GROUP}",
                 _f(g(q, "ppl", qo), ".3f") if qo else f"FAILED: {q.get('error', '?')}",
                 _f(g(p, "ppl", po), ".3f") if po else f"FAILED: {p.get('error', '?')}",
                 _f(_ratio(g(q, "ppl", qo), g(p, "ppl", po)), ".3f"),
                 _f(g(q, "kl", qo), ".4f"), _f(g(p, "kl", po), ".4f"),
                 _f(_ratio(g(q, "kl", qo), g(p, "kl", po)), ".3f"),
                 _f(g(q, "kl_topk", qo), ".4f"), _f(g(p, "kl_topk", po), ".4f"),
                 _f(g(q, "seconds", qo), ".1f"), _f(g(p, "seconds", po), ".1f"),
                 _f(_ratio(g(q, "seconds", qo), g(p, "seconds", po)), ".2f"),
                 ("<=" if qo and q.get("peak_rss_bytes", 0) <= q.get("driver_hwm_bytes", 0) else "")
                 + _f((g(q, "peak_rss_bytes", qo) or float("nan")) / 2**20, ".0f"),
                 _f((g(p, "peak_rss_bytes", po) or float("nan")) / 2**20, ".0f"),
                 _f(_ratio(g(q, "peak_rss_bytes", qo), g(p, "peak_rss_bytes", po)), ".2f"),
                 f"{min(q.get('load_start', 0), p.get('load_start', 0)):.1f}-"
                 f"{max(q.get('load_end', 0), p.get('load_end', 0)):.1f}",
                 f"{q.get('threads', 'own policy')}/{p.get('result', {}).get('threads', p.get('threads', '?'))}"]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def report(rows, args, inputs, versions, started, elapsed, loads, date, partial: str = "") -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "qflow", "stages", "recipes"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    fp = [r["qflow"].get("ppl_fp") for r in rows if r["qflow"].get("ok")]
    pp = [r["peer"].get("ppl_fp") for r in rows if r["peer"].get("ok")]
    settings = {r["method"]: r["peer"].get("result", {}).get("settings") for r in rows if r["peer"].get("ok")}
    patched = any(r["peer"].get("result", {}).get("pin_memory_patched") for r in rows if r["peer"].get("ok"))
    cpu = platform.processor() or platform.machine()
    lines = [
        f"### {date}: W{','.join(map(str, args.bits))} g{GROUP} asym, protocol {args.protocol}"
        f"{'' if protocol_preset(args.protocol) == {'n_calib': args.n_calib, 'n_eval_windows': args.n_eval_windows} else ' (custom sizes)'}, "
        f"n_calib={args.n_calib}, n_eval_windows={args.n_eval_windows}{partial}",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({cpu}), no GPU, shared with other jobs: 1-min load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the run (timings are noisy; qflow and the peer ran back to back "
        f"per row, so each row's pair saw similar load). Total wall time {elapsed / 60:.1f} min, started {started}.",
        f"qflow: commit {commit}{' + uncommitted changes in qflow/stages/recipes' if dirty else ''}, "
        f"`qflow run recipes/llama-<method>.yaml params.bits=B params.group_size={GROUP} params.n_calib={args.n_calib} "
        f"params.n_eval_windows={args.n_eval_windows} (scheme=asym_z | symmetric=false | zero_point=true)"
        f"{' ' + ' '.join(args.qflow_override) if args.qflow_override else ''} --json --no-track --runs-dir <fresh>`.",
        f"Peer: llmcompressor {versions.get('llmcompressor')}, compressed-tensors {versions.get('compressed-tensors')}, "
        f"transformers {versions.get('transformers')}, torch {versions.get('torch')}; `oneshot` with explicit config_groups "
        f"(int, symmetric false, group {GROUP}, targets Linear, ignore lm_head); settings {json.dumps(settings)}"
        f"{'; AWQ pin_memory() patched to a no-op (CPU-only torch)' if patched else ''}. "
        "Verified per Linear: <= 2^bits distinct values per group, differs from float, own forward == dequantized weights.",
        f"Data: calibration zoo:wiki-pages {inputs['calib_shape']} sha256 {inputs['calib_sha256'][:16]}…, "
        f"evaluation zoo:lee-news {inputs['eval_shape']} sha256 {inputs['eval_sha256'][:16]}…; float ppl "
        f"qflow {_f(fp[0] if fp else None, '.3f')} / peer worker {_f(pp[0] if pp else None, '.3f')}.",
        "",
        table(rows),
        "",
        "Ratios are qflow / peer (targets: " + TARGETS + "). \"KL exact\" = mean exact full-vocabulary KL(p_fp‖p_q) "
        "per token, nats (qflow's `evaluate.lm` kl_mean; the worker's full log-softmax for the peer), the ratio is of "
        "these; \"KL top-k est.\" = the estimate over the float top-128 tokens + a tail bin (kl_topk_mean, a lower "
        "bound), shown only to link with the older tables above. "
        "Seconds: qflow's quantize stage vs `oneshot` wall time. Peak RSS: qflow's quantize-stage peak_rss_bytes "
        "(AWQ/GPTQ: the process's VmHWM; \"<=\" where it is not above the driver's own high-water RSS, a bound "
        "kept for qflow versions that reported ru_maxrss, which a child inherits) vs the peer's RSS sampled during `oneshot`.",
    ]
    failures = [(r["method"], r["bits"], side, r[side]["error"]) for r in rows for side in ("qflow", "peer")
                if not r[side].get("ok")]
    for m, b, side, err in failures:
        lines.append(f"- {side} {m} W{b} failed: {err}")
    for r in rows:
        q = r["qflow"]
        if q.get("gate_failed") or q.get("other_failed"):
            lines.append(f"- qflow {r['method']} W{r['bits']}: run status not ok after quantize+evaluate ran (numbers "
                         f"still reported): gates {json.dumps(q.get('gate_failed'))[:200]}, stages "
                         f"{json.dumps(q.get('other_failed'))[:300]}")
    return "\n".join(lines) + "\n"


def append_results(block: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        intro = (f"\n{SECTION}\n\nqflow vs llm-compressor on the bundled SmolLM2-135M, same model, calibration ids "
                 "and evaluation protocol; written by `benchmarks/peer_llmcompressor.py` (newest run last).\n")
        text = text.rstrip("\n") + "\n" + intro
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt + 1
    section = text[start:end].rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text[:start] + section + ("\n" + text[end:] if nxt >= 0 else ""))


def report_from(work: Path, no_results: bool, date: str) -> int:
    """The table of a run stopped before its last configuration, from what it saved after each one."""
    meta = json.loads((work / "meta.json").read_text())
    rows = json.loads((work / "rows.json").read_text()) if (work / "rows.json").exists() else []
    loads = json.loads((work / "loads.json").read_text()) if (work / "loads.json").exists() else [float("nan")]
    args = argparse.Namespace(**meta["args"])
    elapsed = (work / "rows.json").stat().st_mtime - meta["t_start_epoch"] if rows else 0.0
    done = {(r["bits"], r["method"]) for r in rows}
    missing = [f"{m} W{b}" for b, m in meta["planned"] if (b, m) not in done]
    partial = f" (partial: without {', '.join(missing)})" if missing else ""
    block = report(rows, args, meta["inputs"], meta["versions"], meta["started"], elapsed, loads, date, partial)
    print(block)
    if not no_results:
        append_results(block)
        log(f"appended to {RESULTS.relative_to(ROOT)}")
    return 0


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="rtn,awq,gptq")
    p.add_argument("--bits", default="4,3")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full",
                   help="qflow/recipe_lib/qflow/lib/protocol preset: calibration and evaluation windows (full: the numbers to quote)")
    p.add_argument("--n-calib", type=int, default=None, help="calibration windows of 512 tokens, both tools "
                   "(default: the protocol's; a value here makes the protocol custom)")
    p.add_argument("--n-eval-windows", type=int, default=None, help="evaluation windows (default: the protocol's)")
    p.add_argument("--skip-install", action="store_true", help="use benchmarks/.peer-venv as it is")
    p.add_argument("--runs-dir", type=Path, default=None, help="qflow runs dir (default: a fresh runs/peer-bench-<time>)")
    p.add_argument("--qflow-override", action="append", default=[], help="extra qflow override, e.g. params.n_search_tokens=null")
    p.add_argument("--qflow-full-eval", action="store_true",
                   help="keep evaluate.lm's per-layer report and speed timing (not needed for this table)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per tool run")
    p.add_argument("--threads", default="auto",
                   help="threads for both tools in every row (default auto: qflow's free-core policy at the row's start)")
    p.add_argument("--no-results", action="store_true", help="print only, do not append to RESULTS.md")
    p.add_argument("--date", default=_dt.date.today().isoformat())
    p.add_argument("--prepare-inputs", type=Path, default=None, help=argparse.SUPPRESS)  # the child's job
    p.add_argument("--report-from", type=Path, default=None, metavar="WORK_DIR",
                   help="only write the table of an earlier (possibly stopped) run from its <runs-dir>/peer folder "
                        "(meta.json + rows.json, saved after every configuration)")
    args = p.parse_args(argv)
    if args.prepare_inputs is not None:
        print(json.dumps(prepare_inputs(args.prepare_inputs, args.n_calib, args.n_eval_windows)))
        return 0
    if args.report_from is not None:
        return report_from(args.report_from, args.no_results, args.date)
    preset = protocol_preset(args.protocol)
    if args.n_calib is None:
        args.n_calib = preset["n_calib"]
    if args.n_eval_windows is None:
        args.n_eval_windows = preset["n_eval_windows"]
    # the preset also sets qflow's AWQ search size (n_search_tokens); explicit overrides still come later
    args.qflow_override = [f"lib/protocol={args.protocol}"] + args.qflow_override
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.bits = [int(b) for b in str(args.bits).split(",") if b.strip()]
    if not args.qflow_full_eval:
        args.qflow_override = QFLOW_EVAL_EXTRAS_OFF + args.qflow_override
    bad = [m for m in args.methods if m not in RECIPES]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {sorted(RECIPES)}")

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = (args.runs_dir or ROOT / "runs" / f"peer-bench-{stamp}").resolve()
    if runs_dir.exists() and any((runs_dir / "cache").glob("*")) and args.runs_dir is not None:
        log(f"note: {runs_dir} already has a cache; a cached quantize stage is reported as a failure")
    work = runs_dir / "peer"
    versions = ensure_peer_venv(args.skip_install)
    log(f"peer venv: {versions}")
    inputs = prepare_inputs_in_child(work, args.n_calib, args.n_eval_windows)
    (work / "meta.json").write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "inputs": inputs, "versions": versions, "started": started, "t_start_epoch": time.time() - (time.perf_counter() - t_start),
        "planned": [[b, m] for b in args.bits for m in args.methods]}, indent=1))
    log(f"model {inputs['model_dir']}; calib {inputs['calib_shape']} {inputs['calib_sha256'][:16]}; "
        f"eval {inputs['eval_shape']} {inputs['eval_sha256'][:16]}")

    prep = prepare_qflow_cache(args.methods[0], args.bits[0], args.n_calib, args.n_eval_windows, runs_dir, work,
                               args.qflow_override, args.timeout)
    log(f"qflow model + calibrate prepared in a separate process: {prep}")
    rows, loads = [], [loadavg()]
    for bits in args.bits:
        for method in args.methods:
            threads, why = row_threads(args.threads)
            log(f"{method} w{bits}: {threads} thread(s) for both tools ({why})")
            q = run_qflow(method, bits, args.n_calib, args.n_eval_windows, runs_dir, work, args.qflow_override,
                          args.timeout, threads)
            q["driver_hwm_bytes"] = driver_hwm_bytes()
            log(f"qflow {method} w{bits}: " + (f"ppl {q['ppl']:.3f} kl {q.get('kl')} {q['seconds']:.1f} s"
                                               if q.get("ok") else f"FAILED {q.get('error')}"))
            pr = run_peer(method, bits, inputs, work, args.timeout, threads)
            log(f"peer  {method} w{bits}: " + (f"ppl {pr['ppl']:.3f} kl {pr['kl']:.4f} {pr['seconds']:.1f} s"
                                               if pr.get("ok") else f"FAILED {pr.get('error')}"))
            rows.append({"method": method, "bits": bits, "qflow": q, "peer": pr})
            loads += [q.get("load_start", loadavg()), q.get("load_end", loadavg()), pr.get("load_end", loadavg())]
            (work / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
            (work / "loads.json").write_text(json.dumps(loads))
    elapsed = time.perf_counter() - t_start
    block = report(rows, args, inputs, versions, started, elapsed, loads, args.date)
    print(block)
    if not args.no_results:
        append_results(block)
        log(f"appended to {RESULTS.relative_to(ROOT)}")
    return 0 if all(r["qflow"].get("ok") and r["peer"].get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
