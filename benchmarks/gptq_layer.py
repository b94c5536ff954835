"""GPTQ on the bundled model's layer shapes: qflow now vs the previous implementation, side by side.

Reference: ``benchmarks/_gptq_previous.py`` (the code before issue 18: two
Cholesky factorisations and a Cholesky inverse per linear, none shared). Both run
in this process on the same random layer and Hessian (correlated activations,
2048 tokens), alternating old/new every repeat so load drift hits both alike;
median of ``--repeats`` (>= 5) after one warm-up each. Rows:

* one linear per shape of SmolLM2-135M (``[out, in]``: 576x576 q/o, 1536x576
  gate/up, 576x1536 down), W4 g64, act-order, static groups;
* one whole decoder block (q, k, v, o, gate, up, down with k/v 192x576): the new
  code factors each distinct input's Hessian once (q/k/v share one, gate/up
  one), as ``gptq_model`` does.

Prints seconds and the ratio new/old per row, the thread count, and the load
average before and after (a shared machine: the ratio is the figure to quote).

Example::

    .venv/bin/python benchmarks/gptq_layer.py --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _gptq_previous as previous  # noqa: E402
from qflow.quant.algos import gptq  # noqa: E402
from qflow.quant.spec import QuantSpec  # noqa: E402

HIDDEN, INTER, KV = 576, 1536, 192
SHAPES = {"q/o 576x576": (HIDDEN, HIDDEN), "gate/up 1536x576": (INTER, HIDDEN), "down 576x1536": (HIDDEN, INTER)}
BLOCK = [("q", HIDDEN, "attn"), ("k", KV, "attn"), ("v", KV, "attn"), ("o", HIDDEN, "o"),
         ("gate", INTER, "mlp"), ("up", INTER, "mlp"), ("down", HIDDEN, "down")]


def hessian(d: int, g: torch.Generator, tokens: int = 2048) -> torch.Tensor:
    x = torch.randn(tokens, d, generator=g) @ (torch.randn(d, d, generator=g) / d ** 0.5)
    x = x * torch.rand(d, generator=g).mul(3).add(0.1)         # uneven channel scales, like activations
    return 2.0 / tokens * x.t() @ x


def side_by_side(old, new, repeats: int) -> tuple[float, float]:
    old(), new()                                                # warm-up
    t_old, t_new = [], []
    for r in range(repeats):
        pair = [(old, t_old), (new, t_new)]
        for fn, acc in (pair if r % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(t_old), statistics.median(t_new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # the column-loop kernel
    spec = QuantSpec(bits=4, group_size=64)
    g = torch.Generator().manual_seed(0)
    kw = {"block_size": 128, "percdamp": 0.01, "act_order": True, "static_groups": True}
    print(f"GPTQ layer benchmark: torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"median of {args.repeats}, load average before {os.getloadavg()[0]:.2f}")
    print(f"{'row':<22}{'old s':>9}{'new s':>9}{'new/old':>9}")
    for label, (out, d) in SHAPES.items():
        H, W = hessian(d, g), torch.randn(out, d, generator=g)
        t_old, t_new = side_by_side(lambda: previous.gptq_quantize(W, H, spec, **kw),
                                    lambda: gptq.gptq_quantize(W, H, spec, **kw), args.repeats)
        print(f"{label:<22}{t_old:>9.4f}{t_new:>9.4f}{t_new / t_old:>9.2f}")

    inputs = {"attn": hessian(HIDDEN, g), "o": hessian(HIDDEN, g), "mlp": hessian(HIDDEN, g),
              "down": hessian(INTER, g)}
    weights = [(torch.randn(out, inputs[key].shape[0], generator=g), key) for _, out, key in BLOCK]

    def old_block():
        for W, key in weights:
            previous.gptq_quantize(W, inputs[key], spec, **kw)

    def new_block():
        factors = {}
        for W, key in weights:
            if key not in factors:
                factors[key] = gptq.factor_hessian(inputs[key], percdamp=0.01, act_order=True)
            gptq.gptq_quantize(W, inputs[key], spec, factor=factors[key], **kw)

    t_old, t_new = side_by_side(old_block, new_block, args.repeats)
    print(f"{'decoder block (7)':<22}{t_old:>9.4f}{t_new:>9.4f}{t_new / t_old:>9.2f}")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print(f"gptq_block_new_vs_old={t_new / t_old:.3f}")


if __name__ == "__main__":
    main()
