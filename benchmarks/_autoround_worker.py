"""Worker for ``benchmarks/peer_autoround.py``: one auto-round AutoScheme run + evaluation.

Runs inside ``benchmarks/.autoround-venv`` (torch 2.13.0 CPU + auto-round 0.16.1), never
in qflow's venv, and imports nothing from qflow. One process per target average bits, so
its time belongs to that target alone.

    benchmarks/.autoround-venv/bin/python benchmarks/_autoround_worker.py \\
        --model runs/cache/models/gguf-... --calib calib_ids.pt --eval eval_ids.pt \\
        --avg-bits 3.0 --out result.json

Steps:

1. Load the float folder (fp32, eager attention, as qflow's ``load_model``) and its tokenizer.
2. ``AutoRound(model, tokenizer, scheme=AutoScheme(avg_bits=B, options=[W2, W3, W4, W8]
   as ``QuantizationScheme(bits=b, group_size=64, sym=False, data_type="int", act_bits=16)``,
   nsamples=n, seqlen=512, low_gpu_mem_usage=False, low_cpu_mem_usage=False,
   enable_torch_compile=False), iters=0, nsamples=n, seqlen=512, batch_size=1,
   device_map="cpu", amp=False).quantize()`` (fp32 throughout: no bf16 cast): AutoScheme scores every (layer, option) by its
   delta-loss (a forward + backward per option over the calibration windows), picks one
   option per layer under the average-bits budget, then RTN (``iters=0``; auto-round's
   optimized-RTN class, which for asymmetric int without ``enable_neuqi`` is min/max
   rounding) quantizes with that per-layer plan. ``time.perf_counter`` around
   ``quantize()`` = the quantization seconds (scoring + allocation + rounding).
   auto-round counts a layer's bits as ``b + (16 + b) / group`` per weight (codes, an fp16
   scale and a b-bit zero point per group: ``auto_scheme/utils.py::compute_layer_bits``,
   ``ignore_scale_zp_bits=False``); the worker reports that figure as ``peer_avg_bits``.
3. Calibration data: auto-round builds its dataloaders from a dataset *name*
   (``calib_dataset.get_dataloader``; ``GenScheme`` refuses anything but a string). The
   worker replaces ``get_dataloader`` (in ``auto_round.calib_dataset`` and in
   ``auto_round.auto_scheme.delta_loss``, which imported it by name) with one that yields
   the exact ``[n, 512]`` token ids qflow's ``calibrate`` stage uses, in order, batch size as
   asked, all-ones attention mask; it fails if auto-round asks for another sequence length
   or more windows than given. The replacement is recorded in the result JSON. auto-round
   caches AutoScheme scores on disk (``~/.cache/auto_round``); each run gets a fresh, empty
   ``AR_AUTO_SCHEME_CACHE`` folder beside ``--out``, so every target is scored from scratch.
   ``AR_ALLOW_W8_ASYM=1`` keeps the W8 option asymmetric (auto-round otherwise pins 8-bit
   asymmetric layers to symmetric for formats that cannot serve them; nothing is exported here).
4. Verify the peer really quantized: every decoder Linear must carry ``bits`` in {2,3,4,8},
   ``group_size`` 64 and ``sym`` False; its (dequantized, as the model now computes with it)
   weight must hold at most ``2**bits`` distinct values in every group of 64 inputs, and must
   differ from the float checkpoint's weight. Embeddings must be unchanged. Any failure exits
   non-zero with the reason.
5. Evaluate a plain fp32 model holding the peer's dequantized decoder weights (every other tensor
   from the float checkpoint) with the protocol of ``_peer_worker.py`` (same function): PPL = exp(mean NLL over
   every scored token), exact full-vocabulary KL(p_fp || p_q) per scored token, the top-k +
   tail estimate, top-1 agreement, in lockstep with the float model.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

_here = Path(__file__).resolve().parent
# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != _here]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AR_ALLOW_W8_ASYM", "1")

import torch  # noqa: E402

# the evaluation loop, float loader, RSS sampler and failure type of the llm-compressor worker
# (pure torch / transformers; loaded by path so this folder never enters sys.path)
_spec = importlib.util.spec_from_file_location("_peer_worker", _here / "_peer_worker.py")
_pw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pw)
Fail, PeakRSS, load_float, evaluate = _pw.Fail, _pw.PeakRSS, _pw.load_float, _pw.evaluate

OPTION_BITS = (2, 3, 4, 8)


def patch_dataloaders(calib: torch.Tensor) -> dict:
    """Make auto-round's calibration loaders yield ``calib`` (qflow's ids) instead of a named dataset."""
    import auto_round.auto_scheme.delta_loss as delta_loss
    import auto_round.calib_dataset as calib_dataset
    from torch.utils.data import DataLoader

    calls = []

    def get_dataloader(tokenizer, seqlen, dataset_name=None, seed=42, bs=8, nsamples=512):
        if int(seqlen) != int(calib.shape[1]):
            raise Fail(f"auto-round asked for seqlen {seqlen}; the calibration windows are {calib.shape[1]} tokens")
        if int(nsamples) > int(calib.shape[0]):
            raise Fail(f"auto-round asked for {nsamples} samples; only {calib.shape[0]} calibration windows given")
        ids = calib[: int(nsamples)]
        calls.append({"dataset_name": str(dataset_name), "seqlen": int(seqlen), "nsamples": int(nsamples), "bs": int(bs)})
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
        return DataLoader(rows, batch_size=int(bs), shuffle=False,
                          collate_fn=lambda b: {k: torch.stack([x[k] for x in b]) for k in b[0]})

    calib_dataset.get_dataloader = get_dataloader
    delta_loss.get_dataloader = get_dataloader
    return {"calls": calls}


def peer_layer_bits(bits: int, group: int, out_f: int, in_f: int) -> float:
    """auto-round's own count (compute_layer_bits): b per weight + (16-bit scale + b-bit zero) per group."""
    n_group = out_f * -(-in_f // group)
    return bits * out_f * in_f + n_group * (16 + bits)


def get_weight(model, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().float().clone()


def check_quantized(model, group_size: int, float_sd: dict) -> dict[str, dict]:
    """{decoder linear: {bits, out, in}} after the checks of step 4."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or ".layers." not in f".{name}.":
            continue
        bits = getattr(m, "bits", None)
        if bits not in OPTION_BITS:
            raise Fail(f"{name}: bits {bits!r} is not one of the options {OPTION_BITS}")
        if getattr(m, "group_size", None) != group_size or getattr(m, "sym", None) is not False:
            raise Fail(f"{name}: group_size {getattr(m, 'group_size', None)} sym {getattr(m, 'sym', None)}, "
                       f"expected {group_size} / False")
        w = m.weight.detach().float()
        rows, cols = w.shape
        if cols % group_size:
            raise Fail(f"{name}: {cols} inputs not divisible by group {group_size}")
        g = torch.sort(w.reshape(rows, cols // group_size, group_size), dim=-1).values
        distinct = 1 + (g[..., 1:] != g[..., :-1]).sum(-1)
        if int(distinct.max()) > 2 ** bits:
            raise Fail(f"{name}: a group holds {int(distinct.max())} distinct values > 2^{bits}")
        if not bool(torch.isfinite(w).all()):
            raise Fail(f"{name}: non-finite weight")
        ref = float_sd[name + ".weight"].float()
        changed = float((w != ref).float().mean())
        rel = float((w - ref).norm() / ref.norm())
        if changed < 0.5 or rel < 1e-5:
            raise Fail(f"{name}: weight ~ float weight (changed {changed:.3f}, rel err {rel:.2e})")
        out[name] = {"bits": int(bits), "out": rows, "in": cols, "max_distinct": int(distinct.max()),
                     "rel_err": rel}
    if not out:
        raise Fail("no decoder Linear found")
    return out


def record_run(result: dict, seconds: float, rss, loaders: dict) -> None:
    """The peer's timing and memory into ``result``; fails if auto-round never read qflow's calibration ids."""
    result |= {"seconds": seconds, "peak_rss_bytes": rss.peak, "rss_before_bytes": rss.start,
               "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "dataloader_calls": loaders["calls"]}
    if not loaders["calls"]:
        raise Fail("auto-round never asked for calibration data: the patched loader was not used")


def verify_peer(qmodel, model_dir: str, group_size: int) -> dict[str, dict]:
    """Step 4 on the peer's model: :func:`check_quantized` against the float checkpoint, embeddings unchanged."""
    from safetensors.torch import load_file

    qmodel.eval()
    float_sd = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        float_sd |= load_file(str(f))
    layers = check_quantized(qmodel, group_size, float_sd)
    if not torch.equal(qmodel.get_input_embeddings().weight.detach().float(),
                       float_sd["model.embed_tokens.weight"].float()):
        raise Fail("embeddings changed: they must stay float")
    return layers


def evaluate_dequantized(dq: dict[str, torch.Tensor], model_dir: str, eval_ids: torch.Tensor, topk: int,
                         batch_size: int) -> dict:
    """Step 5: a plain fp32 model holding the peer's dequantized decoder weights ``dq`` (every other tensor
    from the float checkpoint, so compute dtype and module wrappers cannot differ from qflow's), evaluated in
    lockstep with the float model."""
    gc.collect()
    q_model = load_float(model_dir)
    sd = q_model.state_dict()
    missing = [k for k in dq if k not in sd]
    if missing:
        raise Fail(f"float model lacks {missing[:3]}")
    q_model.load_state_dict({**sd, **dq}, strict=True)
    del sd
    dq.clear()
    gc.collect()
    fp_model = load_float(model_dir)
    t1 = time.perf_counter()
    out = evaluate(q_model, fp_model, eval_ids, topk, batch_size)
    return out | {"eval_seconds": time.perf_counter() - t1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help=".pt of int64 [n, seq_len] calibration ids")
    p.add_argument("--eval", required=True, help=".pt of int64 [n, seq_len] evaluation ids")
    p.add_argument("--avg-bits", type=float, required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="evaluation batch size")
    p.add_argument("--scheme-batch-size", type=int, default=1, help="AutoScheme scoring batch size")
    p.add_argument("--low-mem", action="store_true",
                   help="AutoScheme's default block-by-block scoring with weights reloaded from disk per block "
                        "(low_gpu_mem_usage / low_cpu_mem_usage); off: one whole-model forward + backward per "
                        "window and option, much faster on a CPU for a 135M model")
    p.add_argument("--compile", action="store_true",
                   help="let auto-round torch.compile (inductor C++ builds: minutes on a loaded 2-core CPU)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import auto_round
    from auto_round import AutoRound, AutoScheme
    from auto_round.schemes import QuantizationScheme
    from transformers import AutoTokenizer

    calib = torch.load(a.calib, weights_only=True).long()
    eval_ids = torch.load(a.eval, weights_only=True).long()
    n, seqlen = int(calib.shape[0]), int(calib.shape[1])
    result = {"avg_bits_target": a.avg_bits, "group_size": a.group_size, "n_calib": n,
              "n_eval_windows": int(eval_ids.shape[0]), "auto_round": auto_round.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    loaders = patch_dataloaders(calib)
    # auto-round caches AutoScheme scores on disk (~/.cache/auto_round, keyed by model, dataset name,
    # nsamples, scheme...): a fresh, empty cache folder per run, so every target is scored from scratch
    os.environ["AR_AUTO_SCHEME_CACHE"] = tempfile.mkdtemp(prefix="autoscheme-cache-", dir=Path(a.out).parent)
    result["autoscheme_cache_dir"] = os.environ["AR_AUTO_SCHEME_CACHE"]

    model = load_float(a.model)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    options = [QuantizationScheme(bits=b, group_size=a.group_size, sym=False, data_type="int", act_bits=16) for b in OPTION_BITS]
    scheme = AutoScheme(avg_bits=a.avg_bits, options=options, nsamples=n, seqlen=seqlen,
                        batch_size=a.scheme_batch_size, device_map="cpu",
                        low_gpu_mem_usage=a.low_mem, low_cpu_mem_usage=a.low_mem, enable_torch_compile=a.compile)
    result["settings"] = {"options": [f"W{b} g{a.group_size} asym int" for b in OPTION_BITS], "iters": 0,
                          "autoscheme_method": scheme.method, "ignore_scale_zp_bits": scheme.ignore_scale_zp_bits,
                          "nsamples": n, "seqlen": seqlen, "scheme_batch_size": a.scheme_batch_size,
                          "low_gpu_mem_usage": a.low_mem, "low_cpu_mem_usage": a.low_mem,
                          "enable_torch_compile": a.compile, "amp": False,
                          "AR_ALLOW_W8_ASYM": os.environ.get("AR_ALLOW_W8_ASYM")}
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        ar = AutoRound(model, tokenizer=tok, scheme=scheme, iters=0, nsamples=n, seqlen=seqlen, batch_size=1,
                       device_map="cpu", dataset="qflow-calibration-ids", enable_torch_compile=a.compile,
                       amp=False)
        qmodel, _ = ar.quantize()
        seconds = time.perf_counter() - t0
    qmodel = qmodel if isinstance(qmodel, torch.nn.Module) else model
    record_run(result, seconds, rss, loaders)
    print(f"auto-round AutoScheme avg_bits {a.avg_bits}: {seconds:.1f} s", file=sys.stderr, flush=True)

    # ---- step 4: did it really quantize? --------------------------------------------------
    layers = verify_peer(qmodel, a.model, a.group_size)
    n_w = sum(v["out"] * v["in"] for v in layers.values())
    result["peer_avg_bits"] = sum(peer_layer_bits(v["bits"], a.group_size, v["out"], v["in"])
                                  for v in layers.values()) / n_w
    result["layers"] = {k: v["bits"] for k, v in layers.items()}
    result["layer_shapes"] = {k: [v["out"], v["in"]] for k, v in layers.items()}
    result["max_distinct_by_bits"] = {str(b): max((v["max_distinct"] for v in layers.values() if v["bits"] == b),
                                                  default=None) for b in OPTION_BITS}
    result["bits_by_type"] = {t: dict(sorted(Counter(v["bits"] for k, v in layers.items()
                                                     if k.endswith("." + t)).items()))
                              for t in sorted({k.rsplit(".", 1)[1] for k in layers})}
    print(f"peer avg bits (auto-round's count) {result['peer_avg_bits']:.4f}; by type {result['bits_by_type']}",
          file=sys.stderr, flush=True)
    # evaluate a plain fp32 model holding the peer's dequantized decoder weights (every other
    # tensor from the float checkpoint), so compute dtype and module wrappers cannot differ from qflow's
    dq = {k + ".weight": get_weight(qmodel, k) for k in layers}
    del ar, model, qmodel
    # ---- step 5: evaluation --------------------------------------------------------------
    result |= evaluate_dequantized(dq, a.model, eval_ids, a.topk, a.batch_size)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("layers", "layer_shapes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
