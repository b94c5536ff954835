"""Perplexity and distribution metrics vs the float model (docs/METHODS.md §11).

Two KL numbers, both ``KL(p_fp || p_q) = sum_v p_fp(v) (log p_fp(v) - log p_q(v))`` per
scored token, in nats, float model first:

* ``kl_*`` (the default, always computed when ``exact`` is on): **exact, full
  vocabulary**. The float model's final hidden states (after the final norm) are
  cached with the reference (``n_windows x (seq_len-1) x hidden`` values: 173 MB for
  147 x 512 tokens of a 576-wide model), so the float logits of each chunk are the
  float output head applied to them: the same numbers as a float forward, at the cost
  of the head alone. Above :data:`HIDDEN_CACHE_BYTES`, or when the head cannot be split
  off, the float logits are recomputed by a float forward per window batch (about
  +100% of the quantized pass). Both log-softmaxes and the sum over the
  vocabulary run in fp64 from the logits, over chunks of positions (bounded memory
  for large vocabularies; fp32 log-softmax would add ~1e-6 nats of rounding). Storing the float distributions
  instead would cost ``n_windows x (seq_len-1) x vocab x 2`` bytes in fp16 (1.6 GB for 32 x 512 tokens
  of a 49k vocabulary).
* ``kl_topk_*``: **top-k estimate (lower bound)**. The float model's per-token
  results are cached once per (model, windows): the NLL of every target plus the
  top-k log-probabilities (indices and values) of every position. KL is computed
  over the k kept tokens plus one "tail" bin holding the rest of the mass: the KL
  of both distributions coarsened to the same k+1 bins, which by the log-sum
  inequality never exceeds the full-vocabulary KL (up to fp32 rounding of the
  tail mass, ~1e-7 nats per token). ``topk: 0`` disables it.

Example::

    ref = float_reference(fp_model, ids, batch_size=4, topk=128)
    summarize(compare_to_reference(q_model, ids, ref, batch_size=4, topk=128, fp_model=fp_model))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

# elements of one chunk of positions x vocabulary: 16 MiB in fp32, 32 MiB in fp64 (exact KL holds ~4 such)
CHUNK_ELEMENTS = 1 << 22
# largest float hidden-state cache kept with the reference (bytes); above it the exact KL re-runs the float model
HIDDEN_CACHE_BYTES = 2 << 30


@dataclass
class FloatReference:
    nll: torch.Tensor          # [n_win, L-1] float64
    topk_idx: torch.Tensor     # [n_win, L-1, k] int32 (sorted by probability, descending)
    topk_logp: torch.Tensor    # [n_win, L-1, k] float32
    # [n_win, L-1, hidden] model dtype: final hidden states (split head only; None: not kept)
    hidden: torch.Tensor | None = None

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"nll": self.nll, "topk_idx": self.topk_idx, "topk_logp": self.topk_logp}, folder / "fp_ref.pt")
        if self.hidden is not None:
            torch.save({"hidden": self.hidden}, folder / "fp_hidden.pt")

    @classmethod
    def load(cls, folder: Path) -> "FloatReference":
        d = torch.load(folder / "fp_ref.pt", weights_only=True)
        hidden = None
        if (folder / "fp_hidden.pt").is_file():
            hidden = torch.load(folder / "fp_hidden.pt", weights_only=True)["hidden"]
        return cls(d["nll"], d["topk_idx"], d["topk_logp"], hidden)


def _next_token_logits(model, batch: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, L-1, V]`` (model dtype, model device) predicting every next token of ``batch``."""
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device), use_cache=False).logits[:, :-1]


def _split_head(model):
    """(body, head, softcap) computing the logits from the final hidden states, or None (unknown layout).

    ``body`` returns the hidden states after the final norm (``last_hidden_state``),
    ``head`` is the output embedding; ``softcap`` the config's ``final_logit_softcapping``
    (``c·tanh(x/c)``, Gemma 2/3) or None. Anything else a model does to its logits is
    caught by :func:`_split_matches` (then the full logits are used).
    """
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        body, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if body is None or head is None or body is model:
        return None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return body, head, softcap


class _BatchLogits:
    """Next-token logits of one window batch, produced a chunk of positions at a time.

    Split mode runs the decoder once (hidden states ``[B, L-1, hidden]`` kept) and
    applies the output head per chunk, so no ``[B, L-1, V]`` tensor ever exists: the
    peak for a 262k vocabulary is one chunk (:data:`CHUNK_ELEMENTS`), not the batch.
    Otherwise (a model whose head cannot be split off) the full logits are computed once.
    """

    def __init__(self, model, batch: torch.Tensor, split) -> None:
        device = next(model.parameters()).device
        self.split = split
        if split is None:
            self.full = _next_token_logits(model, batch)
            self.shape = tuple(self.full.shape)
        else:
            body, self.head, self.softcap = split
            out = body(input_ids=batch.to(device), use_cache=False)
            self.hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1]
            vocab = self._head(self.hidden[0, :1]).shape[-1]
            self.shape = (self.hidden.shape[0], self.hidden.shape[1], vocab)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def chunk(self, b: int, s: int, e: int) -> torch.Tensor:
        """Logits ``[e - s, V]`` of window ``b``, positions ``s..e-1``."""
        if self.split is None:
            return self.full[b, s:e]
        return self._head(self.hidden[b, s:e])

    @property
    def device(self) -> torch.device:
        return (self.full if self.split is None else self.hidden).device


def _split_matches(model, split, ids: torch.Tensor, tokens: int = 16) -> bool:
    """Whether ``split`` reproduces the model's own logits on the first ``tokens`` of a window."""
    if split is None:
        return False
    probe = ids[:1, :min(tokens, ids.shape[1])]
    with torch.no_grad():
        full = _next_token_logits(model, probe).float()
        parts = _BatchLogits(model, probe, split)
        mine = parts.chunk(0, 0, parts.shape[1]).float()[None]
    if mine.shape != full.shape:
        return False
    tol = 1e-3 * float(full.abs().max().clamp(min=1.0))
    return bool(((mine - full).abs() <= tol + 1e-3 * full.abs()).all())


def logit_source(model, ids: torch.Tensor):
    """How :func:`float_reference` / :func:`compare_to_reference` get ``model``'s logits: the split
    head when it reproduces the model's own logits on a probe (checked here, once), else None (full)."""
    split = _split_head(model)
    return split if _split_matches(model, split, ids) else None


def _chunks(shape: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
    """(window, first position, end position) chunks of ``[B, L-1, V]`` of at most CHUNK_ELEMENTS each."""
    rows = max(1, CHUNK_ELEMENTS // shape[-1])
    for b in range(shape[0]):
        for s in range(0, shape[1], rows):
            yield b, s, min(s + rows, shape[1])


def ranked_topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, indices) sorted by value descending, ties by lowest token id (docs/METHODS.md §11).

    ``torch.topk`` leaves the order of equal values unspecified; a tiny or
    saturated model has exact ties, and the float model compared with itself
    must agree on every token.
    """
    v, j = logp.topk(k, dim=-1)
    j, perm = j.sort(dim=-1)
    v = v.gather(-1, perm)
    v, perm = v.sort(dim=-1, descending=True, stable=True)
    return v, j.gather(-1, perm)


def float_reference(model, ids: torch.Tensor, *, batch_size: int, topk: int,
                    progress: Callable[[int], None] | None = None, chunked: bool = True,
                    keep_hidden: bool = True) -> FloatReference:
    """The float model's NLL and ranked top-max(topk, 5) log-probs of every scored position.

    ``chunked``: the output head runs a chunk of positions at a time (see :class:`_BatchLogits`);
    False materialises each batch's full logits (the same numbers; tests compare the two).
    ``keep_hidden``: also keep the final hidden states (split head, at most :data:`HIDDEN_CACHE_BYTES`),
    from which :func:`compare_to_reference` rebuilds the float logits without a float forward.
    """
    k = max(topk, 5)
    n_win, n_pos = ids.shape[0], ids.shape[1] - 1
    nll = torch.empty(n_win, n_pos, dtype=torch.float64)
    idx = torch.empty(n_win, n_pos, k, dtype=torch.int32)
    vals = torch.empty(n_win, n_pos, k, dtype=torch.float32)
    split = logit_source(model, ids) if chunked else None
    hidden = None
    with torch.no_grad():
        for i in range(0, n_win, batch_size):
            batch = ids[i:i + batch_size]
            logits = _BatchLogits(model, batch, split)
            if keep_hidden and split is not None and i == 0:
                width, dtype = logits.hidden.shape[-1], logits.hidden.dtype
                if n_win * n_pos * width * logits.hidden.element_size() <= HIDDEN_CACHE_BYTES:
                    hidden = torch.empty(n_win, n_pos, width, dtype=dtype)
            if hidden is not None:
                hidden[i:i + batch.shape[0]] = logits.hidden.cpu()
            targets = batch[:, 1:].to(logits.device)
            for b, s, e in _chunks(logits.shape):
                logp = torch.log_softmax(logits.chunk(b, s, e).float(), dim=-1)
                nll[i + b, s:e] = -logp.gather(-1, targets[b, s:e, None]).squeeze(-1).double().cpu()
                v, j = ranked_topk(logp, k)
                idx[i + b, s:e], vals[i + b, s:e] = j.to(torch.int32).cpu(), v.cpu()
            del logits
            if progress:
                progress(batch.shape[0])
    return FloatReference(nll, idx, vals, hidden)


class _CachedLogits:
    """Float logits of one window batch from the reference's cached hidden states and the float head."""

    def __init__(self, hidden: torch.Tensor, split, device) -> None:
        _, self.head, self.softcap = split
        self.hidden, self.device = hidden, device

    def chunk(self, b: int, s: int, e: int) -> torch.Tensor:
        logits = self.head(self.hidden[b, s:e].to(self.device))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class Comparison:
    nll: torch.Tensor               # [n_tok] float64, quantized model
    nll_fp: torch.Tensor            # [n_tok]
    kl: torch.Tensor | None         # [n_tok] float64: exact full-vocabulary KL(p_fp || p_q); None: not computed
    kl_topk: torch.Tensor | None    # [n_tok] float64: top-k + tail-bin estimate (lower bound); None: topk 0
    top1: torch.Tensor              # [n_tok] bool
    top5: torch.Tensor              # [n_tok] float (overlap fraction of top-5 sets)


def exact_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary ``KL(softmax(p) || softmax(q))`` over the last dim from logits, in fp64 (0·log 0 = 0)."""
    p_logp = torch.log_softmax(p_logits.double(), dim=-1)
    q_logp = torch.log_softmax(q_logits.double(), dim=-1)
    p = p_logp.exp()
    terms = torch.where(p > 0, p * (p_logp - q_logp), torch.zeros((), dtype=torch.float64, device=p.device))
    return terms.sum(-1).clamp(min=0)


def compare_to_reference(model, ids: torch.Tensor, ref: FloatReference, *, batch_size: int, topk: int,
                         fp_model=None, progress: Callable[[int], None] | None = None,
                         chunked: bool = True) -> Comparison:
    """Quantized ``model`` vs the float reference; exact KL too when the float ``fp_model`` is given.

    ``fp_model is model`` (the float model evaluated against itself) reuses the one forward.
    ``chunked``: logits a chunk of positions at a time (peak memory one chunk, not a batch).
    When ``ref`` kept the float hidden states, the float logits are ``fp_model``'s head applied to
    them (no float forward); otherwise ``fp_model`` runs on each window batch.
    """
    n_win, n_pos = ids.shape[0], ids.shape[1] - 1
    k = ref.topk_idx.shape[-1]
    nll = torch.empty(n_win, n_pos, dtype=torch.float64)
    top1 = torch.empty(n_win, n_pos, dtype=torch.bool)
    top5 = torch.empty(n_win, n_pos, dtype=torch.float32)
    kl = torch.empty(n_win, n_pos, dtype=torch.float64) if fp_model is not None else None
    kl_topk = torch.empty(n_win, n_pos, dtype=torch.float64) if topk > 0 else None
    split = logit_source(model, ids) if chunked else None
    split_fp = None
    if chunked and fp_model is not None and fp_model is not model:
        split_fp = logit_source(fp_model, ids)
    with torch.no_grad():
        for i in range(0, n_win, batch_size):
            batch = ids[i:i + batch_size]
            logits = _BatchLogits(model, batch, split)
            logits_fp = None
            if fp_model is not None and fp_model is not model:
                if ref.hidden is not None and split_fp is not None:
                    logits_fp = _CachedLogits(ref.hidden[i:i + batch.shape[0]], split_fp, logits.device)
                else:
                    logits_fp = _BatchLogits(fp_model, batch, split_fp)
            targets = batch[:, 1:].to(logits.device)
            for b, s, e in _chunks(logits.shape):
                chunk = logits.chunk(b, s, e)
                logp = torch.log_softmax(chunk.float(), dim=-1)
                nll[i + b, s:e] = -logp.gather(-1, targets[b, s:e, None]).squeeze(-1).double().cpu()
                ref_idx = ref.topk_idx[i + b, s:e].long().to(logp.device)
                # the same k and tie rule as the reference, so that equal models agree exactly
                q_top5 = ranked_topk(logp, k)[1][..., :5]
                top1[i + b, s:e] = (q_top5[..., 0] == ref_idx[..., 0]).cpu()
                top5[i + b, s:e] = (q_top5.unsqueeze(-1) == ref_idx[..., :5].unsqueeze(-2)).any(-1).float().mean(-1).cpu()
                if kl_topk is not None:
                    ref_logp = ref.topk_logp[i + b, s:e, :topk].to(logp.device)
                    kl_topk[i + b, s:e] = topk_kl(ref_logp, logp.gather(-1, ref_idx[..., :topk])).cpu()
                if kl is not None:
                    if logits_fp is None:
                        kl[i + b, s:e] = 0.0
                    else:
                        kl[i + b, s:e] = exact_kl(logits_fp.chunk(b, s, e).to(chunk.device), chunk).cpu()
            del logits, logits_fp
            if progress:
                progress(batch.shape[0])
    return Comparison(nll.reshape(-1), ref.nll.reshape(-1), kl.reshape(-1) if kl is not None else None,
                      kl_topk.reshape(-1) if kl_topk is not None else None, top1.reshape(-1), top5.reshape(-1))


def topk_kl(p_logp: torch.Tensor, q_logp_at: torch.Tensor) -> torch.Tensor:
    """KL over k kept tokens + one tail bin; inputs are log-probs at the same k token ids (a lower bound
    of the full-vocabulary KL: both distributions coarsened to the same k+1 bins)."""
    p_logp = p_logp.double()
    q_logp_at = q_logp_at.double()
    p = p_logp.exp()
    head = (p * (p_logp - q_logp_at)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    q_tail = (1 - q_logp_at.exp().sum(-1)).clamp(min=0)
    tail = torch.where((p_tail > 1e-12) & (q_tail > 1e-12), p_tail * (p_tail.log() - q_tail.log()),
                       torch.zeros_like(p_tail))
    return (head + tail).clamp(min=0)


def nearest_rank(values: torch.Tensor, q: float) -> float:
    """Nearest-rank percentile: sorted ``t[ceil(q n) - 1]``."""
    s = torch.sort(values.double().reshape(-1)).values
    n = s.numel()
    return float(s[max(0, math.ceil(q * n) - 1)])


def window_means(values: torch.Tensor, n_windows: int) -> torch.Tensor:
    """Per-window means of a per-token series (``[n_windows * (L-1)]`` -> ``[n_windows]``, float64)."""
    return values.double().reshape(n_windows, -1).mean(1)


def _kl_stats(prefix: str, kl: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_mean": float(kl.mean()), f"{prefix}_median": nearest_rank(kl, 0.5),
            f"{prefix}_p99": nearest_rank(kl, 0.99), f"{prefix}_max": float(kl.max())}


def summarize(c: Comparison) -> dict[str, float]:
    """Point metrics: ``kl_*`` exact full-vocabulary KL, ``kl_topk_*`` the top-k lower-bound estimate."""
    ppl = math.exp(float(c.nll.mean()))
    ppl_fp = math.exp(float(c.nll_fp.mean()))
    out = {"ppl": ppl, "ppl_fp": ppl_fp, "ppl_ratio": ppl / ppl_fp, "ppl_diff": ppl - ppl_fp,
           "top1_agree": float(c.top1.float().mean()), "top5_overlap": float(c.top5.mean()),
           "n_tokens": float(c.nll.numel()),
           "dlogp_mean": float((c.nll_fp - c.nll).mean())}
    if c.kl is not None:
        out |= _kl_stats("kl", c.kl)
    if c.kl_topk is not None:
        out |= _kl_stats("kl_topk", c.kl_topk)
    return out
