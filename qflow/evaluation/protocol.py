"""The pinned evaluation protocol recorded with every number, and its hash.

Two results are comparable only when their protocol hashes are equal: same
text (source fingerprint and the sha256 of the token windows), window length,
stride, number of windows, BOS policy, tokenizer (class, vocabulary hash),
KL definition, KL top-k and evaluation dtype. ``qflow report`` groups runs by this hash and
never mixes groups silently.

Example::

    proto = eval_protocol(cfg, tokenizer, ids, text_fingerprint="sha256:...")
    protocol_hash(proto)      # "3f2a9c0d1e7b4a55"
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

TAG = "qflow.protocol_hash"
HASHED_FIELDS = ("source", "text_fingerprint", "windows_sha256", "seq_len", "stride", "n_windows", "mode",
                 "bos", "tokenizer", "tokenizer_vocab_sha256", "vocab_size", "kl_definition", "kl_topk", "dtype")
# what ``kl_*`` / ``kl_topk_*`` mean; change it whenever a KL definition changes, so that cached
# evaluations and MLflow runs of the old definition land in another protocol group
KL_DEFINITION = ("kl_*: exact full-vocabulary KL(p_fp || p_q), nats per token; "
                 "kl_topk_*: top-k + tail-bin estimate (lower bound)")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), independent of where it was loaded from."""
    vocab = tokenizer.get_vocab()
    text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def eval_protocol(*, source: str, text_fingerprint: str | None, seq_len: int, n_windows: int,
                  windows_sha256: str, add_special_tokens: bool, tokenizer, kl_topk: int,
                  dtype: str, kl_exact: bool = True) -> dict[str, Any]:
    """The protocol of ``evaluate.lm`` (docs/METHODS.md §11/§13): non-overlapping windows, stride = length."""
    proto = {
        "source": source,
        "text_fingerprint": text_fingerprint,
        "windows_sha256": windows_sha256,
        "seq_len": int(seq_len),
        "stride": int(seq_len),
        "n_windows": int(n_windows),
        "mode": "non-overlapping",
        # add_special_tokens=True: the tokenizer's own specials once at the start of the text
        "bos": "text-start" if add_special_tokens else "none",
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_vocab_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "kl_definition": KL_DEFINITION,
        "kl_exact": bool(kl_exact),        # not hashed: it says whether kl_* exist, not what they mean
        "kl_topk": int(kl_topk),
        "dtype": dtype,
        "ppl": "exp(mean NLL over every scored token)",
    }
    proto["hash"] = protocol_hash(proto)
    return proto


def protocol_hash(proto: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the hashed fields (canonical JSON)."""
    core = {k: proto.get(k) for k in HASHED_FIELDS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
