"""Perplexity and distribution metrics vs the float model (METHODS.md §11).

The float model's per-token results are computed once per (model, windows)
and cached as a reusable artifact: the exact NLL of every target plus the
top-k log-probabilities (indices and values) of every position. KL(p_fp || p_q)
is then computed over the k kept tokens plus one "tail" bin holding the rest
of the mass. That is the KL of the two distributions coarsened to k+1 bins, a
lower bound of the full-vocabulary KL that is tight when the tail mass is small
(k=128 keeps > 99% of the mass for typical LM positions); ``topk: 0`` stores
nothing and recomputes nothing: it disables KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class FloatReference:
    nll: torch.Tensor          # [n_win, L-1] float64
    topk_idx: torch.Tensor     # [n_win, L-1, k] int32 (sorted by probability, descending)
    topk_logp: torch.Tensor    # [n_win, L-1, k] float32

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"nll": self.nll, "topk_idx": self.topk_idx, "topk_logp": self.topk_logp}, folder / "fp_ref.pt")

    @classmethod
    def load(cls, folder: Path) -> "FloatReference":
        d = torch.load(folder / "fp_ref.pt", weights_only=True)
        return cls(d["nll"], d["topk_idx"], d["topk_logp"])


def _forward_logp(model, batch: torch.Tensor) -> torch.Tensor:
    """Log-probs (fp32, on the CPU) of every next token of ``batch``, run on the model's device."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.to(device), use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def ranked_topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, indices) sorted by value descending, ties by lowest token id (METHODS.md §11).

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
                    progress: Callable[[int], None] | None = None) -> FloatReference:
    nll, idx, vals = [], [], []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i:i + batch_size]
            logp = _forward_logp(model, batch)
            nll.append(-logp.gather(-1, batch[:, 1:, None]).squeeze(-1).double())
            k = max(topk, 5)
            v, j = ranked_topk(logp, k)
            idx.append(j.to(torch.int32))
            vals.append(v)
            if progress:
                progress(batch.shape[0])
    return FloatReference(torch.cat(nll), torch.cat(idx), torch.cat(vals))


@dataclass
class Comparison:
    nll: torch.Tensor          # [n_tok] float64, quantized model
    nll_fp: torch.Tensor       # [n_tok]
    kl: torch.Tensor | None    # [n_tok] float64
    top1: torch.Tensor         # [n_tok] bool
    top5: torch.Tensor         # [n_tok] float (overlap fraction of top-5 sets)


def compare_to_reference(model, ids: torch.Tensor, ref: FloatReference, *, batch_size: int, topk: int,
                         progress: Callable[[int], None] | None = None) -> Comparison:
    nll, kls, top1, top5 = [], [], [], []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i:i + batch_size]
            logp = _forward_logp(model, batch)
            nll.append(-logp.gather(-1, batch[:, 1:, None]).squeeze(-1).double())
            ref_idx = ref.topk_idx[i:i + batch_size].long()
            ref_logp = ref.topk_logp[i:i + batch_size]
            # the same k and tie rule as the reference, so that equal models agree exactly
            q_top5 = ranked_topk(logp, ref_idx.shape[-1])[1][..., :5]
            top1.append(q_top5[..., 0] == ref_idx[..., 0])
            overlap = (q_top5.unsqueeze(-1) == ref_idx[..., :5].unsqueeze(-2)).any(-1).float().mean(-1)
            top5.append(overlap)
            if topk > 0:
                kls.append(topk_kl(ref_logp[..., :topk], logp.gather(-1, ref_idx[..., :topk])))
            if progress:
                progress(batch.shape[0])
    return Comparison(torch.cat(nll).reshape(-1), ref.nll.reshape(-1),
                      torch.cat(kls).reshape(-1) if kls else None,
                      torch.cat(top1).reshape(-1), torch.cat(top5).reshape(-1))


def topk_kl(p_logp: torch.Tensor, q_logp_at: torch.Tensor) -> torch.Tensor:
    """KL over k kept tokens + one tail bin; inputs are log-probs at the same k token ids."""
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


def summarize(c: Comparison) -> dict[str, float]:
    ppl = math.exp(float(c.nll.mean()))
    ppl_fp = math.exp(float(c.nll_fp.mean()))
    out = {"ppl": ppl, "ppl_fp": ppl_fp, "ppl_ratio": ppl / ppl_fp, "ppl_diff": ppl - ppl_fp,
           "top1_agree": float(c.top1.float().mean()), "top5_overlap": float(c.top5.mean()),
           "n_tokens": float(c.nll.numel()),
           "dlogp_mean": float((c.nll_fp - c.nll).mean())}
    if c.kl is not None:
        out |= {"kl_mean": float(c.kl.mean()), "kl_median": nearest_rank(c.kl, 0.5),
                "kl_p99": nearest_rank(c.kl, 0.99), "kl_max": float(c.kl.max())}
    return out
