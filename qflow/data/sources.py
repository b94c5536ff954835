"""Text sources: turn a source string into one text (documents joined with "\\n\\n").

    zoo:lee-news                  gensim's lee_background.cor, 300 news paragraphs (default eval text)
    zoo:wiki-pages                gensim's enwiki dump, cleaned per METHODS §13 (default calibration text)
    path/to/file.txt|.json|.jsonl|.parquet   read with `datasets`; ``field`` names the column ("text")
    hf:NAME[:CONFIG][@SPLIT]      datasets.load_dataset from the Hub (split defaults to "train")

    text = load_text("zoo:wiki-pages")
    key = text_fingerprint_source("zoo:wiki-pages")   # cheap: file hashes, no datasets/torch import

The zoo files ship inside gensim, which is located but never imported (its
import takes seconds). Heavy imports happen inside functions only.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from pathlib import Path

from qflow.data.wiki import WIKI_CLEANER_VERSION, wiki_pages
from qflow.errors import SourceError, did_you_mean
from qflow.fingerprint import digest, hash_file
from qflow.source_common import package_folder, split_source, switched_on

DEFAULT_EVAL_TEXT = "zoo:lee-news"
DEFAULT_CALIB_TEXT = "zoo:wiki-pages"

DOCUMENT_SEPARATOR = "\n\n"

# extension -> datasets builder
_FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class ZooText:
    package: str  # located with find_spec, never imported
    pattern: str  # glob under the package folder
    install: str
    cleaner_version: int  # part of the fingerprint


ZOO_TEXTS = {
    "lee-news": ZooText("gensim", "test/test_data/lee_background.cor", "pip install gensim==4.4.0", 1),
    "wiki-pages": ZooText(
        "gensim", "test/test_data/enwiki-*shortened.bz2", "pip install gensim==4.4.0", WIKI_CLEANER_VERSION
    ),
}


def parse_text_source(source: str) -> tuple[str, str]:
    """``(kind, value)`` with kind one of zoo, hf, file."""
    return split_source(
        source, ("zoo", "hf"), noun="text source", fallback="file", usage=_usage,
        empty_fix=f"give zoo:NAME ({', '.join(sorted(ZOO_TEXTS))}), hf:NAME[:CONFIG][@SPLIT] or a file path",
    )


def _usage(kind: str) -> str:
    if kind == "zoo":
        return f"write zoo:NAME with NAME one of {', '.join(sorted(ZOO_TEXTS))}"
    return "write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG@SPLIT (e.g. hf:wikitext:wikitext-2-raw-v1@test)"


def _split_hf(value: str) -> tuple[str, str | None, str]:
    rest, _, split = value.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise SourceError(f"'hf:{value}' names no dataset", fix=_usage("hf"))
    return name, (config or None), (split or "train")


def zoo_text_file(name: str) -> Path:
    """The file a zoo text ships in its package."""
    if name not in ZOO_TEXTS:
        raise SourceError(f"there is no zoo text '{name}'", where=f"zoo:{name}", fix=did_you_mean(name, ZOO_TEXTS))
    zoo = ZOO_TEXTS[name]
    root = package_folder(zoo.package)
    if root is None:
        raise SourceError(
            f"zoo text '{name}' ships in the Python package '{zoo.package}', which is not installed",
            where=f"zoo:{name}",
            fix=f"run `{zoo.install}`, or give a text file or hf: dataset instead",
        )
    matches = sorted(root.glob(zoo.pattern))
    if not matches:
        raise SourceError(
            f"the package '{zoo.package}' holds no file matching {zoo.pattern} under {root}",
            where=f"zoo:{name}",
            fix=f"reinstall it with `{zoo.install} --force-reinstall`",
        )
    return matches[0]


def _data_files(value: str, source: str) -> tuple[list[Path], str]:
    """The files a path or glob names, and the datasets builder that reads them."""
    path = Path(value).expanduser()
    if any(ch in value for ch in "*?["):
        files = sorted(Path(p) for p in _glob(path))
        if not files:
            raise SourceError(f"no file matches {value}", where=source, fix="check the pattern")
    elif not path.exists():
        raise SourceError(
            f"text file {path} does not exist",
            where=source,
            fix=f"check the path, or use zoo:NAME ({', '.join(sorted(ZOO_TEXTS))}) or hf:NAME[:CONFIG][@SPLIT]",
        )
    elif path.is_dir():
        raise SourceError(
            f"{path} is a folder",
            where=source,
            fix=f"name a file, or a glob such as {path}/*.jsonl",
        )
    else:
        files = [path]
    builders = {_FILE_BUILDERS.get(_extension(f)) for f in files}
    if None in builders or len(builders) != 1:
        raise SourceError(
            f"cannot tell how to read {', '.join(f.name for f in files[:3])}",
            where=source,
            fix=f"use files of one kind, ending in {', '.join(sorted(_FILE_BUILDERS))} (add .gz/.bz2/.zst if compressed)",
        )
    return [f.resolve() for f in files], builders.pop()


def _glob(pattern: Path):
    anchor = Path(pattern.anchor) if pattern.is_absolute() else Path(".")
    relative = pattern.relative_to(anchor) if pattern.is_absolute() else pattern
    return anchor.glob(str(relative))


def _extension(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return suffixes[-1].lower() if suffixes else ""


# ---------------------------------------------------------------- loading


def load_text(source: str, *, field: str = "text", cache_dir: Path | None = None) -> str:
    """The whole text of a source, documents joined with "\\n\\n".

    ``field`` is the column of json/jsonl/parquet files and hf datasets.
    ``cache_dir`` is where ``datasets`` keeps its Arrow files (its default cache when None).
    """
    kind, value = parse_text_source(source)
    if kind == "zoo":
        return _zoo_text(value)
    datasets_cache = str(Path(cache_dir) / "datasets") if cache_dir is not None else None
    if kind == "hf":
        rows = _hf_rows(value, source, datasets_cache)
    else:
        files, builder = _data_files(value, source)
        rows = _file_rows(files, builder, source, datasets_cache)
        if builder == "text":  # paragraphs keep the file's line breaks around them
            return DOCUMENT_SEPARATOR.join(p.strip("\r\n") for p in _column(rows, "text", source))
    return DOCUMENT_SEPARATOR.join(_column(rows, field, source))


def check_text_source(source: str) -> int:
    """Open and measure a local text source before any work (preflight): its size in bytes.

    Raises SourceError for a missing, non-UTF-8 or empty file, naming the file and
    the byte offset (compressed and parquet files are checked when loaded). Bundled
    (``zoo:``) and hub (``hf:``) sources are checked when they are loaded; a hub
    check here would need the network.
    """
    kind, value = parse_text_source(source)
    if kind != "file":
        return -1
    files, builder = _data_files(value, source)
    for f in files:
        if f.suffix in (".gz", ".bz2", ".xz", ".zst") or builder == "parquet":
            continue
        raw = f.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise SourceError(f"{f} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, offset {exc.start})",
                              where=source, fix="convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
        if not raw.strip():
            raise SourceError(f"{f} is empty", where=source, fix="point the source at a file that holds text")
    return sum(f.stat().st_size for f in files)


def text_source_problems(source: str, where: str) -> list[str]:
    """Preflight of a text source for a stage's ``check``: [] or one line naming the problem."""
    try:
        check_text_source(source)
    except SourceError as exc:
        return [f"{where}: {exc}"]
    return []


def _zoo_text(name: str) -> str:
    path = zoo_text_file(name)
    stat = path.stat()
    return _read_zoo_text(name, str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_zoo_text(name: str, file: str, mtime_ns: int, size: int) -> str:
    """A bundled text, parsed once per process (the wiki dump's decompression and cleaning cost ~1 s each time);
    the file's path, time and size are part of the key."""
    path = Path(file)
    if name == "lee-news":
        # one paragraph per line, each with a trailing space
        paragraphs = [line.strip() for line in path.read_text(encoding="utf-8").split("\n")]
        return DOCUMENT_SEPARATOR.join(p for p in paragraphs if p)
    return DOCUMENT_SEPARATOR.join(wiki_pages(path))


def _file_rows(files: list[Path], builder: str, source: str, cache_dir: str | None):
    import datasets

    options = {"sample_by": "paragraph"} if builder == "text" else {}  # a blank line ends a document
    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **options
        )
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        raise SourceError(
            f"datasets cannot read {', '.join(str(f) for f in files[:3])} as {builder}: {err}".replace("\n", " "),
            where=source,
            fix="check the file's format (one JSON object per line for .jsonl; a table with a text column for .parquet)",
        ) from err


def _hf_rows(value: str, source: str, cache_dir: str | None):
    import datasets

    name, config, split = _split_hf(value)
    offline = _datasets_offline()
    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        if offline:
            raise SourceError(
                f"the Hugging Face Hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1) and dataset '{name}'"
                f"{' config ' + repr(config) if config else ''} split '{split}' is not in the local datasets cache",
                where=source,
                fix="load it once with HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0, or use the bundled "
                f"{DEFAULT_EVAL_TEXT} / {DEFAULT_CALIB_TEXT} or a local text/json/parquet file",
            ) from err
        raise SourceError(
            f"the Hugging Face Hub has no dataset '{name}' or cannot be reached ({err})".replace("\n", " "),
            where=source,
            fix="check the dataset name and the network (or HF_ENDPOINT), or use a local file",
        ) from err
    except ValueError as err:  # unknown config or split
        raise SourceError(
            f"dataset '{name}' cannot give config {config!r} split '{split}': {err}".replace("\n", " "),
            where=source,
            fix=_usage("hf"),
        ) from err


def _column(rows, field: str, source: str) -> list[str]:
    if field not in rows.column_names:
        raise SourceError(
            f"the data has no column '{field}'",
            where=source,
            fix=f"set field to one of: {', '.join(rows.column_names)}",
        )
    values = rows[field]
    if values and not all(isinstance(v, str) for v in values):
        raise SourceError(f"column '{field}' does not hold text", where=source, fix="set field to a text column")
    return [v for v in values if v.strip()]


def _datasets_offline() -> bool:
    return switched_on("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


# ---------------------------------------------------------------- fingerprints


def text_fingerprint_source(source: str, *, field: str = "text", cache_dir: Path | None = None) -> str:
    """A hex digest that changes when the text behind ``source`` changes (file hashes, no loading).

    Zoo texts: the file hash and the cleaner version. Files: their hashes and
    ``field``. hf: name, config, split, field and the dataset commit (when online).
    File hashes are memoized in ``cache_dir/fingerprints.json`` when given.
    """
    kind, value = parse_text_source(source)
    if kind == "zoo":
        path = zoo_text_file(value)
        zoo = ZOO_TEXTS[value]
        return digest(kind="zoo", name=value, sha256=hash_file(path, cache_dir), cleaner=zoo.cleaner_version)
    if kind == "hf":
        name, config, split = _split_hf(value)
        return digest(kind="hf", name=name, config=config, split=split, field=field, commit=_hf_dataset_commit(name))
    files, builder = _data_files(value, source)
    hashes = [[f.name, hash_file(f, cache_dir)] for f in files]  # names, not paths: moving a file keeps its key
    return digest(kind="file", files=hashes, builder=builder, field=field)


def _hf_dataset_commit(name: str) -> str | None:
    if _datasets_offline():
        return None
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return huggingface_hub.HfApi().dataset_info(name).sha
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError):
        return None  # unreachable: load_text reports the real problem
