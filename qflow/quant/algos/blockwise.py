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

import gc
import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ...errors import StageError
from ...models.adapters import ArchAdapter
from ...models.lazy import block_loader, release_freed_memory
from ..ir import CheckpointWriter

STATE_FILE = "blockwise_state.pt"
CRASH_ENV = "QFLOW_TEST_CRASH_AFTER_BLOCK"  # tests: raise after this block's state is saved


class SimulatedCrash(RuntimeError):
    """Raised by the test hook ``QFLOW_TEST_CRASH_AFTER_BLOCK``."""


class _StopForward(Exception):
    """Raised inside a hook once everything a pass needs has been captured."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
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

@dataclass
class Activations:
    """What one pass over the calibration inputs produced."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)   # canonical linear -> [N, T, in]
    outputs: torch.Tensor | None = None                             # block outputs [N, T, hidden]
    module_outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # sub-module -> [N, T, out]


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

        ``capture``: linears whose inputs are kept (``[N, T, in]``, shared inputs once);
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
        keep = list(dict.fromkeys(canon(n) for n in capture))
        streamed = list(dict.fromkeys(canon(n) for n in stream))
        targets = list(dict.fromkeys(keep + streamed))
        mod_outs = list(dict.fromkeys(module_outputs))
        full_pass = outputs or bool(mod_outs)
        acts = Activations()
        seen: set[str] = set()
        handles = []
        span = (0, 0)

        def make(rel: str):
            def hook(module, args):
                x = args[0]
                if not all_finite(x):
                    raise StageError(f"non-finite activations at the input of {rel}", where=self.name,
                                     fix="check the calibration data and the float model (fp16 overflow?)")
                b0, b1 = span
                if rel in keep:
                    buf = acts.inputs.get(rel)
                    if buf is None:
                        buf = torch.empty((data.shape[0], *x.shape[1:]), dtype=x.dtype)
                        acts.inputs[rel] = buf
                    buf[b0:b1] = x
                if rel in streamed and on_input is not None:
                    on_input(rel, x.reshape(-1, x.shape[-1]))
                seen.add(rel)
                if not full_pass and len(seen) == len(targets):
                    raise _StopForward
            return hook

        def make_out(rel: str):
            def hook(module, args, out):
                y = _first(out)
                b0, b1 = span
                buf = acts.module_outputs.get(rel)
                if buf is None:
                    buf = torch.empty((data.shape[0], *y.shape[1:]), dtype=y.dtype)
                    acts.module_outputs[rel] = buf
                buf[b0:b1] = y
            return hook

        for rel in targets:
            handles.append(self.linear(rel).register_forward_pre_hook(make(rel)))
        for rel in mod_outs:
            handles.append(self.module.get_submodule(rel).register_forward_hook(make_out(rel)))
        try:
            for b0 in range(0, data.shape[0], self.batch_size):
                b1 = min(data.shape[0], b0 + self.batch_size)
                span = (b0, b1)
                seen.clear()
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
        missing = [r for r in targets if r not in seen]
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


def _signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()


def load_resume_state(path: Path, log: Any) -> dict[str, Any] | None:
    """A stage's resume state, loaded as data only (``weights_only=True``: tensors, numbers, strings,
    lists, dicts; never pickled code, since anyone who can write a shared runs folder could plant one).
    An unreadable state is a warning and a fresh start, never a crash."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        log.warning("resume state %s is unreadable (%s); starting over", path, str(exc).splitlines()[0][:200])
        return None
    if not isinstance(state, dict) or "signature" not in state:
        log.warning("resume state %s has an unexpected shape; starting over", path)
        return None
    return state


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _publish_tree(src: Path, dest: Path) -> None:
    """Hard-link (or copy) every file of ``src`` into ``dest``; ``src`` stays whole until the engine
    drops the scratch folder, so a crash here leaves a resumable state behind."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        target = dest / p.name
        if target.exists():
            target.unlink()
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


def _shards_present(ir_dir: Path, writer_state: dict[str, Any]) -> bool:
    shards = ({r["shard"] for r in writer_state["layers"].values()} | set(writer_state["floats"].values())
              | {f["shard"] for f in writer_state.get("folds", {}).values()})
    return all((ir_dir / s).is_file() for s in shards)


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
    model.eval()
    blocks = adapter.blocks()
    n_blocks = len(blocks)
    scratch = Path(ctx.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    ir_dir = scratch / "ir"
    state_path = scratch / STATE_FILE
    sig = _signature_hash({"method": method, "n_blocks": n_blocks, "batch_size": batch_size,
                           "ids_shape": list(ids.shape) if ids is not None else None,
                           **(signature or {})})
    if ids is not None:
        check_calibration(ids, model, min_tokens=min_tokens)

    generator = ctx.torch_generator(f"blockwise:{method}") if hasattr(ctx, "torch_generator") else torch.Generator()
    state = None
    state = load_resume_state(state_path, ctx.log)
    if state is not None:
        if state.get("signature") != sig:
            ctx.log.warning("resume state in %s belongs to other settings; starting over", scratch)
            state = None
        elif not _shards_present(ir_dir, state["writer"]):
            ctx.log.warning("resume state in %s lists checkpoint shards that are gone; starting over", scratch)
            state = None
    if state is None:
        if ir_dir.exists():
            shutil.rmtree(ir_dir)
        if state_path.exists():
            state_path.unlink()
    writer = CheckpointWriter(ir_dir, base_model=base_model, method=method, meta=meta)
    records: list[dict[str, Any]] = []
    start = 0
    inputs: torch.Tensor | None = None
    if state is not None:
        writer.restore(state["writer"])
        start = int(state["next_block"])
        inputs = state["inputs"]
        records = list(state["records"])
        generator.set_state(state["generator"])
        ctx.log.info("resuming %s at block %d/%d from %s", method, start, n_blocks, state_path)
    crash_after = os.environ.get(CRASH_ENV)
    crash_after_block = int(crash_after) if crash_after not in (None, "") else None

    loader = block_loader(model)  # None: the whole model is in memory
    with torch.no_grad():
        kwargs_per_block: list[dict[str, Any]] = [{}] * n_blocks
        if ids is not None:
            kwargs_per_block = capture_block_kwargs(model, adapter, ids)
            if inputs is None:
                inputs = capture_block0_inputs(model, adapter, ids, batch_size)
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
                process(block)
                if ids is not None and not block.is_last:
                    if block.next_inputs is None:
                        if propagate == "fp":
                            raise RuntimeError(f"{method}: propagate='fp' but process() set no next_inputs")
                        block.next_inputs = block.run(outputs=True).outputs
                    inputs = block.next_inputs
                else:
                    inputs = None
                del block
                if loader is not None:
                    loader.release(i)
                writer.flush()
                _atomic_save({"signature": sig, "next_block": i + 1, "writer": writer.state(),
                              "inputs": inputs, "records": records, "generator": generator.get_state()},
                             state_path)
                release_freed_memory()  # no gc.collect(): 0.25 s a block, and nothing here forms cycles
                ctx.log.info("%s block %d/%d done in %.1fs", method, i + 1, n_blocks, time.perf_counter() - t0)
                progress.update(1)
                if crash_after_block is not None and i == crash_after_block:
                    raise SimulatedCrash(f"{CRASH_ENV}={crash_after_block}: simulated crash after block {i}")
        finally:
            progress.close()
        writer.close()
    out_dir = Path(ctx.output("model"))
    _publish_tree(ir_dir, out_dir)
    state_path.unlink(missing_ok=True)
    shutil.rmtree(ir_dir, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    rss = peak_rss_bytes()
    ctx.info["peak_rss_bytes"] = rss
    ctx.log_metric("peak_rss_mb", rss / 2**20)
    ctx.log_metric("quantize_seconds", seconds)
    return BlockwiseResult(out_dir, records, seconds, start, rss)


def write_records(ctx: Any, records: list[dict[str, Any]], name: str = "layers.json") -> None:
    """Per-layer table into the stage's report folder (tracked as an artifact)."""
    path = Path(ctx.scratch) / name
    path.write_text(json.dumps(records, indent=1, default=float))
    try:
        ctx.log_artifact(path, name)
    except Exception as exc:  # a report copy must not fail the stage; say so
        ctx.log.warning("could not record %s: %s", name, exc)
