"""Encoder evaluation: float vs quantized sentence embeddings and masked-LM predictions.

    batches = sentence_batches(sentences(text, 128), tokenizer, max_tokens=128, batch_size=16)
    masked = mask_batches(batches, tokenizer, rate=0.15, seed=0)
    result = compare_encoders(fp_model, q_model, batches, masked)
    metrics = summarize_embed(result)

Definitions (docs/PROTOCOL.md "Encoders"):

* sentence embedding = **mean pooling** of the last hidden states over the
  attention mask (``sum_t m_t h_t / sum_t m_t``; sentence-transformers' default
  ``Pooling(mean)``), no normalisation (cosine ignores it);
* ``embed_cos_*`` = cosine similarity between the float and the quantized
  embedding of the same sentence, over sentences;
* ``embed_pairsim_mae`` = mean over sentence pairs i<j of
  ``|cos(e_i, e_j) - cos(ê_i, ê_j)|`` (how much the similarity geometry, i.e.
  retrieval scores, moves);
* ``mlm_kl_*`` = exact full-vocabulary ``KL(p_fp || p_q)`` in nats at masked
  positions (``rate`` of the non-special tokens of each sentence, at least one,
  replaced by the mask token; positions drawn by a numpy Generator seeded with
  ``seed``), ``mlm_top1_agree`` = argmax agreement there, ``mlm_acc_fp`` /
  ``mlm_acc_q`` = how often each model's argmax is the original token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..models.encoders import mean_pool

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


def sentences(text: str, n: int | None, *, min_words: int = 5) -> list[str]:
    """The first ``n`` sentences of ``text`` with at least ``min_words`` words (split after . ! ? + capital)."""
    out = []
    for paragraph in text.splitlines():
        for piece in _SENTENCE_END.split(paragraph.strip()):
            piece = " ".join(piece.split())
            if len(piece.split()) >= min_words:
                out.append(piece)
                if n is not None and len(out) == n:
                    return out
    return out


@dataclass
class Batch:
    input_ids: Any          # LongTensor [b, t] (padded)
    attention_mask: Any     # LongTensor [b, t]
    labels: Any = None      # original ids at masked positions, -100 elsewhere (masked batches only)


def sentence_batches(texts: list[str], tokenizer, *, max_tokens: int, batch_size: int) -> list[Batch]:
    """Tokenize with the tokenizer's special tokens ([CLS] ... [SEP] / <s> ... </s>), truncate to
    ``max_tokens``, pad per batch of ``batch_size`` sentences, in order."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], add_special_tokens=True, truncation=True, max_length=max_tokens,
                        padding=True, return_tensors="pt")
        out.append(Batch(enc["input_ids"], enc["attention_mask"]))
    return out


def batches_fingerprint(batches: list[Batch]) -> str:
    """sha256 over every batch's ids and mask (and labels when masked), little-endian int64."""
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.labels):
            if t is not None:
                h.update(np.ascontiguousarray(t.numpy(), dtype="<i8").tobytes())
                h.update(repr(tuple(t.shape)).encode())
    return h.hexdigest()


def mask_batches(batches: list[Batch], tokenizer, *, rate: float, seed: int) -> list[Batch]:
    """Copies of ``batches`` with ``rate`` of each sentence's non-special tokens (at least one) replaced
    by the mask token; ``labels`` hold the original ids there and -100 elsewhere."""
    import torch

    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    rng = np.random.default_rng(seed)
    out = []
    for b in batches:
        ids = b.input_ids.clone()
        labels = torch.full_like(ids, -100)
        candidates = (b.attention_mask.bool() & ~torch.isin(ids, special)).numpy()
        for row in range(ids.shape[0]):
            pos = np.flatnonzero(candidates[row])
            if pos.size == 0:
                continue
            k = max(1, int(round(rate * pos.size)))
            chosen = torch.from_numpy(np.sort(rng.choice(pos, size=k, replace=False)))
            labels[row, chosen] = ids[row, chosen]
            ids[row, chosen] = tokenizer.mask_token_id
        out.append(Batch(ids, b.attention_mask, labels))
    return out


def encode(model, batch: Batch):
    """Mean-pooled last hidden states of ``model`` (an encoder, bare or with a head)."""
    base = getattr(model, "base_model", model)
    hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return mean_pool(hidden, batch.attention_mask)


def mlm_logits(model, batch: Batch):
    """``[n_masked, vocab]`` logits at the masked positions of ``batch``."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits[batch.labels != -100].double()


@dataclass
class EmbedComparison:
    cos: Any                        # [n_sentences] float64
    emb_fp: Any                     # [n_sentences, hidden]
    emb_q: Any
    kl: Any | None = None           # [n_masked] float64 (None: no MLM head)
    agree: Any | None = None        # [n_masked] bool
    correct_fp: Any | None = None
    correct_q: Any | None = None
    n_tokens: int = 0


def compare_encoders(fp_model, q_model, batches: list[Batch], masked: list[Batch] | None = None,
                     progress: Callable[[int], None] | None = None) -> EmbedComparison:
    """Side by side: embeddings of ``batches``; MLM distributions at ``masked``'s positions when given."""
    import torch

    emb_fp, emb_q, kls, agree, corr_fp, corr_q = [], [], [], [], [], []
    n_tokens = 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            a, b = encode(fp_model, batch), encode(q_model, batch)
            emb_fp.append(a)
            emb_q.append(b)
            n_tokens += int(batch.attention_mask.sum())
            if masked is not None:
                mb = masked[i]
                la, lb = torch.log_softmax(mlm_logits(fp_model, mb), -1), torch.log_softmax(mlm_logits(q_model, mb), -1)
                kls.append((la.exp() * (la - lb)).sum(-1).clamp(min=0))
                target = mb.labels[mb.labels != -100]
                agree.append(la.argmax(-1) == lb.argmax(-1))
                corr_fp.append(la.argmax(-1) == target)
                corr_q.append(lb.argmax(-1) == target)
            if progress:
                progress(int(batch.input_ids.shape[0]))
    fp, q = torch.cat(emb_fp).double(), torch.cat(emb_q).double()
    cos = torch.nn.functional.cosine_similarity(fp, q, dim=-1)
    res = EmbedComparison(cos=cos, emb_fp=fp, emb_q=q, n_tokens=n_tokens)
    if masked is not None:
        res.kl, res.agree = torch.cat(kls), torch.cat(agree)
        res.correct_fp, res.correct_q = torch.cat(corr_fp), torch.cat(corr_q)
    return res


def pair_similarity_mae(emb_fp, emb_q) -> float:
    """Mean |cos(e_i, e_j) - cos(ê_i, ê_j)| over sentence pairs i < j (0.0 for one sentence)."""
    import torch

    def sims(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        return e @ e.T

    n = emb_fp.shape[0]
    if n < 2:
        return 0.0
    iu = torch.triu_indices(n, n, offset=1)
    diff = (sims(emb_fp) - sims(emb_q))[iu[0], iu[1]].abs()
    return float(diff.mean())


def summarize_embed(res: EmbedComparison, rng: np.random.Generator | None = None,
                    n_resamples: int = 1000) -> dict[str, float]:
    """The metrics of the module doc (bootstrap CIs of the means over sentences / masked tokens when ``rng``)."""
    from .stats import mean_ci

    cos = res.cos.numpy()
    m: dict[str, float] = {"n_sentences": float(cos.size), "n_tokens": float(res.n_tokens),
                           "embed_cos_mean": float(cos.mean()), "embed_cos_min": float(cos.min()),
                           "embed_cos_p01": float(np.quantile(cos, 0.01)),
                           "embed_pairsim_mae": pair_similarity_mae(res.emb_fp, res.emb_q)}
    if rng is not None:
        m["embed_cos_mean_ci_low"], m["embed_cos_mean_ci_high"] = mean_ci(cos, rng, n_resamples=n_resamples)
    if res.kl is not None and res.kl.numel():
        kl = res.kl.numpy()
        m |= {"mlm_n_masked": float(kl.size), "mlm_kl_mean": float(kl.mean()), "mlm_kl_median": float(np.median(kl)),
              "mlm_kl_p99": float(np.quantile(kl, 0.99)), "mlm_kl_max": float(kl.max()),
              "mlm_top1_agree": float(res.agree.double().mean()), "mlm_acc_fp": float(res.correct_fp.double().mean()),
              "mlm_acc_q": float(res.correct_q.double().mean())}
        if rng is not None:
            m["mlm_kl_mean_ci_low"], m["mlm_kl_mean_ci_high"] = mean_ci(kl, rng, n_resamples=n_resamples)
    return m
