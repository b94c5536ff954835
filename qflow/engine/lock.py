"""Recipe locks: ``qflow lock RECIPE`` pins what a run resolves to; ``qflow run --locked`` refuses drift.

A lock (``RECIPE.lock`` next to the recipe: ``recipes/llama-awq.yaml`` ->
``recipes/llama-awq.lock``, canonical JSON) records

* ``resolved``: the composed, resolved recipe (environment values redacted);
* ``stages``: per stage its registered name, its version, and the fingerprints
  of what it reads from outside (``Stage.fingerprint_sources``: the model's hub
  revision or content hash, the data's content hash);
* ``libraries``: each recipe library that provided a file of the defaults tree,
  with its git commit or the content hash of its YAML files;
* ``qflow``: qflow's version;
* ``trust_remote_code``: true when locked with ``--trust-remote-code`` (absent otherwise).

``qflow run --locked`` composes and plans the recipe again, builds the same
record, and refuses to run (exit 2) listing every value that differs.

Example::

    record = lock_record(plan, "recipes/llama-awq.yaml", ["params.bits=3"], libraries=[], cache_root=...)
    write_lock(record, lock_path("recipes/llama-awq.yaml"))
    problems = lock_differences(read_lock(path), record)   # [] when nothing drifted
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import RecipeError

LOCK_FORMAT = 1
_NOT_COMPARED = ("recipe", "overrides")   # where the lock was made from; the resolved recipe says what matters


def lock_path(recipe: str | os.PathLike) -> Path:
    return Path(recipe).with_suffix(".lock")


def used_libraries(recipe: str | os.PathLike, overrides: list[str], libraries: list[str],
                   cache_dir: Path) -> dict[str, dict[str, str]]:
    """The libraries that provide a file of the recipe's defaults tree, with their commit or content hash."""
    from ..recipe.libraries import resolve_libraries
    from ..recipe.provenance import defaults_files

    libs = resolve_libraries(libraries, cache_dir)
    out = {}
    for file, _ in defaults_files(recipe, overrides, libraries=libraries, cache_dir=cache_dir):
        real = Path(os.path.realpath(file))
        for lib in libs:
            if real.is_relative_to(lib.root.resolve()):
                out[lib.name] = {"kind": lib.kind, "spec": lib.spec if lib.kind != "folder" else lib.name,
                                 "fingerprint": lib.fingerprint()}
                break
    return dict(sorted(out.items()))


def lock_record(plan, recipe: str | os.PathLike, overrides: list[str], *, libraries: list[str],
                cache_root: Path) -> dict[str, Any]:
    from ..recipe.safety import redact, remote_code_allowed

    stages = {sid: {"uses": st.uses, "version": st.cls.version,
                    "external": st.cls.fingerprint_sources(st.config, cache_root)}
              for sid, st in plan.stages.items()}
    record = {"qflow_lock": LOCK_FORMAT, "recipe": str(recipe), "overrides": list(overrides),
              "qflow": __version__,
              "libraries": used_libraries(recipe, overrides, libraries, cache_root),
              "stages": stages, "resolved": redact(plan.resolved)}
    if remote_code_allowed():   # locked with --trust-remote-code: a run without it (or the reverse) is drift
        record["trust_remote_code"] = True
    return record


def write_lock(record: dict[str, Any], path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_lock(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError("the recipe has no lock file", where=str(path),
                          fix="write one with `qflow lock RECIPE [OVERRIDES]`, or pass --lock-file PATH")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"the lock file cannot be read ({exc})", where=str(path),
                          fix="re-create it with `qflow lock RECIPE`") from None
    if not isinstance(data, dict) or data.get("qflow_lock") != LOCK_FORMAT:
        raise RecipeError(f"not a qflow lock of format {LOCK_FORMAT}", where=str(path),
                          fix="re-create it with `qflow lock RECIPE`")
    return data


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def lock_differences(locked: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per value that differs: ``KEY: locked X, now Y``."""
    a = _flat({k: v for k, v in locked.items() if k not in _NOT_COMPARED})
    b = _flat(json.loads(json.dumps({k: v for k, v in now.items() if k not in _NOT_COMPARED}, default=str)))
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: locked {json.dumps(a.get(key, '<absent>'))}, now {json.dumps(b.get(key, '<absent>'))}")
    return lines


def check_locked(plan, recipe: str | os.PathLike, overrides: list[str], *, libraries: list[str], cache_root: Path,
                 path: Path | None = None) -> Path:
    """Raise RecipeError listing the differences when the recipe no longer resolves to its lock."""
    path = Path(path) if path else lock_path(recipe)
    diffs = lock_differences(read_lock(path), lock_record(plan, recipe, overrides, libraries=libraries,
                                                          cache_root=cache_root))
    if diffs:
        shown = "; ".join(diffs[:20]) + (f"; and {len(diffs) - 20} more" if len(diffs) > 20 else "")
        raise RecipeError(f"the recipe no longer resolves to its lock ({len(diffs)} difference"
                          f"{'s' if len(diffs) != 1 else ''}): {shown}", where=str(path),
                          fix="restore what changed (overrides, library commits, model or data files), or "
                              "accept the change with `qflow lock RECIPE [OVERRIDES]`")
    return path
