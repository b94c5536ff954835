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

Layout under ``<root>``:

* ``<k[:2]>/<k>/{manifest.json, outputs/<slot>/...}``: committed entries. An
  entry is written in ``tmp/`` and renamed into place under the key's lock;
  files, manifest and folders are fsynced first, so a power loss leaves either
  no entry or a whole one.
* ``tmp/<k>-<host>-<pid>-<start>-<rand>``: work in progress of the process
  named in the folder's name; removed only when that process is gone.
* ``scratch/<k>/``: resumable state of a key until it is committed.
* ``trash/``: entries being removed. Removal renames first and deletes second,
  so a kill mid-removal never leaves a half-entry at a key's path.
* ``quarantine/<k>-<timestamp>``: entries found damaged on a cache hit, kept
  for inspection (``gc`` deletes them after ``stale_days``).

Every hit is verified (sizes and xxh3_128 of every file in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from qflow.fingerprint import file_digest, file_sha256  # file_sha256: verifies manifests written before xxh3

from .tmp_owner import owner_alive, parse_tmp_name, this_host, tmp_name

MANIFEST = "manifest.json"
FILE_HASH = "xxh3_128"
STALE_DAYS = 7.0


def is_key(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def make_key(ingredients: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(ingredients).encode()).hexdigest()


def file_hash(path: Path, *, sync: bool = False) -> str:
    """xxh3_128 of a file (hex); ``sync`` also fsyncs it, in the same open.

    Why xxh3 and not sha256: every cache hit re-hashes its entry. Measured on
    the development VM (2-core x86 VM, files in the page cache): xxh3_128 0.06 s
    per GiB, sha256 0.59 s per GiB, a plain read 0.04 s per GiB. So verifying a
    1-2 GB flagship cache adds about 0.1 s to a cached re-run; a cold disk adds
    its read time (about 0.5 s per GiB at 2 GB/s). Detecting bit rot and
    truncation needs no cryptographic hash.
    """
    return file_digest(path, FILE_HASH, sync=sync)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"


@dataclass
class Broken:
    """A folder at a key's path that is not a usable entry (no, empty or unreadable manifest)."""

    key: str
    path: Path
    problem: str


def _read_entry(key: str, path: Path) -> Entry | Broken | None:
    manifest = path / MANIFEST
    if not path.is_dir():
        return None
    if not manifest.is_file():
        return Broken(key, path, "no manifest.json (an interrupted removal or a damaged disk)")
    try:
        text = manifest.read_text()
    except OSError as exc:
        return Broken(key, path, f"unreadable manifest.json ({exc.strerror or exc})")
    if not text.strip():
        return Broken(key, path, "empty manifest.json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Broken(key, path, f"unparseable manifest.json ({exc.msg} at line {exc.lineno})")
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return Broken(key, path, "manifest.json lacks its file list")
    return Entry(key, path, data)


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

    def try_lock(self, key: str):
        """The key's lock, acquired without waiting, or None when another process holds it."""
        from filelock import Timeout

        lock = self.lock(key, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return None
        return lock

    # ---- read ------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The entry of ``key`` if its manifest is readable (not verified: for planning and explain)."""
        found = _read_entry(key, self.entry_path(key))
        return found if isinstance(found, Entry) else None

    def inspect(self, key: str) -> Entry | Broken | None:
        return _read_entry(key, self.entry_path(key))

    def get_verified(self, key: str, expect: Iterable[str] = ()) -> tuple[Entry | None, str | None]:
        """A cache hit whose files all match the manifest, else ``(None, what was wrong)``.

        Call it holding the key's lock. A damaged entry (changed, truncated or missing
        file, missing or bad manifest, missing ``expect`` path) is moved to
        ``quarantine/`` so the caller recomputes it.
        """
        found = self.inspect(key)
        if found is None:
            return None, None
        if isinstance(found, Broken):
            problems = [found.problem]
        else:
            problems = self.verify(found)
            problems += [f"{rel}: missing" for rel in expect
                         if rel not in found.manifest["files"] and not (found.path / rel).exists()]
            if not problems:
                return found, None
        where = self.quarantine(key)
        return None, f"{'; '.join(problems)}; moved to {where}"

    def items(self) -> Iterator[Entry | Broken]:
        """Every folder at a key's path, broken ones included."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for path in sorted(shard.iterdir()):
                if not is_key(path.name):
                    continue
                found = _read_entry(path.name, path)
                if found is not None:
                    yield found

    def entries(self) -> Iterator[Entry]:
        for found in self.items():
            if isinstance(found, Entry):
                yield found

    # ---- write -----------------------------------------------------------
    def new_tmp(self, key: str) -> Path:
        tmp = self.root / "tmp" / tmp_name(key)
        (tmp / "outputs").mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path, manifest: dict[str, Any]) -> Entry:
        """Hash and fsync the outputs, write the manifest, rename ``tmp`` into place (atomic)."""
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and p != tmp / MANIFEST:
                rel = p.relative_to(tmp).as_posix()
                files[rel] = {"bytes": p.stat().st_size, FILE_HASH: file_hash(p, sync=True)}
        manifest = dict(manifest, key=key, files=files, committed_at=time.time())
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True, default=str))
            f.flush()
            os.fsync(f.fileno())
        for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            fsync_dir(folder)
        fsync_dir(tmp)
        final = self.entry_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        present = self.inspect(key)
        if isinstance(present, Entry):  # someone else committed the same key first
            self._discard(tmp)
            return present
        if isinstance(present, Broken):  # a removal killed half-way: never block the key
            self._discard(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        fsync_dir(tmp.parent)
        return Entry(key, final, manifest)

    def memo(self, name: str, ingredients: dict[str, Any], compute: Callable[[Path], None]) -> tuple[str, Path]:
        """A keyed sub-result: computed once under a lock, then reused (verified on every hit)."""
        key = make_key({"memo": name, **ingredients})
        with self.lock(key):
            entry, damage = self.get_verified(key)
            if damage:
                print(f"warning: memo '{name}' cache entry {key[:12]} is damaged ({damage}); recomputing",
                      file=sys.stderr, flush=True)
            if entry is None:
                tmp = self.new_tmp(key)
                try:
                    compute(tmp / "outputs")
                    entry = self.commit(key, tmp, {"memo": name, "ingredients": ingredients})
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        return key, entry.outputs

    def clean_tmp(self) -> list[Path]:
        """Remove temp folders whose owner is gone; returns those removed.

        An owner on this host is gone when its pid is not running or was reused
        (another start time). For an owner on another host (or an unreadable
        name), the folder goes only when the key's lock is free: every temp
        folder is written under its key's lock.
        """
        tmp_root = self.root / "tmp"
        if not tmp_root.is_dir():
            return []
        removed = []
        for p in sorted(tmp_root.iterdir()):
            key, host, pid, start = parse_tmp_name(p.name)
            if not is_key(key) or not p.is_dir():
                continue  # not a folder qflow made
            if host == this_host() and pid is not None:
                if owner_alive(pid, start):
                    continue
                self._discard(p)
                removed.append(p)
                continue
            lock = self.try_lock(key)  # another host's folder, or an old-style name without a host
            if lock is None:
                continue
            try:
                self._discard(p)
                removed.append(p)
            finally:
                lock.release()
        return removed

    # ---- maintenance -------------------------------------------------------
    def _to_trash(self, path: Path) -> Path | None:
        trash = self.root / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        fsync_dir(path.parent)
        return target

    def _discard(self, path: Path) -> None:
        target = self._to_trash(path)
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)

    def empty_trash(self) -> int:
        """Delete what removals killed half-way left in ``trash/``; returns the count."""
        trash = self.root / "trash"
        if not trash.is_dir():
            return 0
        items = list(trash.iterdir())
        for p in items:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return len(items)

    def remove(self, key: str) -> None:
        """Remove an entry and its scratch: rename into ``trash/`` first, then delete."""
        self.empty_trash()
        self._discard(self.entry_path(key))
        self._discard(self.scratch_path(key))

    def quarantine(self, key: str) -> Path:
        """Move a damaged entry out of the key's path, kept for inspection."""
        folder = self.root / "quarantine"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        os.rename(self.entry_path(key), target)
        os.utime(target)  # gc ages quarantine from now, not from the commit
        fsync_dir(self.entry_path(key).parent)
        return target

    def verify(self, entry: Entry) -> list[str]:
        """Problems with one entry (missing, resized or changed files).

        Manifests written before qflow hashed with xxh3 carry ``sha256``: those
        are verified with sha256 (slower, but an old cache stays valid).
        """
        problems = []
        for rel, info in entry.manifest.get("files", {}).items():
            p = entry.path / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
            elif p.stat().st_size != info.get("bytes"):
                problems.append(f"{rel}: size {p.stat().st_size} != {info.get('bytes')}")
            elif FILE_HASH in info:
                if file_hash(p) != info[FILE_HASH]:
                    problems.append(f"{rel}: content hash differs")
            elif "sha256" in info:
                if file_sha256(p) != info["sha256"]:
                    problems.append(f"{rel}: content hash differs")
            else:
                problems.append(f"{rel}: no hash in the manifest")
        return problems

    def size_bytes(self, entry: Entry) -> int:
        return sum(f.get("bytes", 0) for f in entry.manifest.get("files", {}).values())

    def collect_scratch(self, stale_days: float = STALE_DAYS, dry_run: bool = False) -> list[Path]:
        """Scratch of committed keys (always) and of keys untouched for ``stale_days`` whose lock is free.

        Scratch is the resume state of a killed run: it must outlive the kill,
        so an uncommitted key's scratch goes only once nobody touched it for days.
        """
        root = self.root / "scratch"
        if not root.is_dir():
            return []
        removed = []
        for p in sorted(root.iterdir()):
            if not is_key(p.name) or not p.is_dir():
                continue
            committed = self.get(p.name) is not None
            if not committed and time.time() - _newest_mtime(p) < stale_days * 86400:
                continue
            lock = self.try_lock(p.name)
            if lock is None:
                continue
            try:
                if not dry_run:
                    self._discard(p)
                removed.append(p)
            finally:
                lock.release()
        return removed

    def collect_quarantine(self, stale_days: float = STALE_DAYS, dry_run: bool = False) -> list[Path]:
        root = self.root / "quarantine"
        if not root.is_dir():
            return []
        old = [p for p in sorted(root.iterdir())
               if is_key(p.name[:64]) and time.time() - p.stat().st_mtime >= stale_days * 86400]
        if not dry_run:
            for p in old:
                self._discard(p)
        return old


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            pass
    return newest


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
