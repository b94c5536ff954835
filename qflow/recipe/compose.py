"""Compose a recipe with Hydra (defaults list, interpolation, overrides).

Uses only Hydra's public API (``initialize_config_dir`` + ``compose``). The
recipe's folder is the primary config dir, so ``defaults: [lib/model/smollm2]``
finds qflow's own ``lib/model/smollm2.yaml`` (also spelled ``qflow/lib/...``,
on every recipe's search path). Shared recipe libraries join the search path:
``--lib DIR`` (a folder), ``--lib pkg://NAME`` (an installed package), ``--lib
git+URL@COMMIT[#SUBDIR]`` (cloned once into the cache), the
``QFLOW_RECIPE_PATH`` environment variable (``:``-separated) and installed
packages' ``qflow.recipes`` entry points: see :mod:`qflow.recipe.libraries`.

Example::

    cfg = compose_recipe("recipes/llama-awq.yaml", ["params.bits=3"])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import RecipeError


def _yaml_preflight(path: Path) -> dict[str, Any]:
    """Parse the file ourselves first: UTF-8, duplicate keys and syntax errors name the line."""
    from .safety import read_yaml_file

    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a YAML mapping, got {type(data).__name__}", where=str(path),
                          fix="start the file with top-level keys such as 'name:' and 'stages:'")
    check_defaults_list(data, path)
    return data


_DEFAULTS_FIX = ("write the defaults list as a YAML list whose entries are config names or one-key "
                 "'group: name' mappings, e.g. defaults: [lib/model/smollm2, {lib/protocol: ci}, _self_]")


def check_defaults_list(data: dict[str, Any], path: Path) -> None:
    """The form of a file's ``defaults:`` list, checked before Hydra reads it (Hydra's own checks
    raise plain ValueError / AssertionError). An entry is a name, or one ``group: name`` mapping
    whose name is a string, a list of strings or null."""
    if "defaults" not in data:
        return
    items = data["defaults"]
    if not isinstance(items, list):
        got = "a mapping" if isinstance(items, dict) else "null" if items is None else repr(items)[:60]
        raise RecipeError(f"defaults must be a list, got {got}", where=str(path), fix=_DEFAULTS_FIX)
    for i, item in enumerate(items):
        if isinstance(item, str):
            continue
        if isinstance(item, dict) and len(item) == 1:
            (group, name), = item.items()
            if isinstance(group, str) and group.strip() and (
                    name is None or isinstance(name, str)
                    or isinstance(name, list) and all(isinstance(n, str) for n in name)):
                continue
        raise RecipeError(f"defaults[{i}] is {repr(item)[:60]}: an entry is a config name (a string) or one "
                          f"'group: name' mapping (name: a string, a list of strings or null)",
                          where=str(path), fix=_DEFAULTS_FIX)


def resolve_library(spec: str, cache_dir: Path) -> str:
    """A Hydra search-path entry (``file://``) for one library spec (see :mod:`qflow.recipe.libraries`)."""
    from .libraries import resolve_library as _resolve

    return f"file://{_resolve(spec, cache_dir).root}"


def search_path(libraries: list[str], cache_dir: Path, recipe_data: dict[str, Any]) -> list[str]:
    """``--lib`` libraries, ``QFLOW_RECIPE_PATH``, installed ``qflow.recipes`` packages, the recipe's own
    ``hydra.searchpath`` folders, the qualified-name folder, and qflow's own library (always)."""
    from .libraries import resolve_libraries, search_entries

    entries = search_entries(resolve_libraries(libraries, cache_dir), cache_dir)
    declared = (recipe_data.get("hydra") or {}).get("searchpath") or []
    declared = [str(s) for s in declared]   # folders only: safety.check_untrusted refuses pkg:// here
    return list(dict.fromkeys(entries[:-1] + declared + entries[-1:]))


def searchpath_override(entries: list[str]) -> str:
    """Always given, even empty, so Hydra never processes a recipe's own ``hydra.searchpath`` itself."""
    return "hydra.searchpath=[" + ",".join(entries) + "]"


def _reraise_clean(exc: BaseException, path: Path) -> None:
    """A QflowError raised inside Hydra/OmegaConf (a resolver) or a YAML problem in a library file."""
    import yaml

    cause = exc
    while cause is not None:
        if isinstance(cause, RecipeError):
            raise cause from None
        if isinstance(cause, UnicodeDecodeError):
            raise RecipeError(f"a file of the recipe's defaults tree is not UTF-8 text ({cause.reason} at byte "
                              f"{cause.start})", where=str(path),
                              fix="save the recipe's library files as UTF-8") from None
        if isinstance(cause, yaml.YAMLError):
            text = " ".join(str(cause).split())
            raise RecipeError(f"a file of the recipe's defaults tree is not valid YAML: {text}", where=str(path),
                              fix="correct that file (duplicate keys, indentation, quotes) at the position named") from None
        cause = cause.__cause__ or cause.__context__



def _raised_in_hydra(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by Hydra's own code (its innermost frame lies in the hydra package)."""
    import hydra

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).is_relative_to(Path(hydra.__file__).parent)


def compose_recipe(recipe: str | os.PathLike, overrides: list[str] | None = None, *,
                   libraries: list[str] | None = None, cache_dir: Path | None = None,
                   resolve: bool = True, allow_env: list[str] | None = None):
    """Compose ``recipe`` with ``overrides``; returns an OmegaConf DictConfig.

    Checks the rules of :mod:`qflow.recipe.safety` (recipes are data) on every
    file of the defaults tree before composing. Raises RecipeError with the
    file, the failing piece and a fix.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from .safety import audit_defaults, check_composed, check_untrusted, install_env_guard

    install_env_guard(allow_env or [])
    path = recipe_file(recipe)
    data = _yaml_preflight(path)
    check_untrusted(data, str(path), primary=True)
    overrides = list(overrides or [])
    sp = search_path(libraries or [], cache_dir or Path("runs/cache"), data)
    overrides.append(searchpath_override(sp))
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None):
            audit_defaults(path.stem, overrides, RunMode.RUN, path)
            cfg = compose(config_name=path.stem, overrides=overrides, return_hydra_config=True)
            check_composed(cfg, str(path))
    except MissingConfigException as exc:
        first = str(exc).splitlines()[0]
        raise RecipeError(f"a defaults entry cannot be found: {first}", where=str(path),
                          fix="check the defaults list names (relative to the recipe's folder or a --lib library)") from None
    except HydraException as exc:
        _reraise_clean(exc, path)
        msg = " ".join(str(exc).split())
        fix = "check the override syntax (key=value, +new_key=value, ~key)"
        if "Could not override" in msg or "Key '" in msg and "not in struct" in msg:
            fix = "the key does not exist in the recipe: check its spelling, or add it with +key=value"
        if "Could not delete" in msg:
            fix = "only existing keys can be deleted with ~key"
        raise RecipeError(f"cannot apply overrides {overrides[:-1]}: {msg}", where=str(path), fix=fix) from None
    except OmegaConfBaseException as exc:
        _reraise_clean(exc, path)
        msg = " ".join(str(exc).split())
        raise RecipeError(f"composition failed: {msg}", where=str(path),
                          fix="check the recipe's defaults list and the overrides") from None
    except (RecipeError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # YAML / encoding problems of library files surface as plain exceptions
        _reraise_clean(exc, path)
        if isinstance(exc, (ValueError, AssertionError, TypeError)) and _raised_in_hydra(exc):
            # a library file's malformed defaults list (the recipe's own is checked in _yaml_preflight)
            msg = " ".join(str(exc).split()) or type(exc).__name__
            raise RecipeError(f"Hydra cannot read a defaults list of the recipe's tree: {msg}", where=str(path),
                              fix=_DEFAULTS_FIX) from None
        raise
    with open_dict(cfg):
        del cfg["hydra"]
    if resolve:
        try:
            OmegaConf.resolve(cfg)
        except OmegaConfBaseException as exc:
            _reraise_clean(exc, path)
            key = getattr(exc, "full_key", None) or "?"
            msg = " ".join(str(exc).split()).split("full_key:")[0].strip()
            raise RecipeError(f"interpolation at '{key}' failed: {msg}", where=str(path),
                              fix="make the ${...} reference point at an existing key (e.g. params.bits)") from None
    return cfg


def recipe_file(recipe: str | os.PathLike) -> Path:
    """The recipe's path, checked: an existing ``.yaml`` file."""
    path = Path(recipe)
    if path.is_dir() or path.suffix not in (".yaml", ".yml"):
        raise RecipeError(f"expected a .yaml recipe file, got {recipe}", where=str(recipe),
                          fix="pass a path such as recipes/llama-awq.yaml")
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = f" (recipes in {path.parent}: {', '.join(near)})" if near else ""
        raise RecipeError(f"recipe file not found{hint}", where=str(recipe), fix="check the path")
    return path


def audit_multirun(path: Path, overrides: list[str]) -> None:
    """The safety rules for a sweep: the defaults tree and the composed Hydra node of the multirun."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from .safety import audit_defaults, check_composed

    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None):
            audit_defaults(path.stem, overrides, RunMode.MULTIRUN, path)
            cfg = GlobalHydra.instance().config_loader().load_configuration(path.stem, overrides, RunMode.MULTIRUN)
            check_composed(cfg, str(path))
    except RecipeError:
        raise
    except (HydraException, OmegaConfBaseException) as exc:
        _reraise_clean(exc, path)
        msg = " ".join(str(exc).split())
        raise RecipeError(f"the sweep cannot be composed: {msg}", where=str(path),
                          fix="check the sweep overrides (key=a,b  key=range(1,4)  key=choice(a,b)) and the defaults") from None
    except Exception as exc:
        _reraise_clean(exc, path)
        raise


def to_plain(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
