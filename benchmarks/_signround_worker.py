"""Worker for ``benchmarks/peer_signround.py``: one auto-round SignRound run (uniform bits) + evaluation.

Runs inside ``benchmarks/.autoround-venv`` (torch 2.13.0 CPU + auto-round 0.16.1), never in
qflow's venv, and imports nothing from qflow.

    benchmarks/.autoround-venv/bin/python benchmarks/_signround_worker.py \\
        --model runs/cache/models/... --calib calib_ids.pt --eval eval_ids.pt \\
        --bits 3 --iters 25 --batch-size 8 --out result.json

1. Load the float folder (fp32, eager attention, as qflow's ``load_model``) and its tokenizer.
2. ``AutoRound(model, tokenizer, scheme=QuantizationScheme(bits=b, group_size=g, sym=False,
   data_type="int", act_bits=16), iters=N, nsamples=n, seqlen=512, batch_size=B,
   device_map="cpu", amp=False, enable_torch_compile=False).quantize()``: SignRound, block by
   block, with auto-round's defaults for everything else (learning rate 1/iters, min/max
   tuning on, quantized inputs from the previous blocks, best iteration kept by training loss);
   ``time.perf_counter`` around ``quantize()`` = the peer's seconds. fp32 throughout.
3. Calibration data: auto-round's dataset loader is replaced by one that yields qflow's exact
   ``[n, 512]`` calibration ids (``_autoround_worker.patch_dataloaders``).
4. Verify that it really quantized: every decoder Linear carries ``bits`` = b, ``group_size`` g,
   ``sym`` False, holds at most ``2**b`` distinct values per group and differs from the float
   weight (``_autoround_worker.check_quantized``); embeddings unchanged.
5. Evaluate a plain fp32 model holding the peer's dequantized decoder weights, with the protocol
   of ``_peer_worker.py`` (exact full-vocabulary KL per scored token, PPL).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

_here = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_autoround_worker", _here / "_autoround_worker.py")
_aw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_aw)   # sets the offline environment and drops benchmarks/ from sys.path

import torch  # noqa: E402

Fail, PeakRSS, load_float = _aw.Fail, _aw.PeakRSS, _aw.load_float


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8, help="windows per SignRound step")
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import auto_round
    from auto_round import AutoRound
    from auto_round.schemes import QuantizationScheme
    from transformers import AutoTokenizer

    calib = torch.load(a.calib, weights_only=True).long()
    eval_ids = torch.load(a.eval, weights_only=True).long()
    n, seqlen = int(calib.shape[0]), int(calib.shape[1])
    result = {"bits": a.bits, "group_size": a.group_size, "iters": a.iters, "batch_size": a.batch_size,
              "n_calib": n, "n_eval_windows": int(eval_ids.shape[0]), "auto_round": auto_round.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    loaders = _aw.patch_dataloaders(calib)
    model = load_float(a.model)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    scheme = QuantizationScheme(bits=a.bits, group_size=a.group_size, sym=False, data_type="int", act_bits=16)
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        ar = AutoRound(model, tokenizer=tok, scheme=scheme, iters=a.iters, nsamples=n, seqlen=seqlen,
                       batch_size=a.batch_size, device_map="cpu", dataset="qflow-calibration-ids",
                       enable_torch_compile=False, amp=False)
        qmodel, _ = ar.quantize()
        seconds = time.perf_counter() - t0
    result["settings"] = {k: getattr(ar, k, None) for k in ("iters", "lr", "minmax_lr", "enable_minmax_tuning",
                                                            "enable_quanted_input", "batch_size", "nsamples",
                                                            "seqlen", "gradient_accumulate_steps", "sampler")}
    result["settings"] = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                          for k, v in result["settings"].items()}
    qmodel = qmodel if isinstance(qmodel, torch.nn.Module) else model
    _aw.record_run(result, seconds, rss, loaders)
    print(f"auto-round SignRound W{a.bits} g{a.group_size} iters {a.iters}: {seconds:.1f} s", file=sys.stderr, flush=True)
    layers = _aw.verify_peer(qmodel, a.model, a.group_size)
    wrong = {k: v["bits"] for k, v in layers.items() if v["bits"] != a.bits}
    if wrong:
        raise Fail(f"layers not at {a.bits} bits: {list(wrong.items())[:3]}")
    result["max_distinct"] = max(v["max_distinct"] for v in layers.values())
    result["n_layers"] = len(layers)
    dq = {k + ".weight": _aw.get_weight(qmodel, k) for k in layers}
    del ar, model, qmodel
    result |= _aw.evaluate_dequantized(dq, a.model, eval_ids, a.topk, a.eval_batch_size)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as exc:
        print(f"PEER VERIFICATION FAILED: {exc}", file=sys.stderr)
        sys.exit(2)
