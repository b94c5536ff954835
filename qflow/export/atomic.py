"""Put a finished export at a user-chosen path without ever destroying what qflow did not write.

    problem = target_problem("~/models/llama-awq", is_dir=True, overwrite=False)   # preflight: str or None
    place(export_dir, "~/models/llama-awq", record={"stage_key": key, "format": "safetensors"})

Ownership is recorded, not guessed. Every folder qflow places holds a marker,
``.qflow-export.json``: the stage key, the format, the writing pid and every
file qflow wrote (relative path and size). A single-file export (GGUF) gets a
sidecar marker, ``<file>.qflow-export.json``, that also records the file's
sha256: the file counts as qflow's only while its content still matches.

A target path may be written when it is

* absent, or an empty folder: the export is copied into a hidden temp sibling
  (same filesystem) and renamed into place -- atomic;
* a previous qflow export with nothing else in it (a folder whose files are all
  listed in its marker; a file whose content matches its sidecar): the old one
  is renamed aside to ``.qflow-old-*``, the new one renamed in, then the old
  one's listed files are removed -- a crash leaves the old export or the new one.

Anything else (a folder holding files the marker does not list, a file with no
matching marker) is refused, in the stage's preflight ``check`` before any work,
unless the stage says ``overwrite: true``. Even then qflow never deletes a file
it did not write: it moves its new files in one by one (each ``os.replace`` is
atomic; the folder as a whole is not), replacing files of the same names,
removes the files its previous marker listed that this export no longer has,
and leaves every other file alone. A file target with ``overwrite: true`` is
replaced, as the user named that exact file. A folder where a file is expected,
or the reverse, is always refused.

Temp and old siblings are named ``.qflow-tmp-<name>-<pid>-<hex>`` /
``.qflow-old-<name>-<pid>-<hex>`` and carry a marker (a temp folder's marker
lists its files before they are copied). The next export to the same path
removes such a sibling only when its marker is valid and the pid in its name is
no longer running on this machine, and then only the files the marker lists;
anything else in it stays (and the folder with it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from qflow.errors import StageError
from qflow.fingerprint import file_sha256

MARKER = ".qflow-export.json"
SIDECAR_SUFFIX = ".qflow-export.json"
# qflow's own working files beside a marker (a marker being rewritten, the next marker, a sidecar being staged)
_MARKER_FILES = re.compile(re.escape(MARKER) + r"(\.[A-Za-z0-9]+)?")
MARKER_VERSION = 1
_SHOWN = 5   # foreign names quoted in a message

log = logging.getLogger(__name__)


class ExportPathError(StageError):
    """The export's target path holds something qflow did not write (or of the wrong kind)."""


# ---------------------------------------------------------------- markers


def _absolute(target: str | Path) -> Path:
    return Path(target).expanduser().absolute()


def read_marker(path: Path) -> dict[str, Any] | None:
    """A qflow export marker's record, or None when ``path`` is absent or not one of qflow's markers."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(record, dict) and record.get("qflow_export") and isinstance(record.get("files"), dict):
        return record
    return None


def _write_marker(path: Path, record: dict[str, Any]) -> None:
    partial = path.with_name(f"{MARKER}.{os.getpid()}")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(partial, path)


def _record(base: dict[str, Any] | None, files: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {**(base or {}), "qflow_export": MARKER_VERSION, "pid": os.getpid(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, **extra}


def _files_under(folder: Path) -> list[str]:
    """Relative posix paths of every non-folder entry under ``folder`` (links not followed)."""
    out = []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        out.extend((rel_root / n).as_posix() for n in names)
        out.extend((rel_root / d).as_posix() for d in dirs if (Path(root) / d).is_symlink())
    return sorted(out)


def _foreign_in_folder(folder: Path) -> tuple[list[str], dict[str, Any] | None]:
    """(files in ``folder`` that its marker does not list, the marker's record or None)."""
    record = read_marker(folder / MARKER)
    if record is None:
        return _files_under(folder), None
    listed = set(record["files"])
    return [f for f in _files_under(folder) if f not in listed and not _MARKER_FILES.fullmatch(f)], record


def _file_is_ours(target: Path) -> bool:
    record = read_marker(target.with_name(target.name + SIDECAR_SUFFIX))
    entry = (record or {}).get("files", {}).get(target.name)
    if not isinstance(entry, dict) or entry.get("bytes") != target.stat().st_size:
        return False
    return entry.get("sha256") == file_sha256(target)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


# ---------------------------------------------------------------- the check


def target_problem(target: str | Path, *, is_dir: bool, overwrite: bool = False) -> str | None:
    """Why an export (a folder when ``is_dir``, else one file) may not be written at ``target``; None: it may."""
    target = _absolute(target)
    kind = "folder" if is_dir else "file"
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"path {target} lies under {parent}, which is a file, not a folder; choose another path"
            break
    if target.is_symlink():
        return f"path {target} is a symbolic link; qflow does not write through or replace links: choose another path"
    if not target.exists():
        return None
    if target.is_dir() != is_dir:
        other = "folder" if target.is_dir() else "file"
        return (f"path {target} is a {other} and this export is a {kind}; qflow never replaces one with the other: "
                f"choose another path")
    if is_dir:
        foreign, record = _foreign_in_folder(target)
        if not foreign or overwrite:
            return None
        what = ("a folder qflow did not write" if record is None
                else f"a qflow export that also holds {len(foreign)} file(s) qflow did not write")
        return (f"path {target} is {what} ({_shown(foreign)}); "
                f"qflow exports only into an absent path, an empty folder or a previous qflow export (a folder "
                f"with {MARKER}): set overwrite: true in the stage's with: (qflow then replaces only the files it "
                f"writes and leaves {_shown(foreign)} alone) or choose another path")
    sidecar = target.with_name(target.name + SIDECAR_SUFFIX)
    if _file_is_ours(target) or overwrite:
        return None
    why = ("its content differs from what qflow wrote there" if sidecar.exists()
           else f"there is no {sidecar.name} beside it")
    return (f"path {target} is a file qflow did not write ({why}); qflow replaces only its own exports: "
            f"set overwrite: true in the stage's with: to replace this file, or choose another path")


# ---------------------------------------------------------------- placing


def place(src: str | Path, target: str | Path, *, overwrite: bool = False, record: dict[str, Any] | None = None,
          where: str | None = None, skip: tuple[str, ...] = ()) -> Path:
    """Copy the export ``src`` (a folder or one file) to ``target`` under the rules above; returns ``target``.

    ``record``: what the marker says besides the files (stage key, format, ...);
    ``where``: the YAML path named in an ExportPathError; ``skip``: files of a folder ``src``
    that are not part of the export (a cache entry's ``artifact.json``).
    """
    src, target = Path(src), _absolute(target)
    problem = target_problem(target, is_dir=src.is_dir(), overwrite=overwrite)
    if problem:
        raise ExportPathError(problem, where=where)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(target)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".qflow-tmp-{target.name}-{tag}"
    files = [f for f in _files_under(src) if f not in skip] if src.is_dir() else [target.name]
    tmp.mkdir()
    # listed before copying: a crash mid-copy leaves a temp sibling the next export can clean
    _write_marker(tmp / MARKER, _record(record, {f: {} for f in files}, partial=True))
    try:
        if src.is_dir():
            _place_folder(src, tmp, target, files, record, tag, where)
        else:
            _place_file(src, tmp, target, record)
    finally:  # after a success only the temp folder's marker is left in it
        if tmp.exists():
            _remove_listed(tmp)
    return target


def _place_folder(src: Path, tmp: Path, target: Path, files: list[str], record: dict[str, Any] | None,
                  tag: str, where: str | None) -> None:
    sizes = {}
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, tmp / rel)
        sizes[rel] = {"bytes": (tmp / rel).stat().st_size}
    final = _record(record, sizes)
    _write_marker(tmp / MARKER, final)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(tmp, target)          # rename(2) also replaces an empty folder
        return
    foreign, old_record = _foreign_in_folder(target)
    if not foreign and old_record is not None:
        old = target.parent / f".qflow-old-{target.name}-{tag}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)      # put the previous export back
            raise
        if not _remove_listed(old):
            log.warning("%s: files appeared in the previous export while this one was written; they were kept "
                        "in %s", target, old)
        return
    _merge_into(tmp, target, files, final, old_record, where)


def _merge_into(tmp: Path, target: Path, files: list[str], final: dict[str, Any], old_record: dict[str, Any] | None,
                where: str | None) -> None:
    """``overwrite: true`` on a folder holding foreign files: move qflow's files in one by one."""
    for rel in files:
        dest = target / rel
        blocked = dest if dest.is_dir() and not dest.is_symlink() else None
        for parent in dest.parents:
            if parent == target:
                break
            if parent.exists() and not parent.is_dir():
                blocked = parent
        if blocked is not None:
            raise ExportPathError(f"path {target}: the export writes {rel}, but {blocked} is in the way (a "
                                  f"{'folder' if blocked.is_dir() else 'file'} qflow does not replace)",
                                  where=where, fix="move it away, or choose another path")
    old_files = set((old_record or {}).get("files", {}))
    # every file qflow has or will have in the folder is listed before any moves: a crash leaves nothing unlisted
    union = {**{f: {} for f in old_files}, **final["files"]}
    _write_marker(tmp / f"{MARKER}.next", _record(final, union, partial=True))
    os.replace(tmp / f"{MARKER}.next", target / MARKER)
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, target / rel)
    for rel in sorted(old_files - set(files)):
        stale = target / rel
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
        _prune_empty_parents(stale.parent, target)
    _write_marker(target / MARKER, final)


def _place_file(src: Path, tmp: Path, target: Path, record: dict[str, Any] | None) -> None:
    staged = tmp / target.name
    shutil.copy2(src, staged)
    entry = {"bytes": staged.stat().st_size, "sha256": file_sha256(staged)}
    sidecar = _record(record, {target.name: entry})
    _write_marker(tmp / f"{MARKER}.sidecar", sidecar)
    os.replace(staged, target)
    os.replace(tmp / f"{MARKER}.sidecar", target.with_name(target.name + SIDECAR_SUFFIX))


def placed_matches(src: str | Path, target: str | Path, stage_key: str, skip: tuple[str, ...] = ()) -> bool:
    """True when ``target`` holds the export of ``stage_key`` as ``place`` left it: its marker (a folder's,
    or a file's sidecar) is final and names that key, and every file it lists is there with the size of
    the same file in ``src``. Sizes, not hashes: a cached run must not re-read a multi-GB export."""
    src, target = Path(src), _absolute(target)
    if src.is_dir():
        record = read_marker(target / MARKER) if target.is_dir() and not target.is_symlink() else None
        files = [f for f in _files_under(src) if f not in skip]
        base = target
    else:
        record = read_marker(target.with_name(target.name + SIDECAR_SUFFIX))
        files = [target.name]
        base = target.parent
    if record is None or record.get("partial") or record.get("stage_key") != stage_key:
        return False
    listed = record["files"]
    if set(listed) != set(files):
        return False
    for rel in files:
        path = base / rel
        origin = src / rel if src.is_dir() else src
        if not path.is_file() or path.is_symlink() or path.stat().st_size != origin.stat().st_size:
            return False
        if listed[rel].get("bytes") != path.stat().st_size:
            return False
    return True


def ensure_placed(src: str | Path, target: str | Path, *, stage_key: str, overwrite: bool = False,
                  record: dict[str, Any] | None = None, where: str | None = None,
                  skip: tuple[str, ...] = ()) -> tuple[Path, bool]:
    """A cache hit's side of ``place``: ``(target, placed_now)``.

    A run that finds an export stage cached did not place anything, yet the user expects the export at
    its path: a run killed while placing left a temp or old sibling (and possibly no export), or the
    user removed or changed the folder. Stale siblings of dead processes are cleaned; then the cached
    export is placed again unless ``target`` already holds it (:func:`placed_matches`), under the same
    rules as ``place`` (a folder holding files qflow did not write is refused unless ``overwrite``).
    """
    target = _absolute(target)
    if target.parent.is_dir():
        clean_stale_siblings(target)
    if placed_matches(src, target, stage_key, skip):
        return target, False
    return place(src, target, overwrite=overwrite, record={**(record or {}), "stage_key": stage_key},
                 where=where, skip=skip), True


def placed_on_hit(src: str | Path, cfg: Any, *, stage_key: str, stage_id: str, fmt: str,
                  skip: tuple[str, ...] = ()) -> list[str]:
    """An export stage's ``on_hit``: :func:`ensure_placed` for ``cfg.path`` (if any); the run log's notes."""
    if not getattr(cfg, "path", None):
        return []
    target, again = ensure_placed(src, cfg.path, stage_key=stage_key, overwrite=cfg.overwrite,
                                  record={"format": fmt, "stage": stage_id}, where=f"stages.{stage_id}.with.path",
                                  skip=skip)
    return [f"export placed again at {target} (it was missing or differed from the cached export)"] if again else []


# ---------------------------------------------------------------- cleaning up


def _remove_listed(folder: Path) -> bool:
    """Remove the files ``folder``'s marker lists, the marker, then empty folders; True when ``folder`` is gone."""
    record = read_marker(folder / MARKER)
    for rel in (record or {}).get("files", {}):
        path = folder / rel
        if folder in path.parents and (path.is_file() or path.is_symlink()):
            path.unlink()
    if record is not None:
        for path in folder.iterdir():
            if _MARKER_FILES.fullmatch(path.name) and path.is_file():
                path.unlink()
    for root, _, _ in sorted(os.walk(folder), key=lambda x: -len(x[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass                         # not empty: something qflow did not list stays
    return not folder.exists()


def _prune_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_siblings(target: Path) -> list[Path]:
    """Remove the qflow-made temp/old siblings of ``target`` left by dead processes; returns those removed."""
    target = _absolute(target)
    pattern = re.compile(rf"\.qflow-(?:tmp|old)-{re.escape(target.name)}-(\d+)-[0-9a-f]{{8}}")
    removed = []
    if not target.parent.is_dir():
        return removed
    for sibling in target.parent.iterdir():
        found = pattern.fullmatch(sibling.name)
        if not found or sibling.is_symlink() or not sibling.is_dir() or _pid_alive(int(found.group(1))):
            continue
        if read_marker(sibling / MARKER) is None:
            continue                     # no marker: not provably qflow's
        if _remove_listed(sibling):
            removed.append(sibling)
        else:
            log.warning("%s holds files qflow did not write; left in place", sibling)
    return removed
