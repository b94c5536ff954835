"""Recipe-facing glue: a ``DataSpec`` to token windows, with clear errors.

Example::

    ids = token_windows(DataSpec(source="zoo:lee-news", seq_len=512), tokenizer, 32, cache_root)
"""

from __future__ import annotations

import functools
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
    if n_windows is not None and n_windows > 0:
        ids = _leading_windows(text, tokenizer, spec, n_windows)
        if ids is not None:
            return ids
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


PREFIX_MARGIN = 64   # tokens kept beyond the windows: a cut inside a word only changes the last few ids


def _leading_windows(text: str, tokenizer, spec, n_windows: int):
    """The first ``n_windows`` windows from a tokenized prefix of ``text`` (the same ids as tokenizing the whole
    text, which costs seconds for the bundled wiki text when a few windows are asked), or None when the prefix
    route cannot vouch for them (the caller then tokenizes the whole text).

    A prefix's ids equal the whole text's except near the cut; two prefixes of different lengths must agree on
    every id kept, and ``PREFIX_MARGIN`` ids beyond the windows are dropped."""
    from .windows import split_windows, tokenize

    needed = n_windows * spec.seq_len
    length = needed * 8 + 4096
    while length * 2 < len(text):
        short = tokenize(text[:length], tokenizer, spec.add_special_tokens)
        if short.numel() >= needed + PREFIX_MARGIN:
            longer = tokenize(text[:length * 2], tokenizer, spec.add_special_tokens)
            if longer.numel() >= needed and bool((short[:needed] == longer[:needed]).all()):
                return split_windows(short[:needed], spec.seq_len, n_windows)
            return None
        length *= 4
    return None


class ReadsText:
    """Mixin of a stage whose ``cfg.data`` (a :class:`qflow.specs.DataSpec`) is a text source: the text's
    fingerprint is part of the stage's key, and a local file is opened and measured in preflight."""

    @classmethod
    def fingerprint_sources(cls, cfg, cache_root):
        return {"data": text_fingerprint_source(cfg.data.source, cache_root, cfg.data.field)}

    def check(self, cfg, inputs_meta):
        from .sources import text_source_problems

        problems = text_source_problems(cfg.data.source, "with.data")
        if problems:
            return problems
        wanted = getattr(cfg, "n_samples", None) or getattr(cfg, "n_windows", None)
        folder = tokenizer_folder((inputs_meta or {}).get("model"))
        if folder is None:
            return []   # the tokenizer is not known yet: token_windows refuses right before the stage
        problem = windows_shortfall(cfg.data, folder, wanted)
        return [f"with.data: {problem}"] if problem else []


def tokenizer_folder(ref) -> Path | None:
    """The local folder holding the tokenizer of a model input: a computed artifact, or a planned
    ``model.load`` whose source is a local folder (a zoo/hub model is known once converted)."""
    folder = getattr(ref, "base_model_dir", None)
    if folder is None and isinstance(ref, dict):
        source = (ref.get("planned") or {}).get("source")
        if isinstance(source, str) and ":" not in source.split("/")[0]:
            folder = Path(source).expanduser()
    if folder is None:
        return None
    folder = Path(folder)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return folder if has_tokenizer else None


@functools.lru_cache(maxsize=64)
def _token_count_at_least(source: str, field: str, folder: str, add_special_tokens: bool,
                          needed: int) -> tuple[bool, int]:
    """``(whole text tokenized?, tokens)``: tokenizes growing prefixes of the text and stops as soon as
    ``needed`` tokens are certain, so a short calibration set costs milliseconds, not the whole text."""
    from .sources import load_text

    text = load_text(source, field=field, cache_dir=None)
    encode = _encoder(folder, add_special_tokens)
    length = needed * 8 + 1024
    while True:
        if length >= len(text):
            return True, encode(text)
        count = encode(text[:length])
        if count - 2 >= needed:   # a prefix cut mid-word may merge differently: keep a margin
            return False, count
        length *= 4


def _encoder(folder: str, add_special_tokens: bool):
    path = Path(folder) / "tokenizer.json"
    if path.is_file():   # the fast tokenizer's own backend: the same ids, without loading transformers
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path))
        return lambda text: len(backend.encode(text, add_special_tokens=add_special_tokens).ids)
    from transformers import AutoTokenizer

    from ..recipe.safety import remote_code_allowed, remote_code_refusal

    with remote_code_refusal(str(folder)):   # only the command line's --trust-remote-code, never a recipe
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=remote_code_allowed())
    return lambda text: len(tok(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def windows_shortfall(spec, folder: Path, n_windows: int | None) -> str | None:
    """Why ``spec``'s text cannot give ``n_windows`` windows (at least one when None), or None.

    Local files and bundled texts only (a hub dataset is checked when loaded). Any failure to read
    or tokenize here is left to the stage, which reports it with the same words."""
    from .sources import parse_text_source

    try:
        if parse_text_source(spec.source)[0] == "hf":
            return None
        needed = (n_windows or 1) * spec.seq_len
        whole, tokens = _token_count_at_least(spec.source, spec.field, str(folder), spec.add_special_tokens, needed)
    except Exception:  # noqa: BLE001 - preflight must not replace the stage's own error
        return None
    if tokens >= needed or not whole:
        return None
    available = tokens // spec.seq_len
    asked = f"{n_windows} requested" if n_windows else "at least one requested"
    return (f"{spec.source} yields only {available} windows of {spec.seq_len} tokens ({tokens} tokens with "
            f"the model's tokenizer), {asked}; fix: lower the number of windows to at most {max(available, 1)}, "
            f"shorten seq_len, or use more text")
