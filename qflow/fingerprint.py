"""Hash a file's bytes, once per file version: the one file-hashing helper of qflow.

    file_sha256(Path("model.gguf"))                     # sha256 hex of the bytes
    file_digest(Path("shard.safetensors"), "xxh3_128")  # the cache's fast check hash
    hash_file(Path("model.gguf"), Path("runs/cache"))   # sha256, remembered in runs/cache/fingerprints.json
    hash_folder(Path("my-model"), Path("runs/cache"))   # over (relative path, hash) of every file
    digest(kind="gguf", sha256="ab12...", converter=1)  # sha256 of the ingredients' canonical JSON

A foundation module: model sources, text sources, the cache and the export
marker all hash files here, and it imports nothing of qflow. ``hash_file``'s
memo is keyed by the absolute path and trusted only while the file's
(size, mtime_ns, inode) stamp is unchanged, so each file version is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

FINGERPRINTS_FILE = "fingerprints.json"
CHUNK_BYTES = 1 << 22


def file_digest(path: Path, algorithm: str = "sha256", *, sync: bool = False) -> str:
    """Hex digest of a file's bytes with a hashlib algorithm or ``xxh3_128``; ``sync`` also fsyncs the file."""
    if algorithm == "xxh3_128":
        import xxhash

        hasher = xxhash.xxh3_128()
    else:
        hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            hasher.update(block)
        if sync:
            os.fsync(handle.fileno())
    return hasher.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes."""
    return file_digest(path, "sha256")


def file_stamp(path: Path) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): changes whenever a file is rewritten, replaced or touched."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def hash_file(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, remembered in ``memo_dir/fingerprints.json`` against the file's stamp."""
    path = Path(path).resolve()
    stamp = list(file_stamp(path))
    memo_file = Path(memo_dir) / FINGERPRINTS_FILE if memo_dir is not None else None
    if memo_file is not None:
        entry = _read_memo(memo_file).get(str(path))
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
    sha = file_sha256(path)
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
    hasher = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # .cache/ (huggingface_hub download metadata), .git/ and the like
        hasher.update(f"{relative.as_posix()}\0{hash_file(path, memo_dir)}\n".encode())
    return hasher.hexdigest()


def digest(**ingredients) -> str:
    """sha256 hex of the ingredients as JSON with sorted keys (a source's fingerprint)."""
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()
