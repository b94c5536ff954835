"""Recipe-facing glue: a ``DataSpec`` to token windows, with clear errors.

Example::

    ids = token_windows(DataSpec(source="zoo:lee-news", seq_len=512), tokenizer, 32, cache_root)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StageError


def text_fingerprint_source(source: str, cache_root: Path | None = None, field: str = "text") -> str:
    from .sources import text_fingerprint_source as fp

    return fp(source, field=field, cache_dir=cache_root)


def windows_fingerprint(ids) -> str:
    from .windows import fingerprint

    return fingerprint(ids)


def token_windows(spec, tokenizer, n_windows: int | None, cache_root: Path, *, where: str = "data"):
    """``[n, seq_len]`` ids: the first ``n_windows`` non-overlapping windows of the text."""
    from .sources import load_text
    from .windows import make_windows

    text = load_text(spec.source, field=spec.field, cache_dir=cache_root)
    ids = make_windows(text, tokenizer, spec.seq_len, None, add_special_tokens=spec.add_special_tokens)
    available = int(ids.shape[0])
    if n_windows is not None:
        if available < n_windows:
            raise StageError(f"{spec.source} yields only {available} windows of {spec.seq_len} tokens, "
                             f"{n_windows} requested", where=where,
                             fix=f"lower the number of windows to at most {available}, shorten seq_len, or use more text")
        ids = ids[:n_windows]
    if available == 0:
        raise StageError(f"{spec.source} is shorter than one window of {spec.seq_len} tokens", where=where,
                         fix="use a longer text or a smaller seq_len")
    return ids


class ReadsText:
    """Mixin of a stage whose ``cfg.data`` (a :class:`qflow.specs.DataSpec`) is a text source: the text's
    fingerprint is part of the stage's key, and a local file is opened and measured in preflight."""

    @classmethod
    def fingerprint_sources(cls, cfg, cache_root):
        return {"data": text_fingerprint_source(cfg.data.source, cache_root, cfg.data.field)}

    def check(self, cfg, inputs_meta):
        from .sources import text_source_problems

        return text_source_problems(cfg.data.source, "with.data")
