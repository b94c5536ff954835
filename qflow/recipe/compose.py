"""Compose a recipe with Hydra (defaults list, interpolation, overrides).

Uses only Hydra's public API (``initialize_config_dir`` + ``compose``). The
recipe's folder is the primary config dir, so ``defaults: [lib/model/smollm2]``
finds ``recipes/lib/model/smollm2.yaml``. Shared recipe libraries join the
search path: ``--lib DIR`` (a folder), ``--lib pkg://package.module`` (a
Python package), ``--lib git+URL[@REF]`` (cloned once into the cache), and the
``QFLOW_RECIPE_PATH`` environment variable (``:``-separated).

Example::

    cfg = compose_recipe("recipes/llama-awq.yaml", ["params.bits=3"])
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from ..errors import RecipeError


def _yaml_preflight(path: Path) -> dict[str, Any]:
    """Parse the file ourselves first so syntax errors name the line and column."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"the file is not valid YAML ({problem} at {at})", where=str(path),
                          fix="correct the YAML syntax at that position (indentation, quotes, colons)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a YAML mapping, got {type(data).__name__}", where=str(path),
                          fix="start the file with top-level keys such as 'name:' and 'stages:'")
    return data


def resolve_library(spec: str, cache_dir: Path) -> str:
    """A Hydra search-path entry (``file://`` or ``pkg://``) for one library spec."""
    if spec.startswith("pkg://") or spec.startswith("file://"):
        return spec
    if spec.startswith("git+"):
        body = spec[4:]
        url, ref = body, ""
        at = body.rfind("@")
        if at > body.find("://") + 3 and "/" not in body[at:]:  # an @REF suffix, not user@host
            url, ref = body[:at], body[at + 1:]
        dest = cache_dir / "libs" / hashlib.sha256(spec.encode()).hexdigest()[:16]
        if not (dest / ".git").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            cmd = ["git", "clone", "--depth", "1"] + (["--branch", ref] if ref else []) + [url, str(dest)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RecipeError(f"cannot clone recipe library {url}: {done.stderr.strip().splitlines()[-1:]}",
                                  where=f"--lib {spec}", fix="check the URL and ref, or clone it yourself and pass --lib DIR")
        return f"file://{dest}"
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise RecipeError(f"recipe library folder {spec} does not exist", where=f"--lib {spec}",
                          fix="pass an existing folder, pkg://module or git+URL")
    return f"file://{path.resolve()}"


def search_path(libraries: list[str], cache_dir: Path, recipe_data: dict[str, Any]) -> list[str]:
    entries = [resolve_library(s, cache_dir) for s in libraries]
    env = os.environ.get("QFLOW_RECIPE_PATH", "")
    entries += [resolve_library(s, cache_dir) for s in env.split(os.pathsep) if s]
    declared = (recipe_data.get("hydra") or {}).get("searchpath") or []
    entries += [str(s) for s in declared]
    return list(dict.fromkeys(entries))


def compose_recipe(recipe: str | os.PathLike, overrides: list[str] | None = None, *,
                   libraries: list[str] | None = None, cache_dir: Path | None = None,
                   resolve: bool = True):
    """Compose ``recipe`` with ``overrides``; returns an OmegaConf DictConfig.

    Raises RecipeError with the file, the failing piece and a fix.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(recipe)
    if path.is_dir() or path.suffix not in (".yaml", ".yml"):
        raise RecipeError(f"expected a .yaml recipe file, got {recipe}", where=str(recipe),
                          fix="pass a path such as recipes/llama-awq.yaml")
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = f" (recipes in {path.parent}: {', '.join(near)})" if near else ""
        raise RecipeError(f"recipe file not found{hint}", where=str(recipe), fix="check the path")
    data = _yaml_preflight(path)
    overrides = list(overrides or [])
    sp = search_path(libraries or [], cache_dir or Path("runs/cache"), data)
    if sp:
        overrides.append("hydra.searchpath=[" + ",".join(sp) + "]")
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None):
            cfg = compose(config_name=path.stem, overrides=overrides)
    except MissingConfigException as exc:
        first = str(exc).splitlines()[0]
        raise RecipeError(f"a defaults entry cannot be found: {first}", where=str(path),
                          fix="check the defaults list names (relative to the recipe's folder or a --lib library)") from None
    except HydraException as exc:
        msg = " ".join(str(exc).split())
        fix = "check the override syntax (key=value, +new_key=value, ~key)"
        if "Could not override" in msg or "Key '" in msg and "not in struct" in msg:
            fix = "the key does not exist in the recipe: check its spelling, or add it with +key=value"
        if "Could not delete" in msg:
            fix = "only existing keys can be deleted with ~key"
        raise RecipeError(f"cannot apply overrides {overrides}: {msg}", where=str(path), fix=fix) from None
    except OmegaConfBaseException as exc:
        msg = " ".join(str(exc).split())
        raise RecipeError(f"composition failed: {msg}", where=str(path),
                          fix="check the recipe's defaults list and the overrides") from None
    if "hydra" in cfg:
        with OmegaConf.open_dict(cfg):
            del cfg["hydra"]
    if resolve:
        try:
            OmegaConf.resolve(cfg)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            msg = " ".join(str(exc).split()).split("full_key:")[0].strip()
            raise RecipeError(f"interpolation at '{key}' failed: {msg}", where=str(path),
                              fix="make the ${...} reference point at an existing key (e.g. params.bits)") from None
    return cfg


def to_plain(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
