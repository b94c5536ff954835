"""Where every value of a composed recipe comes from (``qflow recipes show``).

Hydra merges the files of the defaults tree in order (each at its package:
``_global_`` pieces at the root, a group's piece under the group's name), then
the command-line overrides. :func:`sources` replays that order on the files'
YAML node trees, which carry line numbers, and answers, for each leaf of the
composed recipe, the last file and line (or override) that set it or a mapping
above it. Keys are matched as paths of components, so a key that contains dots
(a per-layer pattern such as ``model.layers.0.mlp.down_proj``) is one component:
it never takes the line of a different key that flattens to the same text. In
the returned dotted keys such a component is written ``["..."]``
(:func:`dotted`): ``stages.quantize.with.layers["model.layers.0.mlp"].bits``.

Example::

    cfg, where = sources("recipes/llama-awq.yaml", ["params.bits=3"])
    where["params.bits"]        # 'command line: params.bits=3'
    where["eval.batch_size"]    # '.../qflow/lib/eval/default.yaml:4'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import RecipeError


def defaults_files(recipe: str | os.PathLike, overrides: list[str], *, libraries: list[str] | None = None,
                   cache_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(file, package) of every recipe file of the defaults tree, in merge order (Hydra's own configs left out)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from .compose import _yaml_preflight, recipe_file, search_path, searchpath_override
    from .safety import _source_file

    path = recipe_file(recipe)
    argv = list(overrides) + [searchpath_override(search_path(libraries or [], cache_dir or Path("runs/cache"),
                                                              _yaml_preflight(path)))]
    out = []
    with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None):
        loader = GlobalHydra.instance().config_loader()
        tree = loader.compute_defaults_list(path.stem, argv, RunMode.RUN)
        _, repo = loader._parse_overrides_and_create_caching_repo(path.stem, argv)
        for d in tree.defaults:
            if d.config_path is None or d.config_path.split("/")[0] == "hydra":
                continue
            result = repo.load_config(d.config_path)
            file = _source_file(str(result.path), d.config_path) if result is not None else None
            if file is not None:   # the real file, not the qualified-name link (<cache>/libs/names/...)
                out.append((Path(os.path.realpath(file)), d.package or ""))
    return out


Path_ = tuple[str, ...]   # a key as its components: ("stages", "quantize", "with", "layers", "model.layers.0")


def dotted(path: Path_) -> str:
    """A key path as one string: components joined by dots, a component holding a dot or a bracket as
    ``["..."]`` (JSON-quoted), so two different paths never give the same string."""
    out = ""
    for part in path:
        if "." in part or "[" in part or "]" in part or not part:
            out += f"[{json.dumps(part)}]"
        else:
            out += f".{part}" if out else part
    return out


def _leaf_lines(node, prefix: Path_, out: dict[Path_, int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        out.setdefault(prefix, node.start_mark.line + 1) if prefix else None
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if not prefix and key == "defaults":
                continue
            _leaf_lines(value_node, (*prefix, key), out)
    else:
        out[prefix] = node.start_mark.line + 1


def file_lines(file: Path, package: str) -> dict[Path_, int]:
    """Key path -> line for every key the file sets, under its package (a dotted group path)."""
    import yaml

    node = yaml.compose(Path(file).read_text(encoding="utf-8"))
    lines: dict[Path_, int] = {}
    if node is not None:
        _leaf_lines(node, (), lines)
    base = tuple(package.split(".")) if package else ()
    return {(*base, *k): v for k, v in lines.items()}


def _override_keys(overrides: list[str]) -> dict[Path_, str]:
    keys = {}
    for o in overrides:
        key, eq, _ = o.partition("=")
        key = key.lstrip("+~")
        if eq and "/" not in key and not key.startswith("hydra"):
            keys[tuple(key.split("."))] = f"command line: {o}"   # Hydra's override keys: dots separate keys
    return keys


def sources(recipe: str | os.PathLike, overrides: list[str] | None = None, *, libraries: list[str] | None = None,
            cache_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The composed recipe (resolved) and, per leaf key (:func:`dotted`), ``file:line`` or
    ``command line: OVERRIDE``."""
    from .compose import compose_recipe, to_plain

    overrides = list(overrides or [])
    cfg = to_plain(compose_recipe(recipe, overrides, libraries=libraries, cache_dir=cache_dir))
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(compose_recipe(recipe, overrides, libraries=libraries, cache_dir=cache_dir,
                                                resolve=False), resolve=False)
    setters: dict[Path_, str] = {}
    for file, package in defaults_files(recipe, overrides, libraries=libraries, cache_dir=cache_dir):
        for path, line in file_lines(file, package).items():
            setters[path] = f"{file}:{line}"
    setters.update(_override_keys(overrides))
    where = {}
    for path in _leaves(cfg, ()):
        key = dotted(path)
        for n in range(len(path), 0, -1):
            found = setters.get(path[:n])
            if found:
                where[key] = found
                break
        else:
            where[key] = "?"
        expr = _raw_at(raw, path)
        if isinstance(expr, str) and "${" in expr:
            where[key] += f" (= {expr})"
    return cfg, where


def _raw_at(raw: Any, path: Path_) -> Any:
    """The unresolved value at ``path`` or at the nearest parent that is an interpolation string."""
    node = raw
    for part in path:
        if isinstance(node, str):
            return node
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _leaves(obj: Any, prefix: Path_):
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from _leaves(v, (*prefix, str(k)))
    else:
        yield prefix


def render(cfg: dict[str, Any], where: dict[str, str], root: Path | None = None) -> str:
    """YAML-like text, one value per line, each followed by ``# file:line`` (paths relative to ``root``)."""
    rows: list[tuple[str, str]] = []

    def short(src: str) -> str:
        if root is not None and not src.startswith("command line"):
            try:
                return str(Path(src).relative_to(root))
            except ValueError:
                return src
        return src

    def walk(obj: Any, prefix: Path_, indent: int) -> None:
        for k, v in obj.items():
            path = (*prefix, str(k))
            pad = "  " * indent
            if isinstance(v, dict) and v:
                rows.append((f"{pad}{k}:", ""))
                walk(v, path, indent + 1)
            else:
                rows.append((f"{pad}{k}: {json.dumps(v, default=str)}", short(where.get(dotted(path), "?"))))

    walk(cfg, (), 0)
    width = min(max((len(t) for t, _ in rows), default=0), 70)
    return "\n".join(f"{t:<{width}}  # {s}" if s else t for t, s in rows)


def find_recipe(name: str, libs, local: Path | None) -> Path:
    """A recipe file from a path, a qualified name (``qflow/lib/eval/default``) or an unqualified unique name."""
    from .libraries import list_recipes

    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    rows = list_recipes(libs, local)
    exact = [r for r in rows if r["qualified"] == name]
    if not exact:
        exact = [r for r in rows if r["name"] == name]
    files = list(dict.fromkeys(os.path.realpath(r["file"]) for r in exact))
    if len(files) == 1:
        return Path(files[0])
    if len(files) > 1:
        raise RecipeError(f"'{name}' is ambiguous: {' and '.join(r['file'] for r in exact)}", where="qflow recipes show",
                          fix=f"qualify it: {' or '.join(r['qualified'] for r in exact)}")
    raise RecipeError(f"no recipe named '{name}'", where="qflow recipes show",
                      fix="pass a .yaml path or a name from `qflow recipes ls`")
