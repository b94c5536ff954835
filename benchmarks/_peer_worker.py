"""Worker for ``benchmarks/peer_llmcompressor.py``: one llm-compressor quantization + evaluation.

Runs inside ``benchmarks/.peer-venv`` (torch 2.13.0 CPU + llmcompressor 0.14.0.1), never
in qflow's venv, and imports nothing from qflow. One process per (method, bits), so
its time and peak RSS belong to that configuration alone.

    benchmarks/.peer-venv/bin/python benchmarks/_peer_worker.py \\
        --model runs/cache/models/gguf-... --calib calib_ids.pt --eval eval_ids.pt \\
        --method gptq --bits 4 --group-size 64 --out result.json

Steps:

1. Load the float folder (fp32, eager attention, as qflow's ``load_model``).
2. ``oneshot`` with a recipe built from explicit config_groups (int, asymmetric,
   group strategy, ``group_size``, targets Linear, ignore lm_head; the embeddings
   are not Linear and stay float):
     rtn  -> QuantizationModifier
     awq  -> AWQModifier (llm-compressor defaults: n_grid 20, duo_scaling True) + QuantizationModifier
     gptq -> GPTQModifier (llm-compressor defaults: block 128, dampening 0.01, actorder static)
   Calibration data: a ``datasets.Dataset`` of input_ids / attention_mask built from
   the exact [n, 512] token ids qflow's ``calibrate`` stage uses; no shuffling, no
   truncation, batch size 1. ``time.perf_counter`` around ``oneshot`` gives the
   quantization seconds; a thread samples RSS every 20 ms during ``oneshot``.
3. Verify the peer really quantized: for every Linear in the decoder layers, the
   weight llm-compressor's own forward uses (``forward_quantize`` with the module's
   weight_scale / weight_zero_point) must hold at most 2**bits distinct values in
   every group of ``group_size`` inputs, must differ from the float checkpoint's
   weight, and must carry one scale per group; the logits of the peer's own model
   must match a plain float model holding those dequantized weights. Any failure
   exits non-zero with the reason (a silent no-op cannot flatter qflow).
4. Evaluate (docs/METHODS.md section 11/13 default protocol) on the given windows, in lockstep
   with the float model loaded from the same folder: PPL = exp(mean NLL over every
   scored token, 511 per window), KL(p_fp || p_q) over the full vocabulary, and the
   same top-k + tail estimate that qflow's ``evaluate.lm`` reports as ``kl_topk_*``
   (k = ``--topk``, 128), so each KL column uses one definition for both tools.

CPU-only workaround (documented): llmcompressor 0.14.0.1's AWQ calls
``IntermediatesCache.pin_memory`` before every mapping's grid search, and
``Tensor.pin_memory()`` raises on a CPU-only torch build. When no accelerator is
present the worker replaces that method with a no-op (pinning only speeds up
host-to-device copies, which do not happen on CPU), and records the patch in the
result JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for:
# drop this script's folder from the import path.
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _here]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


class Fail(SystemExit):
    """Verification failed: exit code 3 with a message on stderr."""

    def __init__(self, msg: str):
        print(f"PEER VERIFICATION FAILED: {msg}", file=sys.stderr)
        super().__init__(3)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a thread (like qflow's runner, 20 ms period)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def load_float(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 local_files_only=True)
    model.eval()
    return model


def patch_pin_memory() -> bool:
    """No-op ``IntermediatesCache.pin_memory`` when torch has no accelerator (see module doc)."""
    has_acc = bool(getattr(torch, "accelerator", None) and torch.accelerator.is_available())
    if has_acc:
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    def _no_pin(self, batch_index, input_names=None):  # CPU-only torch: pin_memory() raises
        return None

    IntermediatesCache.pin_memory = _no_pin
    return True


def build_recipe(method: str, bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size)
    config_groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    common = {"config_groups": config_groups, "ignore": ["lm_head"]}
    if method == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(**common)], {}
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        awq = AWQModifier()
        return [awq, QuantizationModifier(**common)], {"n_grid": awq.n_grid, "duo_scaling": awq.duo_scaling}
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        g = GPTQModifier(**common)
        actorder = g.actorder
        return [g], {"block_size": g.block_size, "dampening_frac": g.dampening_frac,
                     "actorder": str(getattr(actorder, "value", actorder))}
    raise SystemExit(f"unknown method {method!r}")


def dequantized_weights(model, bits: int, group_size: int, float_sd: dict[str, torch.Tensor]):
    """{linear name: weight as llm-compressor's forward uses it}, after the checks of step 3."""
    from compressed_tensors.quantization import forward_quantize

    out = {}
    n_linear = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or ".layers." not in f".{name}.":
            continue
        n_linear += 1
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            raise Fail(f"{name} carries no weight quantization (scheme={scheme})")
        a = scheme.weights
        if (a.num_bits, a.symmetric, str(getattr(a.strategy, "value", a.strategy)), a.group_size) != \
                (bits, False, "group", group_size):
            raise Fail(f"{name}: scheme {a} is not int{bits} asym group {group_size}")
        with torch.no_grad():
            w = m.weight.detach()
            dq = forward_quantize(m, w, "weight", a).detach().float().clone()
        rows, cols = dq.shape
        if cols % group_size:
            raise Fail(f"{name}: {cols} inputs not divisible by group {group_size}")
        if tuple(m.weight_scale.shape) != (rows, cols // group_size):
            raise Fail(f"{name}: weight_scale shape {tuple(m.weight_scale.shape)} != {(rows, cols // group_size)}")
        g = torch.sort(dq.reshape(rows, cols // group_size, group_size), dim=-1).values
        distinct = 1 + (g[..., 1:] != g[..., :-1]).sum(-1)
        if int(distinct.max()) > 2 ** bits:
            raise Fail(f"{name}: a group holds {int(distinct.max())} distinct values > 2^{bits}")
        if not bool(torch.isfinite(dq).all()):
            raise Fail(f"{name}: non-finite dequantized weight")
        ref = float_sd[name + ".weight"].float()
        changed = float((dq != ref).float().mean())
        rel = float((dq - ref).norm() / ref.norm())
        if changed < 0.5 or rel < 1e-4:
            raise Fail(f"{name}: dequantized weight ~ float weight (changed {changed:.3f}, rel err {rel:.2e})")
        out[name] = dq
    if n_linear == 0:
        raise Fail("no decoder Linear found")
    return out


@torch.no_grad()
def evaluate(q_model, fp_model, ids: torch.Tensor, topk: int, batch_size: int):
    nll, nll_fp, kl_full, kl_topk, top1 = [], [], [], [], []
    for i in range(0, ids.shape[0], batch_size):
        b = ids[i:i + batch_size]
        lp_fp = torch.log_softmax(fp_model(input_ids=b, use_cache=False).logits[:, :-1].float(), dim=-1)
        lp_q = torch.log_softmax(q_model(input_ids=b, use_cache=False).logits[:, :-1].float(), dim=-1)
        tgt = b[:, 1:, None]
        nll.append(-lp_q.gather(-1, tgt).squeeze(-1).double().reshape(-1))
        nll_fp.append(-lp_fp.gather(-1, tgt).squeeze(-1).double().reshape(-1))
        # full-vocabulary KL(p_fp || p_q), fp32 per METHODS §11, accumulated in fp64
        kl_full.append((lp_fp.exp() * (lp_fp - lp_q)).sum(-1).double().clamp(min=0).reshape(-1))
        # qflow's estimator: top-k of the float model + one tail bin (qflow/evaluation/lm.py::topk_kl)
        v, j = lp_fp.topk(max(topk, 5), dim=-1)
        p_l, q_l = v[..., :topk].double(), lp_q.gather(-1, j[..., :topk]).double()
        p = p_l.exp()
        head = (p * (p_l - q_l)).sum(-1)
        p_tail = (1 - p.sum(-1)).clamp(min=0)
        q_tail = (1 - q_l.exp().sum(-1)).clamp(min=0)
        tail = torch.where((p_tail > 1e-12) & (q_tail > 1e-12), p_tail * (p_tail.log() - q_tail.log()),
                           torch.zeros_like(p_tail))
        kl_topk.append((head + tail).clamp(min=0).reshape(-1))
        top1.append((lp_q.argmax(-1) == j[..., 0]).reshape(-1))
        print(f"  eval {min(i + batch_size, ids.shape[0])}/{ids.shape[0]}", file=sys.stderr, flush=True)
    nll, nll_fp = torch.cat(nll), torch.cat(nll_fp)
    return {"ppl": math.exp(float(nll.mean())), "ppl_fp": math.exp(float(nll_fp.mean())),
            "kl_full_mean": float(torch.cat(kl_full).mean()), "kl_topk_mean": float(torch.cat(kl_topk).mean()),
            "top1_agree": float(torch.cat(top1).float().mean()), "n_tokens": int(nll.numel())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help=".pt of int64 [n, seq_len] calibration ids")
    p.add_argument("--eval", required=True, help=".pt of int64 [n, seq_len] evaluation ids")
    p.add_argument("--method", choices=["rtn", "awq", "gptq"], required=True)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file

    calib = torch.load(a.calib, weights_only=True).long()
    eval_ids = torch.load(a.eval, weights_only=True).long()
    result = {"method": a.method, "bits": a.bits, "group_size": a.group_size, "n_calib": int(calib.shape[0]),
              "n_eval_windows": int(eval_ids.shape[0]), "llmcompressor": llmcompressor.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    result["pin_memory_patched"] = patch_pin_memory()

    model = load_float(a.model)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe, settings = build_recipe(a.method, a.bits, a.group_size)
    result["settings"] = settings
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        model = oneshot(model=model, recipe=recipe, dataset=ds, num_calibration_samples=int(calib.shape[0]),
                        max_seq_length=int(calib.shape[1]), shuffle_calibration_samples=False, batch_size=1,
                        output_dir=None) or model
        seconds = time.perf_counter() - t0
    result |= {"seconds": seconds, "peak_rss_bytes": rss.peak, "rss_before_bytes": rss.start,
               "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(f"oneshot {a.method} w{a.bits} g{a.group_size}: {seconds:.1f} s, peak RSS {rss.peak / 2**20:.0f} MiB",
          file=sys.stderr, flush=True)

    # ---- step 3: did it really quantize? --------------------------------------------------
    model.eval()
    files = sorted(Path(a.model).glob("*.safetensors"))
    float_sd = {}
    for f in files:
        float_sd |= load_file(str(f))
    dq = dequantized_weights(model, a.bits, a.group_size, float_sd)
    result["n_quantized_linears"] = len(dq)
    q_model = load_float(a.model)
    own_sd = model.state_dict()
    new_sd = {}
    for k in q_model.state_dict():
        mod = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and mod in dq:
            new_sd[k] = dq[mod]
        elif k in own_sd:
            new_sd[k] = own_sd[k].detach().float()
        else:
            raise Fail(f"peer model lacks {k}")
    missing, unexpected = q_model.load_state_dict(new_sd, strict=False)
    if missing or unexpected:
        raise Fail(f"state dict mismatch: missing {missing[:3]} unexpected {unexpected[:3]}")
    if not torch.equal(q_model.get_input_embeddings().weight, float_sd["model.embed_tokens.weight"].float()):
        raise Fail("embeddings changed: they must stay float")
    with torch.no_grad():
        probe = eval_ids[:1]
        own = model(input_ids=probe, use_cache=False).logits.float()
        plain = q_model(input_ids=probe, use_cache=False).logits.float()
    diff = float((own - plain).abs().max())
    result["own_vs_dequant_max_logit_diff"] = diff
    if diff > 1e-3 * max(1.0, float(own.abs().max())):
        raise Fail(f"peer's own forward differs from its dequantized weights by {diff:.3e} in the logits")
    del model, own_sd, new_sd, dq, own, plain
    gc.collect()

    # ---- step 4: evaluation --------------------------------------------------------------
    fp_model = load_float(a.model)
    t1 = time.perf_counter()
    result |= evaluate(q_model, fp_model, eval_ids, a.topk, a.batch_size)
    result["eval_seconds"] = time.perf_counter() - t1
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
