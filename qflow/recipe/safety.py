"""Recipes are data: what a recipe or a shared library may not do, checked before composition runs.

A recipe (and every file of a ``--lib`` library it pulls in) is YAML that qflow
reads; nothing in it may import or run code, copy secrets into tracked files,
or choose Hydra's code-carrying configs. Hydra would otherwise instantiate a
``_target_`` named in ``hydra.callbacks`` / ``hydra.launcher`` /
``hydra.sweeper`` (any importable callable: a pickle loader is enough for a
payload), import a ``pkg://`` search-path module, and ``${oc.env:NAME}`` would
copy any environment variable into MLflow and ``recipe.resolved.yaml``.

The rules, enforced by :func:`audit_defaults` and :func:`check_composed`:

* A file outside qflow's own library (``qflow/recipe_lib``, in the package) is
  *untrusted*. It must be UTF-8 YAML without duplicate keys, and may not
  contain a ``_target_`` key, a ``hydra`` key (the recipe itself may declare
  ``hydra.searchpath``, of folders only), or a ``# @package hydra...`` header.
* A ``hydra/...`` config (launcher, sweeper, callbacks, logging) must come from
  Hydra itself, an installed Hydra plugin, or qflow's own library; a library
  cannot shadow ``hydra/launcher/ray`` with its own file.
* ``hydra.callbacks`` must be empty; launcher/sweeper ``_target_`` values must
  name Hydra's or its plugins' classes (or Optuna's samplers).
* A defaults name may not contain ``..`` or be an absolute path, a file a
  library provides must resolve (symlinks followed) inside that library's
  root, and a name two libraries provide is an error unless qualified
  (:mod:`qflow.recipe.libraries`).
* No ``trust_remote_code`` key anywhere (a recipe, a library file, an
  override): only the command line's ``--trust-remote-code`` lets a
  checkpoint's own code run (:func:`remote_code_allowed`).
* ``pkg://`` search paths come only from the command line (``--lib``) or
  ``QFLOW_RECIPE_PATH``: a recipe's own ``hydra.searchpath`` may name folders.
* ``${oc.env:NAME}`` resolves only for names the user allowed on the command
  line (``--allow-env NAME``) and inside Hydra's own node (e.g. the Ray
  launcher's ``RAY_ADDRESS``); values read that way are *secrets*:
  :func:`redact` replaces them in everything qflow writes (the resolved recipe,
  MLflow params, cache manifests). Cache keys are computed from the real values.

Example::

    install_env_guard({"HF_TOKEN"})
    with initialize_config_dir(config_dir=..., version_base=None):
        audit_defaults(name, overrides, run_mode, recipe_path)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import RecipeError, SourceError

from .libraries import QFLOW_LIB  # noqa: E402  (qflow/recipe_lib/qflow/lib, shipped in the package)
_TRUSTED_SOURCES = ("pkg://hydra.conf", "pkg://hydra_plugins", "structured://")
_TRUSTED_TARGETS = ("hydra._internal.core_plugins.", "hydra_plugins.", "optuna.samplers.")
_MIN_REDACT_LEN = 4   # shorter secrets are redacted only where they were read, not inside other strings


# ---- strict YAML ---------------------------------------------------------------

def strict_yaml_load(text: str | bytes, where: str) -> Any:
    """Parse YAML, refusing non-UTF-8 bytes and duplicate keys, with the line in the message."""
    import yaml

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            raise RecipeError(f"the file is not UTF-8 text (byte 0x{text[exc.start]:02x} at line {line}, "
                              f"offset {exc.start})", where=where,
                              fix="save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None

    class _Loader(yaml.SafeLoader):
        pass

    def _mapping(loader, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1} (first at line "
                                  f"{seen[key] + 1})", where=where,
                                  fix="keep one of the two entries (YAML would silently use the last one)")
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"the file is not valid YAML ({problem} at {at})", where=where,
                          fix="correct the YAML syntax at that position (indentation, quotes, colons)") from None


def read_yaml_file(path: Path) -> Any:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read the file ({exc.strerror})", where=str(path), fix="check the path and its permissions") from None
    return strict_yaml_load(raw, str(path))


# ---- content rules ---------------------------------------------------------------

def _find_key(obj: Any, key: str, prefix: str = "") -> str | None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{prefix}.{k}" if prefix else str(k)
            if k == key:
                return here
            found = _find_key(v, key, here)
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _find_key(v, key, f"{prefix}[{i}]")
            if found:
                return found
    return None


def check_untrusted(data: Any, where: str, *, primary: bool = False, header_package: str | None = None) -> None:
    """The content rules for a recipe or a library file (see the module docstring)."""
    if header_package and header_package.split(".")[0] == "hydra":
        raise RecipeError(f"the file declares '# @package {header_package}': a recipe library may not configure "
                          f"Hydra (launchers, sweepers and callbacks run code)", where=where,
                          fix="remove the header; choose launchers with `+lib/launcher=ray` or `hydra/launcher=...` "
                              "on the command line")
    hydra = data.get("hydra") if isinstance(data, dict) else None
    extra = [] if hydra is None else sorted(set(hydra) - {"searchpath"}) if primary and isinstance(hydra, dict) \
        else ["hydra"]
    if extra:
        raise RecipeError(f"the file configures Hydra ({', '.join(f'hydra.{k}' if k != 'hydra' else k for k in extra)}): "
                          f"callbacks, launchers and sweepers run code, so a recipe or a library may not set them",
                          where=where,
                          fix="remove the hydra block; pick a launcher or sweeper on the command line "
                              "(+lib/launcher=ray, hydra/sweeper=optuna) or in the recipe's 'sweep:' block")
    for entry in (hydra or {}).get("searchpath") or []:
        if not isinstance(entry, str) or not entry.startswith("file://") and "://" in entry:
            raise RecipeError(f"hydra.searchpath entry {entry!r}: a recipe may add folders (file://...) to its "
                              f"search path, not Python packages (importing a package runs its code)", where=where,
                              fix=f"pass the package on the command line: --lib {entry}")
    target = _find_key(data, "_target_")
    if target:
        raise RecipeError(f"'{target}' names code to instantiate; recipes are data and qflow never instantiates "
                          f"a recipe's _target_", where=where,
                          fix="remove the key; stages are chosen with 'uses:' from the registered stages "
                              "(qflow ls stages)")


def audit_defaults(config_name: str, overrides: list[str], run_mode: Any, recipe_path: Path) -> None:
    """Check every file of the recipe's defaults tree (inside ``initialize_config_dir``).

    Uses Hydra's config loader to list the tree exactly as composition will load
    it (``compute_defaults_list``) and to find which search-path entry provides
    each file; hydra-core is pinned (requirements.txt) since the repository
    lookup is Hydra's internal API (tests/test_recipe_safety.py fails if it changes).
    """
    from hydra.core.global_hydra import GlobalHydra

    from .libraries import check_config_path, check_contained, check_unambiguous

    loader = GlobalHydra.instance().config_loader()
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if "/" in key and value and not key.startswith("hydra"):
            for v in value.strip("[]").split(","):
                check_config_path(f"{key}/{v.strip()}", f"override {o}")
    defaults = loader.compute_defaults_list(config_name, overrides, run_mode)
    _, repo = loader._parse_overrides_and_create_caching_repo(config_name, overrides)
    roots = _search_roots(recipe_path, overrides)
    seen: set[str] = set()
    for d in defaults.defaults:
        path = d.config_path
        if path is None or path in seen:
            continue
        seen.add(path)
        if path.split("/")[0] != "hydra":
            check_config_path(path, str(recipe_path))
            if not d.primary:
                check_unambiguous(path, roots, str(recipe_path))
        result = repo.load_config(path)
        if result is None:
            continue
        source = str(result.path)
        file = _source_file(source, path)
        if file is not None and path.split("/")[0] != "hydra":
            check_contained(file, _containment_root(Path(source[len("file://"):]), path), str(file))
        trusted = source.startswith(_TRUSTED_SOURCES) or (file is not None and _inside(file, QFLOW_LIB))
        where = str(file) if file is not None else f"{source}/{path}.yaml"
        if path.split("/")[0] == "hydra":
            if not trusted:
                raise RecipeError(f"the Hydra config '{path}' comes from {source}; launchers, sweepers and callbacks "
                                  f"run code, so qflow takes them only from Hydra, its installed plugins and qflow's "
                                  f"own library", where=where,
                                  fix="remove or rename that file in the library, and choose a launcher that qflow "
                                      "ships (+lib/launcher=ray, +lib/launcher=slurm, -j N)")
            continue
        if trusted:
            continue
        data = read_yaml_file(file) if file is not None else _pkg_yaml(source, path, where)
        check_untrusted(data, where, primary=d.primary,
                        header_package=(result.header or {}).get("package"))


def _search_roots(recipe_path: Path, overrides: list[str]) -> list[tuple[str, Path, Path]]:
    """(label, root, containment root) of the recipe's folder and every ``file://`` search-path entry."""
    from .libraries import QFLOW_LIB_ROOT

    roots = [("the recipe's folder", Path(recipe_path).parent.resolve(), Path(recipe_path).parent.resolve())]
    entries = [Path(e[len("file://"):]) for o in overrides if o.startswith("hydra.searchpath=")
               for e in o[len("hydra.searchpath="):].strip("[]").split(",") if e.startswith("file://")]
    names = {(QFLOW_LIB_ROOT / "qflow").resolve(): "qflow"}
    for root in entries:
        if root.parent.name == "names" and root.parent.parent.name == "libs" and root.is_dir():
            names.update({link.resolve(): link.name for link in root.iterdir()})
    for root in entries:
        label = f"library '{names[root.resolve()]}'" if root.resolve() in names else \
            "a library reached by its qualified name" if root.parent.name == "names" else f"folder {root}"
        roots.append((label, root, root))
    return roots


def _containment_root(source_root: Path, config_path: str) -> Path:
    """The library root a file must stay in: the source folder, or for the qualified-name folder of links
    (``<cache>/libs/names/<digest>/NAME -> library``) the library the link names."""
    if source_root.parent.name == "names" and source_root.parent.parent.name == "libs":
        return (source_root / config_path.split("/")[0]).resolve()
    return source_root.resolve()


def _source_file(source: str, config_path: str) -> Path | None:
    if source.startswith("file://"):
        base = Path(source[len("file://"):])
        for ext in (".yaml", ".yml"):
            if (base / f"{config_path}{ext}").is_file():
                return base / f"{config_path}{ext}"
    return None


def _pkg_yaml(source: str, config_path: str, where: str) -> Any:
    from importlib import resources

    pkg = source[len("pkg://"):].replace("/", ".")
    res = resources.files(pkg).joinpath(f"{config_path}.yaml")
    return strict_yaml_load(res.read_bytes(), where)


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root)
        return True
    except ValueError:
        return False


def check_composed(cfg: Any, where: str) -> None:
    """The composed config (with its ``hydra`` node): no callbacks, only known launcher/sweeper classes,
    and no ``_target_`` in the recipe's own part."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    hydra = plain.pop("hydra", None) or {}
    check_no_remote_code(plain, where)
    target = _find_key(plain, "_target_")
    if target:
        raise RecipeError(f"'{target}' names code to instantiate; recipes are data", where=where,
                          fix="remove the key (or the override that added it)")
    if hydra.get("callbacks"):
        raise RecipeError(f"hydra.callbacks ({', '.join(map(str, hydra['callbacks']))}) would run code at every "
                          f"job; qflow does not run Hydra callbacks", where=where,
                          fix="remove the callbacks (tracking and reports are qflow's own)")
    for part in ("launcher", "sweeper"):
        for key, value in _targets(hydra.get(part), f"hydra.{part}"):
            if not str(value).startswith(_TRUSTED_TARGETS):
                raise RecipeError(f"{key}: {value} is not a Hydra launcher/sweeper class", where=where,
                                  fix="use a launcher or sweeper that qflow ships (basic, joblib via -j N, "
                                      "+lib/launcher=ray|slurm, hydra/sweeper=optuna)")


def _targets(obj: Any, prefix: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "_target_":
                yield f"{prefix}._target_", v
            else:
                yield from _targets(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _targets(v, f"{prefix}[{i}]")


# ---- remote code --------------------------------------------------------------------

REMOTE_CODE_ENV = "QFLOW_TRUST_REMOTE_CODE"


def allow_remote_code() -> None:
    """The command line's ``--trust-remote-code``: model code shipped with a checkpoint may run (this process
    and the sweep jobs it starts). Nothing a recipe or a library says can call this."""
    os.environ[REMOTE_CODE_ENV] = "1"


def remote_code_allowed() -> bool:
    """What every transformers ``from_pretrained`` / ``from_config`` of a model qflow loads passes as
    ``trust_remote_code``."""
    return os.environ.get(REMOTE_CODE_ENV) == "1"


@contextmanager
def remote_code(enabled: bool) -> Iterator[None]:
    """The Python API's ``trust_remote_code=True`` for one call (and the sweep jobs it starts): set for the
    call, restored after it, so a later call in the same notebook does not inherit it."""
    before = os.environ.get(REMOTE_CODE_ENV)
    if enabled:
        os.environ[REMOTE_CODE_ENV] = "1"
    try:
        yield
    finally:
        if enabled:
            if before is None:
                os.environ.pop(REMOTE_CODE_ENV, None)
            else:
                os.environ[REMOTE_CODE_ENV] = before


@contextmanager
def remote_code_refusal(where: str) -> Iterator[None]:
    """transformers' refusal to run a checkpoint's own code (a ValueError naming ``trust_remote_code``) as
    qflow's one-paragraph error naming the flag."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) or remote_code_allowed():
            raise
        raise SourceError("the model's configuration needs its own Python code (auto_map), which qflow runs only "
                          "when you allow it", where=where,
                          fix="pass --trust-remote-code on the command line (trust_remote_code=True in the Python "
                              "API) if you trust the model's code") from None


def check_no_remote_code(plain: Any, where: str) -> None:
    found = _find_key(plain, "trust_remote_code")
    if found:
        raise RecipeError(f"'{found}': a recipe cannot allow a checkpoint's own Python code to run (recipes are data; "
                          f"shared libraries would otherwise run code on every user's machine)", where=where,
                          fix="remove the key, and pass --trust-remote-code on the command line if you trust the "
                              "model's code")


# ---- environment interpolation -----------------------------------------------------

_ALLOWED_ENV: set[str] = set()
_SECRETS: dict[str, str] = {}     # value -> variable name, for every environment value resolved


def install_env_guard(allowed: set[str] | list[str] | tuple[str, ...] = ()) -> None:
    """Replace OmegaConf's ``oc.env`` resolver by one that reads only allowed names (process-wide)."""
    from omegaconf import OmegaConf
    from omegaconf._utils import _DEFAULT_MARKER_

    _ALLOWED_ENV.clear()
    _ALLOWED_ENV.update(allowed)

    def env(key: str, default: Any = _DEFAULT_MARKER_, *, _node_: Any = None) -> Any:
        node_key = str(_node_._get_full_key(None)) if _node_ is not None else ""
        if key not in _ALLOWED_ENV and not node_key.startswith("hydra."):
            raise RecipeError(f"'{node_key or '?'}' reads the environment variable {key} (${{oc.env:{key}}}); "
                              f"recipes may not copy the environment into tracked files unless you allow it",
                              where=node_key or "recipe",
                              fix=f"pass --allow-env {key} on the command line (its value is then redacted in "
                                  f"MLflow and the runs folder), or write the value into the recipe")
        if key in os.environ:
            value = os.environ[key]
            if value:
                _SECRETS[value] = key
            return value
        if default is _DEFAULT_MARKER_:
            raise RecipeError(f"the environment variable {key} is not set", where=node_key or "recipe",
                              fix=f"export {key}=... or give a default: ${{oc.env:{key},DEFAULT}}")
        return str(default) if default is not None else None

    OmegaConf.register_new_resolver("oc.env", env, replace=True)


def allowed_env() -> list[str]:
    return sorted(_ALLOWED_ENV)


def redact(obj: Any, secrets: dict[str, str] | None = None) -> Any:
    """A copy of ``obj`` with every environment value read by ``oc.env`` replaced by ``<env:NAME>``."""
    secrets = _SECRETS if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        if obj in secrets:
            return f"<env:{secrets[obj]}>"
        for value, name in sorted(secrets.items(), key=lambda kv: -len(kv[0])):
            if len(value) >= _MIN_REDACT_LEN and value in obj:
                obj = obj.replace(value, f"<env:{name}>")
        return obj
    return obj
