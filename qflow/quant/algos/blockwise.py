"""The block-by-block driver shared by every calibration-based method (AWQ, GPTQ, ...).

Only one decoder block and its calibration activations are alive at a time
(with a model from ``qflow.models.lazy.load_model_lazy`` the other blocks' weights
stay on disk: each block is loaded before ``process`` and freed after it):

1. capture the inputs of block 0 (hidden states, mini-batch by mini-batch) and
   the kwargs every block is called with (rotary position embeddings, mask,
   position ids; cache disabled) with forward pre-hooks that stop the forward;
2. for each block: the method's ``process(block)`` runs the block over the
   cached inputs (``Block.run``: hooks capture linear inputs, or stream them to a
   callback for Hessians), quantizes it and writes it to the checkpoint;
3. the next block's inputs are the FP block's outputs (``propagate="fp"``, AWQ:
   the method sets ``block.next_inputs`` from its first, unmodified pass) or the
   quantized block's outputs (``propagate="quant"``, GPTQ);
4. the checkpoint writer flushes the block, and the resume state (writer index,
   next inputs, block index, generator state, per-layer records) is written
   atomically to ``ctx.scratch``. A killed run re-run with the same cache key
   continues after the last finished block and produces bit-identical output.

The IR is written under ``ctx.scratch/ir`` while the stage runs (scratch survives
a crash; the output folder need not) and linked into ``ctx.output("model")`` at the end.

Example::

    def process(block):
        acts = block.run(capture=["self_attn.q_proj"], outputs=True)
        block.next_inputs = acts.outputs
        ...
        block.writer.add_quantized(block.name + ".self_attn.q_proj", spec, codes, scale, zero)

    result = run_blockwise(ctx, model, adapter, ids, process, method="awq",
                           base_model=str(model_dir), meta={...}, signature={...})
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ...errors import StageError
from ...models.adapters import ArchAdapter
from ...models.lazy import block_loader, fix_mmap_threshold, release_freed_memory
from ..ir import CheckpointWriter
from .resume import BlockState

class _StopForward(Exception):
    """Raised inside a hook once everything a pass needs has been captured."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own address space.
    ``ru_maxrss`` is only the fallback: Linux carries it across fork and exec, so a small process started
    by a large one (a benchmark driver, a sweep, the Python API) would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in ``x``: one fp32 sum (NaN and ±Inf survive it; a sum of finite activations
    would need magnitudes near 1e38 to overflow) instead of a full boolean mask."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32)))


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------
# calibration checks and block-0 capture
# ---------------------------------------------------------------------------

def check_calibration(ids: torch.Tensor, model: nn.Module, *, min_seq_len: int = 2,
                      min_tokens: int = 1) -> None:
    """StageError unless ``ids`` is a usable ``[n_samples, seq_len]`` LongTensor for ``model``."""
    where = "calibration set"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise StageError(f"ids must be a 2-D [n_samples, seq_len] tensor, got "
                         f"{getattr(ids, 'shape', type(ids))}", where=where)
    n, t = ids.shape
    if n < 1 or t < min_seq_len:
        raise StageError(f"calibration data too short: {n} samples x {t} tokens (need >= 1 x {min_seq_len})",
                         where=where, fix="raise calibrate.with.n_samples / seq_len")
    if n * t < min_tokens:
        raise StageError(f"calibration data too short: {n * t} tokens, this method needs >= {min_tokens}",
                         where=where, fix="raise calibrate.with.n_samples or seq_len")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and t > max_pos:
        raise StageError(f"seq_len {t} exceeds the model's max_position_embeddings {max_pos}", where=where,
                         fix=f"use seq_len <= {max_pos}")
    vocab = getattr(model.config, "vocab_size", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise StageError(f"token ids span [{lo}, {hi}] outside the vocabulary [0, {vocab})", where=where,
                         fix="calibrate with the model's own tokenizer")


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    kw.pop("hidden_states", None)
    for key in ("cache", "past_key_values", "past_key_value"):
        if key in kw:
            kw[key] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    kw.pop("output_attentions", None)
    return kw


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor) -> list[dict[str, Any]]:
    """The kwargs each block is called with, from one batch-1 forward of the decoder stack.

    Tensors in them have batch dimension 1 and broadcast over mini-batches. Blocks
    that get the same objects (Llama: all of them) share one dict.
    """
    blocks = adapter.blocks()
    found: list[dict[str, Any] | None] = [None] * len(blocks)
    handles = []

    def make(i: int):
        def hook(module, args, kwargs):
            found[i] = _clean_kwargs(kwargs)
        return hook

    loader = block_loader(model)
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(make(i), with_kwargs=True))
        if loader is not None:  # blocks on disk: each is loaded for its call and freed after it
            handles.append(blk.register_forward_pre_hook(lambda m, a, i=i: loader.load(i)))
            handles.append(blk.register_forward_hook(lambda m, a, o, i=i: loader.release(i)))
    try:
        adapter.base(input_ids=ids[:1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        if loader is not None:
            for i in range(len(blocks)):
                loader.release(i)
            release_freed_memory()
    if any(k is None for k in found):
        raise StageError("the decoder stack did not call every block", where="blockwise capture")
    out: list[dict[str, Any]] = []
    for kw in found:  # blocks called with the same objects share one dict
        same = next((p for p in out if p.keys() == kw.keys() and all(p[k] is kw[k] for k in kw)), None)
        out.append(same if same is not None else kw)
    return out


@torch.no_grad()
def capture_block0_inputs(model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor,
                          batch_size: int) -> torch.Tensor:
    """Hidden states entering block 0, ``[n_samples, seq_len, hidden]`` in the model dtype."""
    block0 = adapter.blocks()[0]
    n = ids.shape[0]
    out: torch.Tensor | None = None
    cur: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        cur["h"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b0 in range(0, n, batch_size):
            b1 = min(n, b0 + batch_size)
            try:
                adapter.base(input_ids=ids[b0:b1], use_cache=False)
            except _StopForward:
                pass
            h = cur.pop("h")
            if out is None:
                out = torch.empty((n, *h.shape[1:]), dtype=h.dtype)
            out[b0:b1] = h
    finally:
        handle.remove()
    assert out is not None
    return out


# ---------------------------------------------------------------------------
# one block
# ---------------------------------------------------------------------------

#: the widest temporary one mini-batch may make (a linear's output of ``rows x width`` fp32):
#: the batch shrinks below the recipe's ``batch_size`` when a block is wide enough to pass it
BATCH_TENSOR_BYTES = 32 * 2**20


def fit_batch_size(block: nn.Module, seq_len: int, batch_size: int,
                   cap_bytes: int = BATCH_TENSOR_BYTES) -> int:
    """Sequences per mini-batch: ``batch_size``, or fewer when a linear of ``block`` would make an
    fp32 temporary over ``cap_bytes`` (at Llama-3.2-1B's MLP width 8192 and 512 tokens: 2, where 8
    made 128 MiB per gate/up/product tensor); at least 1. Per-sequence results do not depend on it."""
    widths = [max(m.in_features, m.out_features) for m in block.modules() if isinstance(m, nn.Linear)]
    if not widths or seq_len <= 0:
        return batch_size
    per_seq = seq_len * max(widths) * 4
    return max(1, min(batch_size, cap_bytes // per_seq))


@dataclass
class Activations:
    """What one pass over the calibration inputs produced."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)   # canonical linear -> [N, T, in]
    outputs: torch.Tensor | None = None                             # block outputs [N, T, hidden]
    module_outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # sub-module -> [N, T, out]


class _PassHooks:
    """The forward hooks of one :meth:`Block.run` pass and what they collect.

    An input hook checks a linear's input, keeps it (rows ``b0:b1`` of the current
    mini-batch) and/or streams it to ``on_input``, and stops the forward once every
    target linear has been seen, unless the pass needs the block's or a sub-module's
    outputs. An output hook keeps a sub-module's output.
    """

    def __init__(self, block_name: str, n_rows: int, *, keep: list[str], streamed: list[str],
                 on_input: Callable[[str, torch.Tensor], None] | None, module_outputs: list[str],
                 outputs: bool) -> None:
        self.block_name = block_name
        self.n_rows = n_rows
        self.keep = list(dict.fromkeys(keep))
        self.streamed = list(dict.fromkeys(streamed))
        self.targets = list(dict.fromkeys(self.keep + self.streamed))
        self.module_outputs = module_outputs
        self.on_input = on_input
        self.full_pass = outputs or bool(module_outputs)
        self.acts = Activations()
        self.seen: set[str] = set()
        self.span = (0, 0)
        self.rows: dict[str, list[torch.Tensor]] = {}   # token-row inputs (experts: their routed tokens)

    def start_batch(self, b0: int, b1: int) -> None:
        self.span = (b0, b1)
        self.seen.clear()

    def input_hook(self, rel: str) -> Callable[..., None]:
        def hook(module, args):
            x = args[0]
            if not all_finite(x):
                raise StageError(f"non-finite activations at the input of {rel}", where=self.block_name,
                                 fix="check the calibration data and the float model (fp16 overflow?)")
            b0, b1 = self.span
            if rel in self.keep and x.dim() == 2:   # [tokens, in]: a variable number per mini-batch
                self.rows.setdefault(rel, []).append(x.detach().clone())
            elif rel in self.keep:
                buf = self.acts.inputs.get(rel)
                if buf is None:
                    buf = torch.empty((self.n_rows, *x.shape[1:]), dtype=x.dtype)
                    self.acts.inputs[rel] = buf
                buf[b0:b1] = x
            if rel in self.streamed and self.on_input is not None:
                self.on_input(rel, x.reshape(-1, x.shape[-1]))
            self.seen.add(rel)
            if not self.full_pass and len(self.seen) == len(self.targets):
                raise _StopForward
        return hook

    def output_hook(self, rel: str) -> Callable[..., None]:
        def hook(module, args, out):
            y = _first(out)
            b0, b1 = self.span
            buf = self.acts.module_outputs.get(rel)
            if buf is None:
                buf = torch.empty((self.n_rows, *y.shape[1:]), dtype=y.dtype)
                self.acts.module_outputs[rel] = buf
            buf[b0:b1] = y
        return hook


@dataclass
class Block:
    """A decoder block being quantized, with its calibration inputs and helpers."""

    index: int
    name: str                     # absolute prefix, e.g. "model.layers.3"
    module: nn.Module
    adapter: ArchAdapter
    writer: CheckpointWriter
    inputs: torch.Tensor | None   # [N, T, hidden]; None for calibration-free methods
    kwargs: dict[str, Any]
    batch_size: int
    generator: torch.Generator
    records: list[dict[str, Any]]
    next_inputs: torch.Tensor | None = None
    is_last: bool = False

    def linear(self, rel: str) -> nn.Linear:
        return self.module.get_submodule(rel)

    def full_name(self, rel: str) -> str:
        return f"{self.name}.{rel}"

    @torch.no_grad()
    def run(self, capture: Iterable[str] = (), *, outputs: bool = False,
            on_input: Callable[[str, torch.Tensor], None] | None = None,
            stream: Iterable[str] = (), module_outputs: Iterable[str] = (),
            inputs: torch.Tensor | None = None,
            forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Activations:
        """One mini-batched pass of the block over its inputs.

        ``capture``: linears whose inputs are kept (``[N, T, in]``, shared inputs once; ``[tokens, in]``
        for a linear called on token rows, e.g. an expert on its routed tokens, possibly none);
        ``stream``: linears whose inputs go to ``on_input(name, x2d)`` per mini-batch
        (Hessians) without being kept; ``module_outputs``: sub-modules whose outputs are
        kept (first element of a tuple); ``outputs``: keep the block outputs. The pass
        stops early once nothing later in the block is needed. Non-finite inputs or
        outputs raise a StageError naming the block and linear. ``inputs``/``forward``
        run a part of the block instead (e.g. the adapter's ``mlp_half`` on the
        residual stream after attention).
        """
        data = self.inputs if inputs is None else inputs
        if data is None:
            raise StageError("this method has no calibration inputs", where=self.name)
        call = forward or (lambda x: _first(self.module(x, **self.kwargs)))
        canon = self.adapter.canonical_input
        hooks = _PassHooks(self.name, data.shape[0], keep=[canon(n) for n in capture],
                           streamed=[canon(n) for n in stream], on_input=on_input,
                           module_outputs=list(dict.fromkeys(module_outputs)), outputs=outputs)
        handles = [self.linear(rel).register_forward_pre_hook(hooks.input_hook(rel)) for rel in hooks.targets]
        handles += [self.module.get_submodule(rel).register_forward_hook(hooks.output_hook(rel))
                    for rel in hooks.module_outputs]
        acts = hooks.acts
        try:
            for b0 in range(0, data.shape[0], self.batch_size):
                b1 = min(data.shape[0], b0 + self.batch_size)
                hooks.start_batch(b0, b1)
                try:
                    out = call(data[b0:b1])
                except _StopForward:
                    continue
                if outputs:
                    if not all_finite(out):
                        raise StageError("non-finite block outputs", where=self.name,
                                         fix="check the calibration data and the float model")
                    if acts.outputs is None:
                        acts.outputs = torch.empty((data.shape[0], *out.shape[1:]), dtype=out.dtype)
                    acts.outputs[b0:b1] = out
        finally:
            for h in handles:
                h.remove()
        for rel, rows in hooks.rows.items():
            acts.inputs[rel] = torch.cat(rows)
        # a routed linear (an expert) may get no token at all: its kept input is then empty
        for rel in hooks.keep:
            if rel not in acts.inputs and self.adapter.routed(rel):
                lin = self.linear(rel)
                acts.inputs[rel] = torch.empty((0, lin.in_features), dtype=lin.weight.dtype)
        missing = [r for r in hooks.targets if r not in hooks.seen and not self.adapter.routed(r)]
        if missing:
            raise StageError(f"the block never called {', '.join(missing)}", where=self.name,
                             fix="the architecture adapter does not match this model")
        return acts

    def record(self, **row: Any) -> None:
        """A per-layer fact for the run's report (kept across resume)."""
        self.records.append({"block": self.index, **row})


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------

@dataclass
class BlockwiseResult:
    checkpoint_dir: Path
    records: list[dict[str, Any]]
    seconds: float
    resumed_from: int
    peak_rss_bytes: int


def run_blockwise(ctx: Any, model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor | None,
                  process: Callable[[Block], None], *, method: str, base_model: str,
                  meta: dict[str, Any] | None = None, signature: dict[str, Any] | None = None,
                  propagate: str = "quant", batch_size: int = 8, desc: str = "",
                  min_tokens: int = 1) -> BlockwiseResult:
    """Quantize ``model`` block by block with ``process`` and write the IR; see the module doc.

    ``ids`` is ``[n_samples, seq_len]`` (None for calibration-free methods).
    ``signature`` must cover everything the output depends on (it guards resume).
    """
    if propagate not in ("fp", "quant"):
        raise ValueError(f"propagate must be 'fp' or 'quant', got {propagate!r}")
    t_start = time.perf_counter()
    fix_mmap_threshold()   # large temporaries mapped and unmapped, not fragmenting the heap (models/lazy.py)
    model.eval()
    blocks = adapter.blocks()
    n_blocks = len(blocks)
    if ids is not None and n_blocks:
        fitted = fit_batch_size(blocks[0], ids.shape[1], batch_size)
        if fitted < batch_size:
            ctx.log.info("mini-batch: %d sequences (of %d asked) so one temporary stays under %d MiB",
                         fitted, batch_size, BATCH_TENSOR_BYTES // 2**20)
            batch_size = fitted
    resume = BlockState(ctx.scratch, {"method": method, "n_blocks": n_blocks, "batch_size": batch_size,
                                      "ids_shape": list(ids.shape) if ids is not None else None,
                                      **(signature or {})}, ctx.log)
    if ids is not None:
        check_calibration(ids, model, min_tokens=min_tokens)

    generator = ctx.torch_generator(f"blockwise:{method}") if hasattr(ctx, "torch_generator") else torch.Generator()
    state = resume.load()  # before the writer opens the folder: a stale state's shards are deleted here
    writer = CheckpointWriter(resume.ir_dir, base_model=base_model, method=method, meta=meta)
    start, inputs, records = _restore(ctx, state, writer, generator, method, n_blocks, resume.path)

    loader = block_loader(model)  # None: the whole model is in memory
    with torch.no_grad():
        kwargs_per_block: list[dict[str, Any]] = [{}] * n_blocks
        if ids is not None:
            kwargs_per_block = capture_block_kwargs(model, adapter, ids)
            if inputs is None:
                inputs = capture_block0_inputs(model, adapter, ids, batch_size)
        if loader is not None:   # the embedding rows just read stay mapped in the RSS otherwise
            loader.page_out_mapped()
        progress = ctx.progress(total=n_blocks, desc=desc or f"{method} blocks")
        if start:
            progress.update(start, note="resumed")
        try:
            for i in range(start, n_blocks):
                t0 = time.perf_counter()
                if loader is not None:
                    loader.load(i)
                block = Block(index=i, name=adapter.block_name(i), module=blocks[i], adapter=adapter,
                              writer=writer, inputs=inputs, kwargs=kwargs_per_block[i], batch_size=batch_size,
                              generator=generator, records=records, is_last=i == n_blocks - 1)
                del inputs   # the block holds them: a method may drop them once no pass needs them (AWQ)
                process(block)
                inputs = _next_inputs(block, calibrated=ids is not None, propagate=propagate, method=method)
                del block
                if loader is not None:
                    loader.release(i)
                writer.flush()
                resume.save(i + 1, writer, inputs=inputs, records=records, generator=generator.get_state())
                release_freed_memory()  # no gc.collect(): 0.25 s a block, and nothing here forms cycles
                ctx.log.info("%s block %d/%d done in %.1fs", method, i + 1, n_blocks, time.perf_counter() - t0)
                progress.update(1)
        finally:
            progress.close()
        writer.close()
    return finish(ctx, resume, records, start, t_start)


def finish(ctx: Any, resume: BlockState, records: list[dict[str, Any]], start: int, t_start: float) -> BlockwiseResult:
    """Publish a block-wise stage's IR into its output and report time and peak RSS."""
    out_dir = resume.publish(ctx.output("model"))
    seconds = time.perf_counter() - t_start
    rss = peak_rss_bytes()
    ctx.info["peak_rss_bytes"] = rss
    ctx.log_metric("peak_rss_mb", rss / 2**20)
    ctx.log_metric("quantize_seconds", seconds)
    return BlockwiseResult(out_dir, records, seconds, start, rss)


def _restore(ctx: Any, state: dict[str, Any] | None, writer: CheckpointWriter, generator: torch.Generator,
             method: str, n_blocks: int, state_path: Path) -> tuple[int, torch.Tensor | None, list[dict[str, Any]]]:
    """(first block to run, its inputs, records so far): a saved resume state put back into ``writer``
    and ``generator``, or a fresh start (block 0, inputs still to capture) when there is none."""
    if state is None:
        return 0, None, []
    writer.restore(state["writer"])
    generator.set_state(state["generator"])
    start = int(state["next_block"])
    ctx.log.info("resuming %s at block %d/%d from %s", method, start, n_blocks, state_path)
    return start, state["inputs"], list(state["records"])


def _next_inputs(block: Block, *, calibrated: bool, propagate: str, method: str) -> torch.Tensor | None:
    """The next block's inputs once ``process(block)`` is done (None without calibration or after the last)."""
    if not calibrated or block.is_last:
        return None
    if block.next_inputs is None:
        if propagate == "fp":
            raise RuntimeError(f"{method}: propagate='fp' but process() set no next_inputs")
        block.next_inputs = block.run(outputs=True).outputs
    return block.next_inputs


def write_records(ctx: Any, records: list[dict[str, Any]], name: str = "layers.json") -> None:
    """Per-layer table into the stage's report folder (tracked as an artifact)."""
    path = Path(ctx.scratch) / name
    path.write_text(json.dumps(records, indent=1, default=float))
    try:
        ctx.log_artifact(path, name)
    except Exception as exc:  # a report copy must not fail the stage; say so
        ctx.log.warning("could not record %s: %s", name, exc)
