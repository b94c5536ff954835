"""Run and time qflow's ONNX decoder in onnxruntime (CPUExecutionProvider).

* :func:`make_session` -- a session with a fixed intra-op thread count;
* :class:`OnnxDecoder` -- batch-1 decoding: ``forward`` (whole sequence, empty
  cache, plain numpy feeds) and ``start``/``step`` with a *shared* KV buffer: the
  ``past_key_values.N`` input and ``present.N`` output of each layer are bound to
  one preallocated ``[1, kv_heads, max_len, head_dim]`` OrtValue, so
  GroupQueryAttention appends in place instead of copying the cache every token
  (what onnxruntime-genai does);
* :func:`compare_logits` -- KL / top-1 / max-abs between two logit arrays;
* :func:`time_side_by_side` -- prefill and per-token greedy decode latency of several
  decoders, interleaved repeat by repeat so that background load hits them alike
  (docs/METHODS.md §11: warm-up, median and nearest-rank p90).

Example::

    dec = OnnxDecoder(make_session("out/model.onnx", threads=1))
    logits = dec.forward(ids)                 # [1, seq, vocab]
    dec.start(max_len=600); dec.step(prompt); dec.step(next_token)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


def make_session(path: str | Path, threads: int | None = 1, *, spinning: bool = True):
    """An onnxruntime CPU session; ``threads=None`` or 0 lets onnxruntime use every core."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or 0)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxDecoder:
    """Batch-1 greedy decoding over a qflow ONNX decoder (see module doc)."""

    def __init__(self, session: Any):
        self.session = session
        meta = session.get_modelmeta().custom_metadata_map
        dims = json.loads(meta["qflow.dims"])
        self.n_layers = int(dims["n_layers"])
        self.n_kv_heads = int(dims["n_kv_heads"])
        self.head_dim = int(dims["head_dim"])
        self.max_positions = int(dims["max_positions"])
        self._kv: list[Any] = []
        self._bind: Any = None
        self._max_len = 0
        self.length = 0

    # -- plain run: whole sequence, optional numpy cache ------------------------
    def run(self, ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits, presents) for ``ids [b, s]`` after ``past`` (2 arrays per layer, or None)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b, s = ids.shape
        past_len = 0 if past is None else past[0].shape[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64)}
        empty = np.zeros((b, self.n_kv_heads, 0, self.head_dim), np.float32)
        for i in range(self.n_layers):
            for j, kv in enumerate(("key", "value")):
                feeds[f"past_key_values.{i}.{kv}"] = empty if past is None else past[2 * i + j]
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    def forward(self, ids: np.ndarray) -> np.ndarray:
        return self.run(ids)[0]

    # -- shared-buffer decoding -------------------------------------------------
    def start(self, max_len: int) -> None:
        """Reset the cache; it holds up to ``max_len`` positions (buffers are reused when large enough)."""
        import onnxruntime as ort

        if max_len > self.max_positions:
            raise ValueError(f"max_len {max_len} exceeds the rotary cache ({self.max_positions} positions)")
        if max_len > self._max_len:
            shape = (1, self.n_kv_heads, max_len, self.head_dim)
            self._kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in range(2 * self.n_layers)]
            self._max_len = max_len
            # one binding for the whole generation: the cache buffers stay bound, each step rebinds
            # only input_ids / attention_mask / logits (saves ~0.6 ms of Python per token)
            bind = self.session.io_binding()
            bind.bind_output("logits")  # first: get_outputs()[0]; rebinding keeps the slot
            for i in range(self.n_layers):
                for j, kv in enumerate(("key", "value")):
                    buf = self._kv[2 * i + j]
                    bind.bind_ortvalue_input(f"past_key_values.{i}.{kv}", buf)
                    bind.bind_ortvalue_output(f"present.{i}.{kv}", buf)
            self._bind = bind
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``[1, s, vocab]`` of ``ids [1, s]`` appended to the cache."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)
        total = self.length + ids.shape[1]
        if total > self._max_len:
            raise ValueError(f"cache full: {total} > {self._max_len} positions; call start() with a larger max_len")
        bind = self._bind
        bind.bind_cpu_input("input_ids", ids)
        bind.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        bind.bind_output("logits")  # unallocated again: its shape changes with the step length
        self.session.run_with_iobinding(bind)
        self.length = total
        return bind.get_outputs()[0].numpy()

    def greedy(self, prompt: np.ndarray, n_new: int, clock: Callable[[], float] = time.perf_counter
               ) -> tuple[list[int], float, list[float]]:
        """(generated ids, prefill seconds, per-token decode seconds) of a greedy continuation."""
        prompt = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
        self.start(prompt.shape[1] + n_new)
        t0 = clock()
        logits = self.step(prompt)
        prefill = clock() - t0
        tok = int(logits[0, -1].argmax())
        out, steps = [tok], []
        for _ in range(n_new):
            t0 = clock()
            logits = self.step(np.array([[tok]], np.int64))
            steps.append(clock() - t0)
            tok = int(logits[0, -1].argmax())
            out.append(tok)
        return out, prefill, steps


# ---------------------------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class LogitComparison:
    kl_sum: float = 0.0
    agree: int = 0
    n: int = 0
    max_abs: float = 0.0
    kl_max: float = 0.0

    def add(self, ref: np.ndarray, other: np.ndarray) -> None:
        """Accumulate KL(p_ref || p_other), top-1 agreement (ties: lowest index) and max |Δlogit|."""
        ref = ref.reshape(-1, ref.shape[-1])
        other = other.reshape(-1, other.shape[-1])
        lp, lq = log_softmax(ref), log_softmax(other)
        kl = (np.exp(lp) * (lp - lq)).sum(-1)
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += int((ref.argmax(-1) == other.argmax(-1)).sum())
        self.n += ref.shape[0]
        self.max_abs = max(self.max_abs, float(np.abs(ref.astype(np.float64) - other).max()))

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.n, 1)

    @property
    def top1(self) -> float:
        return self.agree / max(self.n, 1)


def compare_logits(ref: np.ndarray, other: np.ndarray) -> LogitComparison:
    c = LogitComparison()
    c.add(ref, other)
    return c


# ---------------------------------------------------------------------------
def p90(values: list[float]) -> float:
    """Nearest-rank p90: sorted(t)[ceil(0.9 n) - 1]."""
    v = sorted(values)
    return v[max(0, math.ceil(0.9 * len(v)) - 1)]


@dataclass
class Timing:
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)      # every timed decode step
    decode_run_s: list[float] = field(default_factory=list)  # mean per-token time of each timed run

    def summary(self) -> dict[str, float]:
        return {"prefill_ms": 1e3 * float(np.median(self.prefill_s)), "prefill_p90_ms": 1e3 * p90(self.prefill_s),
                "decode_ms": 1e3 * float(np.median(self.decode_s)), "decode_p90_ms": 1e3 * p90(self.decode_s),
                "decode_tok_s": 1.0 / float(np.median(self.decode_s)),
                "n_prefill": len(self.prefill_s), "n_decode": len(self.decode_s)}


WARMUP_DECODE_STEPS = 8


def time_side_by_side(decoders: dict[str, OnnxDecoder], prompt: np.ndarray, n_new: int, *, warmup: int = 1,
                      repeats: int = 3, progress: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Prefill ``prompt`` then greedily decode ``n_new`` tokens with each decoder, interleaved.

    ``warmup`` untimed runs per decoder first (a prefill and up to 8 decode steps
    each: first-run allocations, weight prepacking, caches); then ``repeats`` timed
    rounds, each running every decoder once (order rotated per round, so slow drifts
    of background load hit all decoders alike). Per-token decode latency uses every
    timed step.
    """
    names = list(decoders)
    out = {n: Timing() for n in names}
    for _ in range(warmup):
        for name in names:
            decoders[name].greedy(prompt, min(n_new, WARMUP_DECODE_STEPS))
            if progress:
                progress()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _, prefill, steps = decoders[name].greedy(prompt, n_new)
            t = out[name]
            t.prefill_s.append(prefill)
            t.decode_s.extend(steps)
            t.decode_run_s.append(float(np.mean(steps)) if steps else float("nan"))
            if progress:
                progress()
    return out
