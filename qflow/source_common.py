"""What model sources and text sources share: ``KIND:VALUE`` strings, bundled files, offline switches.

    split_source("zoo:lee-news", ("zoo", "hf"), noun="text source", fallback="file",
                 empty_fix="give zoo:NAME or a file path", usage=lambda kind: "write zoo:NAME")
    # -> ("zoo", "lee-news")
    package_folder("gensim")                          # the installed package's folder, never imported
    switched_on("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

A foundation module (``qflow/models/sources.py`` and ``qflow/data/sources.py``
both parse with it); it imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable, Iterable

from qflow.errors import SourceError


def split_source(source: str, kinds: Iterable[str], *, noun: str, fallback: str, empty_fix: str,
                 usage: Callable[[str], str]) -> tuple[str, str]:
    """``(kind, value)`` of ``KIND:VALUE`` with KIND one of ``kinds``; any other string is ``(fallback, source)``.

    A SourceError for an empty source (``empty_fix`` is its fix) or a prefix with
    nothing after it (``usage(kind)`` is the fix).
    """
    if not isinstance(source, str) or not source.strip():
        raise SourceError(f"{noun} {source!r} is empty", fix=empty_fix)
    source = source.strip()
    for kind in kinds:
        if source.startswith(kind + ":"):
            value = source[len(kind) + 1 :]
            if not value:
                raise SourceError(f"{noun} '{source}' names nothing after '{kind}:'", fix=usage(kind))
            return kind, value
    return fallback, source


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, located with find_spec and never imported (None when absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def switched_on(*names: str) -> bool:
    """Whether any of these environment switches is on (1/ON/YES/TRUE), read now, not at import time."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in names)
