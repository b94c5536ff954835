"""Text sources (zoo, files, hf datasets) and token windows; nothing heavy is imported here."""

from qflow.data.sources import (
    DEFAULT_CALIB_TEXT,
    DEFAULT_EVAL_TEXT,
    load_text,
    text_fingerprint_source,
)
from qflow.data.windows import eval_windows, fingerprint, make_windows, split_windows, tokenize

__all__ = [
    "DEFAULT_CALIB_TEXT",
    "DEFAULT_EVAL_TEXT",
    "eval_windows",
    "fingerprint",
    "load_text",
    "make_windows",
    "split_windows",
    "text_fingerprint_source",
    "tokenize",
]
