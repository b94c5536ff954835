"""ONNX export of the bundled model: round trip vs qflow and int4-vs-fp32 speed in onnxruntime.

Quantizes SmolLM2-135M (``zoo:smollm2-135m``) with RTN W4 g64 ASYM-Z in process
(or takes ``--ckpt``, any qflow IR folder, e.g. the output of a ``quantize.awq``
stage: the conversion to MatMulNBits is the same), writes the quantized ONNX
decoder at accuracy levels 0 and 4 (two graphs, one data file) and the float32
export of the same graph, then

* round trip: KL(p_qflow || p_onnx), top-1 agreement and max |Δlogit| over the first
  ``--windows`` 512-token lee-news windows, at levels 0 and 4;
* speed: 512-token prefill and 64-token greedy decode (shared-buffer KV cache),
  every model timed side by side in this process, interleaved round by round,
  single-threaded (``intra_op_num_threads=1``) and, with ``--multi``, on all cores;
  medians over ``--repeats`` rounds (decode: every step of every round).

Prints one table and the ratios; the last lines are ``decode_speedup_vs_fp32=<x>``
and ``prefill_speedup_vs_fp32=<x>`` (single-threaded, faster accuracy level).

Example::

    .venv/bin/python benchmarks/onnx_speed.py --repeats 5 --multi
    .venv/bin/python benchmarks/onnx_speed.py --ckpt runs/cache/ab/abcd.../outputs/model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def rtn_checkpoint(model_dir: Path, out: Path, group_size: int = 64, bits: int = 4):
    """RTN ASYM-Z checkpoint of every decoder linear (as ``quantize.rtn`` writes it)."""
    from qflow.quant import dispatch
    from qflow.quant.ir import CheckpointWriter
    from qflow.quant.spec import QuantSpec
    from qflow.quant.weights import block_index, iter_linear_weights, linear_names

    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=False)
    writer = CheckpointWriter(out, base_model=str(model_dir), method="rtn")
    current = None
    for name, w in iter_linear_weights(model_dir, linear_names(model_dir)):
        block = block_index(name)
        if current is not None and block != current:
            writer.flush()
        current = block
        scale, zero = dispatch.compute_params(w, spec)
        writer.add_quantized(name, spec, dispatch.quantize(w, scale, zero, spec), scale, zero)
    return writer.close()


def run(model_dir: Path, work: Path, *, method: str = "rtn", ckpt_dir: Path | None = None, n_windows: int = 2,
        repeats: int = 3, warmup: int = 1, prompt_len: int = 512, gen_tokens: int = 64, multi_threaded: bool = False,
        log=print) -> dict[str, float]:
    """Export, round trip and time; returns the metrics (stage names: ``roundtrip_kl``, ``decode_speedup_vs_fp32``...)."""
    from transformers import AutoTokenizer

    from qflow.data.tokens import token_windows
    from qflow.export.onnx_bench import OnnxDecoder, make_session
    from qflow.export.onnx_check import machine, reference_logits, roundtrip, speed_compare
    from qflow.export.onnx_graph import build_onnx, export_quantized
    from qflow.quant.ir import Checkpoint
    from qflow.specs import DataSpec

    work = Path(work)
    t0 = time.perf_counter()
    if ckpt_dir is not None:
        ckpt = Checkpoint(ckpt_dir)
        method = ckpt.method
    else:
        ckpt = rtn_checkpoint(model_dir, work / "ckpt")
    log(f"checkpoint: {method} ({len(ckpt.layers)} layers, {ckpt.bpw_quantized():.4f} bpw)  "
        f"[{time.perf_counter() - t0:.0f}s]")
    info = export_quantized(model_dir, work / "onnx", ckpt, accuracy_level=0, other_level=4)
    fp = build_onnx(model_dir, work / "fp32", ckpt=ckpt, mode="float")
    log(f"exported: {info.model_path} ({info.data_path.stat().st_size / 1e6:.1f} MB data), "
        f"fp32 {fp.data_path.stat().st_size / 1e6:.1f} MB  [{time.perf_counter() - t0:.0f}s]")

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = token_windows(DataSpec(source="zoo:lee-news", seq_len=512), tok, n_windows, REPO / "runs" / "cache")
    ref = reference_logits(ckpt, ids)
    out: dict[str, float] = {}
    for level in (0, 4):
        rt = roundtrip(OnnxDecoder(make_session(info.variants[level], threads=0, spinning=False)), ids, ref,
                       kv_tokens=8 if level == 0 else 0)
        sfx = "" if level == 0 else "_acc4"
        out |= {f"roundtrip_kl{sfx}": rt["kl"], f"roundtrip_top1_agree{sfx}": rt["top1_agree"],
                f"roundtrip_max_abs_diff{sfx}": rt["max_abs_diff"]}
        if "kv_max_abs_diff" in rt:
            out["roundtrip_kv_max_abs_diff"] = rt["kv_max_abs_diff"]
    del ref
    log(f"round trip over {len(ids)} windows x 512 tokens  [{time.perf_counter() - t0:.0f}s]")

    models = {"fp32": fp.model_path, "acc0": info.variants[0], "acc4": info.variants[4]}
    runs = [("st", 1)] + ([("mt", None)] if multi_threaded else [])
    timing = {}
    for label, threads in runs:
        timing[label] = speed_compare(models, threads=threads, prompt_len=prompt_len, gen_tokens=gen_tokens,
                                      warmup=warmup, repeats=repeats)
        log(f"timed {label}  [{time.perf_counter() - t0:.0f}s]")
    best = min(("acc0", "acc4"), key=lambda n: timing["st"][n]["decode_ms"])
    for label, res in timing.items():
        sfx = "" if label == "st" else "_mt"
        for name, s in res.items():
            out[f"prefill_ms_{name}{sfx}"] = s["prefill_ms"]
            out[f"decode_ms_{name}{sfx}"] = s["decode_ms"]
            out[f"decode_p90_ms_{name}{sfx}"] = s["decode_p90_ms"]
            if name != "fp32":
                out[f"prefill_speedup_vs_fp32_{name}{sfx}"] = s["prefill_speedup"]
                out[f"decode_speedup_vs_fp32_{name}{sfx}"] = s["decode_speedup"]
                out[f"decode_speedup_paired_{name}{sfx}"] = s["decode_speedup_paired"]
        out[f"prefill_speedup_vs_fp32{sfx}"] = res[best]["prefill_speedup"]
        out[f"decode_speedup_vs_fp32{sfx}"] = res[best]["decode_speedup"]
    out["faster_accuracy_level"] = int(best[3:])

    m = machine()
    log("")
    log(f"machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']} CPUExecutionProvider, fp32, batch 1")
    log(f"protocol: prompt {prompt_len} tokens, greedy decode {gen_tokens} tokens, shared-buffer KV cache, "
        f"{warmup} warm-up + {repeats} timed rounds, interleaved; medians (decode: per token, all steps), p90 "
        "nearest rank")
    log(f"{'model':<14}{'threads':>8}{'prefill ms':>12}{'p90':>9}{'decode ms/tok':>15}{'p90':>8}"
        f"{'prefill x':>11}{'decode x':>10}")
    for label, res in timing.items():
        for name, s in res.items():
            log(f"{name:<14}{label:>8}{s['prefill_ms']:>12.1f}{s['prefill_p90_ms']:>9.1f}{s['decode_ms']:>15.2f}"
                f"{s['decode_p90_ms']:>8.2f}{s['prefill_speedup']:>11.2f}{s['decode_speedup']:>10.2f}")
    log("")
    log(f"round trip (vs qflow {method}, {len(ids)} windows): level 0 KL {out['roundtrip_kl']:.3g} "
        f"top-1 {out['roundtrip_top1_agree']:.4f} max|dlogit| {out['roundtrip_max_abs_diff']:.3g} "
        f"(KV cache vs full forward {out['roundtrip_kv_max_abs_diff']:.3g}); level 4 KL {out['roundtrip_kl_acc4']:.3g} "
        f"top-1 {out['roundtrip_top1_agree_acc4']:.4f}")
    log(f"faster accuracy level: {out['faster_accuracy_level']}")
    log(f"decode_speedup_vs_fp32={out['decode_speedup_vs_fp32']:.2f}")
    log(f"prefill_speedup_vs_fp32={out['prefill_speedup_vs_fp32']:.2f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, help="a qflow IR folder (default: RTN W4 g64 made here)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--multi", action="store_true", help="also time with all cores")
    p.add_argument("--work", type=Path, help="keep the exports here (default: a temporary folder)")
    args = p.parse_args(argv)
    from qflow.models.sources import resolve_model

    model_dir = resolve_model("zoo:smollm2-135m", REPO / "runs" / "cache").path
    with tempfile.TemporaryDirectory(prefix="qflow-onnx-") as tmp:
        run(model_dir, args.work or Path(tmp), ckpt_dir=args.ckpt, n_windows=args.windows, repeats=args.repeats,
            warmup=args.warmup, prompt_len=args.prompt, gen_tokens=args.gen, multi_threaded=args.multi)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
