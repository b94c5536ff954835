"""Seconds per training step of ``finetune.distill`` on the bundled model, reference vs fast fake-quant layer.

Builds what the stage builds (RTN W3 g64 start IR, the float model as student with every
quantized linear a ``FakeQuantLinear``, top-k teacher logits of the float model) in a scratch
folder, then times ``--steps`` optimisation steps (loss, backward, AdamW, clamp: the body of
``TrainLoop.run``) for each layer implementation, side by side in the same process:

* ``reference``: the fake-quantized weight written as plain autograd ops (gathers of the per-group
  scale and zero to the weight's shape, straight-through rounding as ``x + (round(x) - x).detach()``);
* ``fast``: the default ``FakeQuantLinear`` (one custom autograd function on the group-shaped weight).

It prints seconds/step of each, the ratio fast/reference, the loss of the first step of each (the
same batch: they must agree) and the load average (the machine is shared). The per-step cost is what
``finetune.distill``'s time scales with; the teacher's one-off forward and the evaluation are not timed.

    .venv/bin/python benchmarks/finetune_step.py --steps 4
    .venv/bin/python benchmarks/finetune_step.py --steps 4 --variants fast      # one variant only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(work: Path, n_windows: int, seq_len: int, topk: int, temperature: float):
    from qflow import registry
    from qflow.artifacts import ModelRef
    from qflow.data.tokens import token_windows
    from qflow.engine.context import StageContext
    from qflow.finetune.teacher import load_teacher, write_teacher
    from qflow.models.loading import load_model
    from qflow.models.sources import resolve_model
    from qflow.quant.ir import Checkpoint
    from qflow.specs import DataSpec

    model_dir = resolve_model("zoo:smollm2-135m", ROOT / "runs" / "cache").path
    net, tok = load_model(model_dir, dtype="float32")
    ids = token_windows(DataSpec(source="zoo:wiki-pages", seq_len=seq_len), tok, n_windows, work / "memo")
    ctx = StageContext(stage_id="quantize", uses="quantize.rtn", key="k", out_dir=work / "q", scratch=work / "qs",
                       run_dir=work / "run", memo_dir=work / "memo", quiet=True, seed=0)
    rtn = registry.get("quantize.rtn")
    out = rtn().run(ctx, rtn.Config(bits=3, group_size=64), model=ModelRef(model_dir))["model"]
    write_teacher(work / "teacher", net.eval(), ids, topk=topk, temperature=temperature)
    del net
    return str(model_dir), Checkpoint(out.path), ids, load_teacher(work / "teacher")


def time_variant(variant: str, model_dir: str, start, ids, teacher, *, steps: int, batch: int, temperature: float):
    import torch

    from qflow.finetune.e2e import build_student
    from qflow.finetune.fakequant import FakeQuantLinear, ReferenceFakeQuantLinear
    from qflow.finetune.teacher import kl_topk

    from qflow.finetune.e2e import compute_precision

    precision = "bfloat16" if variant.endswith("-bf16") else "float32"
    cls = {"fast": FakeQuantLinear, "reference": ReferenceFakeQuantLinear}[variant.removesuffix("-bf16")]
    net, layers = build_student(model_dir, start, lambda s, lin: cls(s, lin.bias, rounding=True, scale=True), "sdpa")
    params = [p for layer in layers.values() for p in layer.trainable().values()]
    opt = torch.optim.AdamW(params, lr=5e-3)
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for step in range(steps + 1):   # step 0 is a warm-up (allocator, thread pools), not timed
        t0 = time.perf_counter()
        idx = torch.randperm(ids.shape[0], generator=g)[:batch]
        opt.zero_grad(set_to_none=True)
        with compute_precision(precision):
            logits = net(input_ids=ids[idx], use_cache=False).logits
        logits = logits.float()
        loss = temperature ** 2 * kl_topk(logits, teacher["values"][idx], teacher["indices"][idx],
                                           teacher["lse"][idx], temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for layer in layers.values():
            layer.clamp_()
        losses.append(float(loss.detach()))
        if step:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times), losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=2, help="windows per step (finetune.distill's batch_size)")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows (teacher cache)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=["reference", "fast"], choices=["reference", "fast", "fast-bf16"],
                    help="fast-bf16: the fast layer under bfloat16 autocast (finetune precision: bfloat16)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from qflow.threads import apply_thread_policy

    choice = apply_thread_policy()
    print(f"threads {torch.get_num_threads()} ({choice}); load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        t0 = time.perf_counter()
        model_dir, start, ids, teacher = build(Path(tmp), args.windows, args.seq_len, 64, 2.0)
        print(f"setup (RTN W3 g64 start, teacher on {args.windows} windows): {time.perf_counter() - t0:.1f} s", flush=True)
        results = {}
        for variant in args.variants:
            load0 = os.getloadavg()[0]
            sec, losses = time_variant(variant, model_dir, start, ids, teacher, steps=args.steps, batch=args.batch,
                                       temperature=2.0)
            results[variant] = sec
            print(f"{variant:9s} {sec:7.2f} s/step  (batch {args.batch} x {args.seq_len} tokens, {args.steps} steps; "
                  f"losses {', '.join(f'{v:.5f}' for v in losses)}; load {load0:.1f} -> {os.getloadavg()[0]:.1f})",
                  flush=True)
        for a, b in (("fast", "reference"), ("fast-bf16", "fast")):
            if a in results and b in results:
                print(f"{a} / {b}: {results[a] / results[b]:.3f}")


if __name__ == "__main__":
    main()
