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
