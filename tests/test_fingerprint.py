"""qflow/fingerprint.py: the one place that hashes a file's bytes, and the callers that use it."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xxhash

from qflow.engine.cache import file_hash, file_sha256
from qflow.export import atomic
from qflow.fingerprint import CHUNK_BYTES, FINGERPRINTS_FILE, file_digest, file_stamp, hash_file, hash_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n_bytes", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES + 3])
def test_every_file_hash_is_the_digest_of_the_bytes(tmp_path, n_bytes):
    data = np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    assert file_digest(path) == file_sha256(path) == hash_file(path) == sha
    assert file_digest(path, "xxh3_128", sync=True) == file_hash(path) == xxhash.xxh3_128(data).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest()


def test_no_module_but_fingerprint_hashes_file_bytes():
    """A function that opens a file, reads it and updates a hash is a file hasher: only qflow/fingerprint.py has one."""
    hashers = []
    for path in sorted((ROOT / "qflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                calls = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", None)
                         for c in ast.walk(node) if isinstance(c, ast.Call)}
                if {"open", "read", "update"} <= calls:
                    hashers.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert hashers == ["qflow/fingerprint.py:file_digest"]


def test_hash_file_memo_follows_the_file_stamp(tmp_path):
    memo_dir = tmp_path / "cache"
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    assert hash_file(path, memo_dir) == hashlib.sha256(b"first").hexdigest()
    memo = json.loads((memo_dir / FINGERPRINTS_FILE).read_text())
    assert memo[str(path.resolve())] == {"stamp": list(file_stamp(path)), "sha256": hashlib.sha256(b"first").hexdigest()}

    path.write_bytes(b"other")  # same size: only mtime/inode tell the versions apart
    assert hash_file(path, memo_dir) == hashlib.sha256(b"other").hexdigest()
    (memo_dir / FINGERPRINTS_FILE).write_text("{not json")  # a damaged memo is rebuilt, never an error
    assert hash_file(path, memo_dir) == hashlib.sha256(b"other").hexdigest()
    assert json.loads((memo_dir / FINGERPRINTS_FILE).read_text())[str(path.resolve())]["sha256"] == hash_file(path)


def test_hash_folder_skips_hidden_files_and_tracks_names(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "meta").write_text("download metadata")
    first = hash_folder(tmp_path)
    (tmp_path / ".cache" / "meta").write_text("changed")
    assert hash_folder(tmp_path) == first
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert hash_folder(tmp_path) != first


def test_export_marker_owns_a_file_only_while_its_bytes_match(tmp_path):
    """The export sidecar's sha256 comes from the same helper: a changed file stops counting as qflow's."""
    src = tmp_path / "src.gguf"
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    target = tmp_path / "out" / "model.gguf"
    target.parent.mkdir()
    atomic.place(src, target, record={"format": "gguf"})
    sidecar = json.loads(target.with_name(target.name + atomic.SIDECAR_SUFFIX).read_text())
    assert sidecar["files"]["model.gguf"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert atomic.target_problem(target, is_dir=False, overwrite=False) is None
    target.write_bytes(b"x" * 4096)  # same size, other bytes
    assert atomic.target_problem(target, is_dir=False, overwrite=False) is not None
