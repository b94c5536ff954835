"""One error hierarchy for qflow.

A ``QflowError`` is a user's mistake or an environment problem: the CLI
prints its message (one paragraph, no traceback) and exits with status 2.
Any other exception is qflow's own bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class QflowError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(self.what.rstrip("."))
        parts.append(".")
        if self.fix:
            parts.append(f" Fix: {self.fix.rstrip('.')}.")
        return "".join(parts)


class RecipeError(QflowError):
    """The recipe is malformed, fails validation, or an override is bad."""


class PlanError(QflowError):
    """The stage graph cannot be built (cycle, unknown need, type mismatch)."""


class StageError(QflowError):
    """A stage refused its inputs or failed in a way the user can act on."""


class CacheError(QflowError):
    """The cache store is unusable or an entry failed verification."""


class SourceError(QflowError):
    """A model or text source cannot be resolved (missing file, offline hub...)."""


class DiskFullError(QflowError):
    """A write failed because the file system is full (ENOSPC) or over quota (EDQUOT)."""


def disk_full(exc: BaseException, where: str | None = None) -> DiskFullError | None:
    """The clear error for an ``OSError`` that is ENOSPC/EDQUOT, else None (other errors keep their traceback)."""
    import errno

    if isinstance(exc, OSError):
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return None
        target = f" while writing {exc.filename}" if exc.filename else ""
        why = exc.strerror or "ENOSPC"
    else:  # writers in Rust/C (safetensors, onnx) wrap the OS error in their own type
        text = str(exc)
        markers = ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC})")
        if not any(m in text for m in markers):
            return None
        target, why = "", " ".join(text.split())[:200]
    return DiskFullError(f"no space left on the device{target} ({why})", where=where,
                         fix="free space on that file system (`qflow cache gc --keep N` removes old entries) or "
                             "point --runs-dir at a larger disk, then re-run: finished stages stay cached, the "
                             "half-written output was discarded")


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option closest to ``word`` (for "did you mean" hints), or None."""
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    options = sorted(options)
    best = closest(word, options)
    listing = ", ".join(options) if len(options) <= 30 else ", ".join(options[:30]) + ", ..."
    if best:
        return f"did you mean '{best}'? Valid: {listing}"
    return f"valid: {listing}"
