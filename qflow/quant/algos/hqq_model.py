"""HQQ over a whole model (docs/METHODS.md §7): calibration-free, one linear at a time.

Weights are streamed from the float folder's safetensors files (no model is
built), each decoder linear is quantized with
:func:`qflow.quant.algos.hqq.hqq_quantize` (ASYM-H, float zero), and the
checkpoint is flushed per decoder block. Like the block-wise driver, the IR is
written under ``ctx.scratch/ir`` with a resume state after every block, so a
killed run continues where it stopped and gives the same bytes.

Example::

    opts = HQQOptions(bits=4, group_size=64)
    quantize_model_hqq(ctx, model_dir, opts, names=linear_names(model_dir))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import StageError
from ..ir import CheckpointWriter
from ..spec import QuantSpec
from .blockwise import BlockwiseResult, finish, write_records
from .resume import BlockState


@dataclass(frozen=True)
class HQQOptions:
    """HQQ settings (mobiusml/hqq defaults: 4 bit, G=64, p=0.7, β=10, κ=1.01, 20 iterations, early stop)."""

    bits: int = 4
    group_size: int = 64
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    zero_float: bool = True
    scale_dtype: str = "float16"

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, scheme="asym_h", zero_float=self.zero_float,
                         scale_dtype=self.scale_dtype)


def _blocks(names: list[str]) -> list[list[str]]:
    from ..weights import block_index

    out: list[list[str]] = []
    current: object = object()
    for name in names:
        b = block_index(name)
        if b != current or not out:
            out.append([])
            current = b
        out[-1].append(name)
    return out


def quantize_model_hqq(ctx: Any, model_dir: str | Path, opts: HQQOptions, names: list[str], *,
                       meta: dict[str, Any] | None = None,
                       spec_for: Callable[[str], QuantSpec | None] | None = None) -> BlockwiseResult:
    """HQQ-quantize the linears ``names`` of the float folder ``model_dir`` and write the IR.

    ``spec_for(name)``: each layer's spec (default: ``opts.spec()`` for all; qflow/quant/layerspec.py).
    """
    from ..weights import iter_linear_weights
    from .hqq import hqq_quantize

    t_start = time.perf_counter()
    base = opts.spec()
    layer_spec = {n: spec_for(n) if spec_for is not None else base for n in names}
    names = [n for n in names if layer_spec[n] is not None]   # None: left float
    if not names:
        raise StageError("no linear layers to quantize", where="quantize.hqq.targets", fix="adjust targets")
    resume = BlockState(ctx.scratch, {"method": "hqq", "options": asdict(opts), "names": names,
                                      "specs": {n: s.model_dump(mode="json") for n, s in layer_spec.items()
                                                if s is not None and s != base}}, ctx.log)
    state = resume.load()
    writer = CheckpointWriter(resume.ir_dir, base_model=str(model_dir), method="hqq", meta=meta)
    groups = _blocks(names)
    start, records = 0, []
    if state is not None:
        writer.restore(state["writer"])
        start, records = int(state["next_block"]), list(state["records"])
        ctx.log.info("resuming hqq at block %d/%d", start, len(groups))
    with ctx.progress(len(groups), "hqq blocks") as bar:
        if start:
            bar.update(start, note="resumed")
        for i in range(start, len(groups)):
            for name, w in iter_linear_weights(Path(model_dir), groups[i]):
                if not bool(torch.isfinite(w).all()):
                    raise StageError(f"{name} has non-finite weights", where=str(model_dir), fix="check the source model")
                spec = layer_spec[name]
                problem = spec.check_shape(*w.shape)
                if problem:
                    raise StageError(f"{name}: {problem}", where="quantize.hqq.group_size",
                                     fix="choose a group size that divides every layer width")
                res = hqq_quantize(w, spec, lp_norm=opts.lp_norm, beta=opts.beta, kappa=opts.kappa,
                                   iters=opts.iters, early_stop=opts.early_stop)
                writer.add_quantized(name, spec, res.codes, res.scale, res.zero)
                records.append({"layer": name, "err_minmax": res.errors[0] if res.errors else None,
                                "err_final": res.final_error, "iterations": len(res.errors)})
            writer.flush()
            resume.save(i + 1, writer, records=records)
            bar.update(1)
    writer.close()
    result = finish(ctx, resume, records, start, t_start)
    write_records(ctx, records, "hqq_layers.json")
    return result
