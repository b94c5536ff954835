"""Token windows for calibration and evaluation, and their fingerprints (METHODS §11, §13).

    ids = tokenize(load_text("zoo:lee-news"), tokenizer)           # no special tokens
    windows = split_windows(ids, 512)                               # [147, 512] for the default protocol
    fingerprint(windows)                                            # "7a0c5ed9..."
    windows, masks = eval_windows(ids, 512, mode="strided", stride=256)

A score mask marks the positions t whose token is a target (predicted from
the logits at t-1); position 0 is never scored.
"""

from __future__ import annotations

import hashlib

import numpy as np

from qflow.errors import SourceError

EVAL_MODES = ("gptq", "strided")


def fingerprint(ids) -> str:
    """sha256 of token ids as little-endian int64 bytes (a tensor, array or list; shape ignored)."""
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids), dtype="<i8").tobytes()).hexdigest()


def tokenize(text: str, tokenizer, add_special_tokens: bool = False):
    """The whole text as one 1-D LongTensor of ids, tokenized once."""
    import torch

    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def split_windows(ids, seq_len: int, n_windows: int | None = None):
    """Non-overlapping windows of ``seq_len`` ids, in order, remainder dropped: LongTensor [n, seq_len].

    ``n_windows`` keeps the first n; asking for more than the text holds is an error.
    """
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if seq_len < 2:
        raise SourceError(f"window length {seq_len} is too short", fix="use seq_len >= 2 (512 is the default)")
    available = ids.numel() // seq_len
    if available == 0:
        raise SourceError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}",
            fix="use a longer text or a smaller seq_len",
        )
    wanted = available if n_windows is None else n_windows
    if wanted < 1 or wanted > available:
        raise SourceError(
            f"the text gives {available} windows of {seq_len} tokens ({ids.numel()} tokens) "
            f"and {wanted} were asked for",
            fix="ask for fewer windows, use shorter windows, or a longer text",
        )
    return ids[: wanted * seq_len].reshape(wanted, seq_len).clone()


def make_windows(text: str, tokenizer, seq_len: int, n_windows: int | None = None, add_special_tokens: bool = False):
    """Tokenize ``text`` once and cut it into non-overlapping windows: LongTensor [n, seq_len]."""
    return split_windows(tokenize(text, tokenizer, add_special_tokens), seq_len, n_windows)


def eval_windows(
    ids,
    seq_len: int,
    mode: str = "gptq",
    stride: int | None = None,
    bos_id: int | None = None,
    n_windows: int | None = None,
):
    """``(windows, score_masks)``: lists of 1-D LongTensor / BoolTensor of equal lengths.

    mode "gptq": non-overlapping windows, each scoring its seq_len-1 shifted targets.
    mode "strided": windows [b, b+seq_len) every ``stride`` tokens; each token t >= 1
    is scored exactly once, in the first window where it falls in
    [max(b+1, prev_end), end), so N-1 tokens are scored in all when stride < seq_len.
    (With stride == seq_len a window's first token has no context inside it and is
    never scored, as in gptq mode: N - n_windows tokens. METHODS §11 test 2 claims
    N-1 for S <= L, which no window rule can give at S == L.)
    ``bos_id`` prepends BOS to every window and never scores it (the scored tokens
    stay the same). ``n_windows`` keeps the first n windows.
    """
    import torch

    if mode not in EVAL_MODES:
        raise SourceError(f"unknown perplexity mode '{mode}'", fix=f"use one of {', '.join(EVAL_MODES)}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if mode == "gptq":
        windows = list(split_windows(ids, seq_len, n_windows))
        masks = [torch.arange(seq_len) >= 1 for _ in windows]
    else:
        windows, masks = _strided(ids, seq_len, stride)
        if n_windows is not None:
            windows, masks = windows[:n_windows], masks[:n_windows]
    if bos_id is not None:
        bos, unscored = torch.tensor([bos_id]), torch.tensor([False])
        windows = [torch.cat([bos, w]) for w in windows]
        masks = [torch.cat([unscored, m]) for m in masks]
    return windows, masks


def _strided(ids, seq_len: int, stride: int | None):
    import torch

    total = ids.numel()
    if stride is None or not 1 <= stride <= seq_len:
        raise SourceError(
            f"strided mode needs a stride between 1 and the window length {seq_len}, got {stride}",
            fix="set stride (e.g. seq_len // 2)",
        )
    if total < 2:
        raise SourceError(f"the text has {total} tokens, too few to score", fix="use a longer text")
    windows, masks, prev_end = [], [], 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        first_scored = max(begin + 1, prev_end)
        mask = torch.zeros(end - begin, dtype=torch.bool)
        mask[first_scored - begin :] = True
        windows.append(ids[begin:end].clone())
        masks.append(mask)
        prev_end = end
        if end == total:
            break
    return windows, masks
