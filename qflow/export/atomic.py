"""Put a finished export at a user-chosen path atomically (nothing half-written, ever).

    place(src_dir_or_file, Path("~/models/llama-awq").expanduser())

The source is copied into a hidden temp sibling of the target (same filesystem),
then renamed into place with ``os.replace``. An existing target is first renamed
aside and removed only after the new one is in place, so a crash leaves either
the old export or the new one (plus a hidden ``.qflow-tmp-*``/``.qflow-old-*``
sibling that the next export to that path removes).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def place(src: Path, target: Path) -> Path:
    src, target = Path(src), Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in list(target.parent.glob(f".qflow-tmp-{target.name}-*")) + \
            list(target.parent.glob(f".qflow-old-{target.name}-*")):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".qflow-tmp-{target.name}-{tag}"
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        if target.exists() and target.is_dir() != src.is_dir():
            kind = "a folder" if target.is_dir() else "a file"
            raise FileExistsError(f"{target} exists and is {kind}; the export is "
                                  f"{'a folder' if src.is_dir() else 'a file'}: choose another path")
        if target.exists() and target.is_dir():
            old = target.parent / f".qflow-old-{target.name}-{tag}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    return target
