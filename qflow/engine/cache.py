"""Content-addressed stage cache: keys, atomic entries, locks, explain, gc, verify.

Cache key ingredients (all written to the entry's ``manifest.json``):

* ``stage``: the registered stage name; ``version``: the stage's version;
* ``qflow``: qflow's version;
* ``config``: the stage's resolved Config with defaults filled in (JSON);
* ``inputs``: ``{slot: "<upstream key>:<output slot>"}`` (chained keys, never tensors);
* ``external``: fingerprints of outside sources (model files, text files, hub revisions);
* ``env``: facts that change numbers (torch major.minor, device kind, kernel backend).

``key = sha256(canonical_json(ingredients))``. Canonical JSON sorts keys, so
reordering YAML keys never changes a key.

Layout: ``<root>/<k[:2]>/<k>/{manifest.json, outputs/<slot>/...}``. An entry
is written in ``<root>/tmp/`` and renamed into place under a per-key lock; an
entry exists iff its folder exists, so a killed run leaves no partial entry.
Resumable state for a key lives in ``<root>/scratch/<k>/`` until commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import CacheError

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def make_key(ingredients: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(ingredients).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"


class CacheStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- paths ---------------------------------------------------------
    def entry_path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def scratch_path(self, key: str) -> Path:
        return self.root / "scratch" / key

    def lock(self, key: str, timeout: float = -1):
        from filelock import FileLock

        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(lock_dir / f"{key}.lock"), timeout=timeout)

    # ---- read ------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        path = self.entry_path(key)
        manifest = path / MANIFEST
        if not manifest.is_file():
            return None
        try:
            return Entry(key, path, json.loads(manifest.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"cache entry {key[:12]} has an unreadable manifest ({exc})", where=str(path),
                             fix=f"delete {path} (qflow cache verify --fix does it) and re-run") from None

    def entries(self) -> Iterator[Entry]:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for path in sorted(shard.iterdir()):
                entry = self.get(path.name)
                if entry is not None:
                    yield entry

    # ---- write -----------------------------------------------------------
    def new_tmp(self, key: str) -> Path:
        tmp = self.root / "tmp" / f"{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (tmp / "outputs").mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path, manifest: dict[str, Any]) -> Entry:
        """Hash the outputs, write the manifest, rename ``tmp`` into place (atomic)."""
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                files[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        manifest = dict(manifest, key=key, files=files, committed_at=time.time())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        final = self.entry_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST).is_file():  # someone else committed the same key first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        return Entry(key, final, json.loads((final / MANIFEST).read_text()))

    def memo(self, name: str, ingredients: dict[str, Any], compute: Callable[[Path], None]) -> tuple[str, Path]:
        """A keyed sub-result: computed once under a lock, then reused."""
        key = make_key({"memo": name, **ingredients})
        entry = self.get(key)
        if entry is None:
            with self.lock(key):
                entry = self.get(key)
                if entry is None:
                    tmp = self.new_tmp(key)
                    try:
                        compute(tmp / "outputs")
                        entry = self.commit(key, tmp, {"memo": name, "ingredients": ingredients})
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
        return key, entry.outputs

    def clean_tmp(self, max_age_seconds: float = 24 * 3600) -> None:
        """Remove temp folders of runs that died (older than ``max_age_seconds``)."""
        tmp_root = self.root / "tmp"
        if not tmp_root.is_dir():
            return
        now = time.time()
        for p in tmp_root.iterdir():
            try:
                if now - p.stat().st_mtime > max_age_seconds:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    # ---- maintenance -------------------------------------------------------
    def remove(self, key: str) -> None:
        shutil.rmtree(self.entry_path(key), ignore_errors=True)
        shutil.rmtree(self.scratch_path(key), ignore_errors=True)

    def verify(self, entry: Entry) -> list[str]:
        """Problems with one entry (missing, resized or changed files)."""
        problems = []
        for rel, info in entry.manifest.get("files", {}).items():
            p = entry.path / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
            elif p.stat().st_size != info["bytes"]:
                problems.append(f"{rel}: size {p.stat().st_size} != {info['bytes']}")
            elif file_sha256(p) != info["sha256"]:
                problems.append(f"{rel}: content hash differs")
        return problems

    def size_bytes(self, entry: Entry) -> int:
        return sum(f["bytes"] for f in entry.manifest.get("files", {}).values())


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists indexed ``a[0]``)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def diff_ingredients(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines ``config.group_size: 128 -> 64`` for every differing leaf."""
    a, b = flatten(old), flatten(new)
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            lines.append(f"{k}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}")
    return lines


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:16] + "…" + s[-8:]
