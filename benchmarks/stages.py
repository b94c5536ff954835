"""Each stage of the flagship recipe next to its floor, measured in the same run, as ratios.

Runs ``qflow run RECIPE --json`` in a fresh runs directory (nothing cached), then
measures each floor in its own fresh process (so peak RSS is the floor's own):

* ``model`` (model load): reading every weight file of the model folder into memory;
* ``calibrate``: a plain forward pass (``model(input_ids)``, fp32, same batch size)
  over the same calibration windows, statistics off;
* ``evaluate``: a plain forward pass over the same evaluation windows. evaluate.lm
  itself runs the float reference, the quantized model and (exact KL) the float
  model again over them, plus the per-layer and speed passes: its floor ratio is
  therefore >= 2 by design; the per-pass figures are in its metrics.

Quantize and export have no floor here (AWQ/GPTQ vs the peer: benchmarks/peer_llmcompressor.py).
Pipeline and floors use the same thread count (qflow's choice at the start, passed as
``QFLOW_THREADS``). Prints, per stage: seconds, floor seconds, ratio, peak RSS (the
stage's ``peak_rss_bytes``: the process's high-water mark when the stage ended), floor
peak RSS, ratio; and the load average before and after (a shared machine inflates both
sides alike only roughly: quote ratios with the load).

Example::

    .venv/bin/python benchmarks/stages.py                       # recipes/llama-awq.yaml
    .venv/bin/python benchmarks/stages.py --recipe recipes/llama-gptq.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def floor_read(model_dir: str) -> dict:
    """Read every weight file of the folder into memory."""
    t0 = time.perf_counter()
    blobs = [p.read_bytes() for p in sorted(Path(model_dir).glob("*.safetensors"))]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": sum(len(b) for b in blobs), "peak_rss_bytes": _peak_rss_bytes()}


def floor_forward(model_dir: str, data: dict, n_windows: int | None, batch_size: int, cache: str) -> dict:
    """A plain fp32 forward over the windows (model load excluded from the seconds)."""
    import torch

    from qflow.data.tokens import token_windows
    from qflow.models.loading import load_model
    from qflow.specs import DataSpec

    model, tok = load_model(model_dir, dtype="float32")
    ids = token_windows(DataSpec(**data), tok, n_windows, Path(cache))
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i:i + batch_size], use_cache=False)
    return {"seconds": time.perf_counter() - t0, "windows": int(ids.shape[0]), "peak_rss_bytes": _peak_rss_bytes()}


def _child(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"floor {args[:2]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stage_config(run_dir: Path, stage: str) -> dict:
    import yaml

    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    return (resolved.get("stages", {}).get(stage) or {}).get("with") or {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/llama-awq.yaml")
    ap.add_argument("--runs-dir", help="runs directory (default: a fresh temporary one)")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--floor", help=argparse.SUPPRESS)           # internal: run one floor in this process
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.floor:
        spec = json.loads(args.spec)
        import torch

        torch.set_num_threads(int(os.environ["QFLOW_THREADS"]))
        result = floor_read(spec["model_dir"]) if args.floor == "read" else floor_forward(**spec)
        print(json.dumps(result))
        return

    from qflow.threads import current_choice

    choice = current_choice()
    env = {**os.environ, "QFLOW_THREADS": str(choice.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="qflow-stages-"))
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "qflow.cli", "--runs-dir", str(runs), "run", args.recipe, "--json", "--no-track",
           *args.overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if not proc.stdout.strip():
        raise SystemExit(f"qflow run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(result["run_dir"])
    stages = result["stages"]

    from qflow.models.sources import resolve_model

    import yaml

    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    model_dir = str(resolve_model(resolved["model"]["source"], runs / "cache").path)
    memo = str(runs / "cache")
    floors: dict[str, dict] = {}
    ids = {sid: s["uses"] for sid, s in stages.items()}
    for sid, uses in ids.items():
        if uses == "model.load":
            floors[sid] = _child(["--floor", "read", "--spec", json.dumps({"model_dir": model_dir})], env)
        elif uses in ("calibrate", "evaluate.lm"):
            cfg = _stage_config(run_dir, sid)
            n = cfg.get("n_samples") if uses == "calibrate" else cfg.get("n_windows")
            spec = {"model_dir": model_dir, "data": cfg["data"], "n_windows": n,
                    "batch_size": int(cfg.get("batch_size", 4)), "cache": memo}
            floors[sid] = _child(["--floor", "forward", "--spec", json.dumps(spec)], env)
    load_after = os.getloadavg()[0]

    print(f"stages vs floors: {args.recipe} {' '.join(args.overrides)}; {choice.threads} thread(s) "
          f"({choice.reason}); run status {result['status']}, {wall:.0f} s wall; "
          f"load average before {load_before:.2f}, after {load_after:.2f}")
    print(f"{'stage':<12}{'uses':<20}{'s':>9}{'floor s':>9}{'ratio':>7}{'RSS MB':>9}{'floor MB':>9}{'ratio':>7}  floor")
    what = {"model.load": "read weight files", "calibrate": "plain forward, same windows",
            "evaluate.lm": "plain forward, same windows"}
    for sid, s in stages.items():
        rss = (s.get("peak_rss_bytes") or 0) / 2**20
        f = floors.get(sid)
        if f is None:
            print(f"{sid:<12}{s['uses']:<20}{s['seconds']:>9.1f}{'':>9}{'':>7}{rss:>9.0f}")
            continue
        f_rss = f["peak_rss_bytes"] / 2**20
        print(f"{sid:<12}{s['uses']:<20}{s['seconds']:>9.1f}{f['seconds']:>9.1f}"
              f"{s['seconds'] / max(f['seconds'], 1e-9):>7.2f}{rss:>9.0f}{f_rss:>9.0f}"
              f"{(rss / f_rss if f_rss else float('nan')):>7.2f}  {what[s['uses']]}")
    if not args.runs_dir:
        print(f"(runs directory {runs} left for inspection; delete it when done)")


if __name__ == "__main__":
    main()
