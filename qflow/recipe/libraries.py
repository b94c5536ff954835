"""Recipe libraries: where a recipe's defaults entries are found, each under a name.

A *library* is a folder of YAML recipe pieces with a name. The sources:

* qflow's own library, shipped inside the package (``qflow/recipe_lib``), on
  every recipe's search path: qualified ``qflow/lib/eval/default`` and, for the
  repository's recipes, unqualified ``lib/eval/default``;
* ``--lib DIR`` or ``--lib NAME=DIR`` and ``QFLOW_RECIPE_PATH`` (a PATH-like
  list of the same specs): a folder, named after it unless ``NAME=`` says;
* installed Python packages declaring the entry-point group ``qflow.recipes``
  (``teamlib = "team_pkg.recipes"``: the entry point's name is the library's
  name, its value a package folder of YAML). They are on every search path;
  ``--lib pkg://NAME`` (an entry-point name or a package) adds one explicitly.
  The folder is located without importing the package (importing runs code);
* ``--lib git+URL@COMMIT[#SUBDIR]``: a git repository pinned to a commit,
  cloned once into ``<cache>/libs`` with hooks, LFS filters, symlinks and
  submodules off, and a time limit (``QFLOW_GIT_TIMEOUT`` seconds, default 120)
  so an unreachable URL is an error, not a hang. Each run that resolves it
  touches its ``.qflow-used`` stamp and lists it in its ``summary.json``;
  ``qflow cache gc`` removes fetched libraries that none of the last ``--keep``
  runs lists and that no run used for ``--libs-days`` days
  (:func:`collect_fetched`), and only folders of the shapes qflow writes.

Every library is reachable unqualified (``team/model``) and qualified by its
name (``teamlib/team/model``). A name that two libraries (or a library and the
recipe's own folder) both provide is an error naming both files unless
qualified: :func:`check_unambiguous`. A file a library provides must stay inside
the library's root once symlinks are resolved (:func:`check_contained`).

Example::

    libs = resolve_libraries(["--lib spec", ...], cache_dir)
    entries = search_entries(libs, cache_dir)     # Hydra search path
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError

QFLOW_LIB_ROOT = (Path(__file__).resolve().parents[1] / "recipe_lib").resolve()   # holds qflow/lib/...
QFLOW_LIB = QFLOW_LIB_ROOT / "qflow" / "lib"
ENTRY_POINT_GROUP = "qflow.recipes"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_SHA = re.compile(r"^[0-9a-fA-F]{7,40}$")
FETCHED_STAMP = ".qflow-commit"   # written inside a fetch's temp folder, before its rename into place
USED_STAMP = ".qflow-used"        # touched whenever a run resolves the library (its age: days unused)
_FETCHED = re.compile(r"^[A-Za-z0-9_.-]+-[0-9a-f]{10}-[0-9a-f]{7,40}$")   # <repo>-<url hash>-<commit>
_NAMES = re.compile(r"^[0-9a-f]{16}$")                                    # libs/names/<digest>


@dataclass(frozen=True)
class Library:
    """One library: its name (the qualifier), its root folder, where it came from and, for git, its commit."""

    name: str
    root: Path
    kind: str          # "qflow" | "folder" | "package" | "git"
    spec: str
    commit: str = ""   # git commit (git libraries)

    def fingerprint(self) -> str:
        """The git commit, or a content hash of the library's YAML files (what a lock records)."""
        if self.commit:
            return f"git:{self.commit}"
        return f"sha256:{content_hash(self.root)}"


def content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def builtin() -> Library:
    return Library("qflow", QFLOW_LIB_ROOT / "qflow", "qflow", "qflow")


# ---- sources -----------------------------------------------------------------------

def _split_name(spec: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (NAME, SPEC); a spec without a name -> ("", spec)."""
    head, sep, tail = spec.partition("=")
    if sep and _NAME.match(head) and "://" not in head:
        return head, tail
    return "", spec


def resolve_library(spec: str, cache_dir: Path) -> Library:
    """The :class:`Library` for one ``--lib`` / ``QFLOW_RECIPE_PATH`` spec."""
    name, spec = _split_name(spec)
    if spec.startswith("git+"):
        lib = _git_library(spec, cache_dir)
    elif spec.startswith("pkg://"):
        lib = _package_library(spec[len("pkg://"):], spec)
    else:
        raw = spec[len("file://"):] if spec.startswith("file://") else spec
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise RecipeError(f"recipe library folder {raw} does not exist", where=f"--lib {spec}",
                              fix="pass an existing folder, NAME=DIR, pkg://NAME or git+URL@COMMIT")
        lib = Library(path.resolve().name, path.resolve(), "folder", spec)
    if name:
        lib = Library(name, lib.root, lib.kind, lib.spec, lib.commit)
    if not _NAME.match(lib.name):
        raise RecipeError(f"library name {lib.name!r} is not a valid qualifier", where=f"--lib {spec}",
                          fix="name it explicitly: --lib NAME=SPEC (letters, digits, _ . -)")
    return lib


def entry_point_libraries() -> list[Library]:
    """Installed packages' ``qflow.recipes`` entry points (located, never imported)."""
    from importlib.metadata import entry_points

    libs = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        libs.append(Library(ep.name, _locate_package(ep.value, f"entry point {ep.name} = {ep.value!r} "
                                                                f"(group {ENTRY_POINT_GROUP})"), "package",
                            f"pkg://{ep.name}"))
    return libs


def _package_library(target: str, spec: str) -> Library:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == target:
            return Library(ep.name, _locate_package(ep.value, f"--lib {spec}"), "package", spec)
    return Library(target.replace("/", ".").split(".")[-1], _locate_package(target.replace("/", "."), f"--lib {spec}"),
                   "package", spec)


def _locate_package(dotted: str, where: str) -> Path:
    """The folder of package ``a.b.c`` found through the import system's finders, without running its code."""
    parts = dotted.strip().split(".")
    if ":" in dotted or not all(p.isidentifier() for p in parts):
        raise RecipeError(f"{dotted!r} is not a package path", where=where,
                          fix="name a package folder of YAML files, e.g. team_pkg.recipes")
    try:
        spec = importlib.util.find_spec(parts[0])   # a top-level lookup imports nothing
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"package {parts[0]} is not installed (or is a module, not a package)", where=where,
                          fix="install the library's package in this environment, or pass its folder: --lib DIR")
    for base in spec.submodule_search_locations:
        folder = Path(base).joinpath(*parts[1:])
        if folder.is_dir():
            return folder.resolve()
    raise RecipeError(f"package {dotted} has no folder {'/'.join(parts[1:])}", where=where,
                      fix="point the entry point at the package folder that holds the YAML files")


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1", "GIT_ASKPASS": "true",
                "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=15",
                "GIT_HTTP_LOW_SPEED_LIMIT": "1000", "GIT_HTTP_LOW_SPEED_TIME": "20"})
    return env


# hooks, LFS (and any filter named lfs), fsmonitor commands, symlinks and submodules are off for every call
GIT_SAFE = ["-c", "core.hooksPath=/dev/null", "-c", "filter.lfs.smudge=", "-c", "filter.lfs.clean=",
            "-c", "filter.lfs.process=", "-c", "filter.lfs.required=false", "-c", "core.fsmonitor=false",
            "-c", "core.symlinks=false", "-c", "submodule.recurse=false", "-c", "protocol.ext.allow=never",
            "-c", "advice.detachedHead=false"]


def parse_git_spec(spec: str) -> tuple[str, str, str]:
    """``git+URL@COMMIT#SUBDIR`` -> (url, commit, subdir)."""
    body = spec[len("git+"):]
    body, _, subdir = body.partition("#")
    url, ref = body, ""
    at = body.rfind("@")
    if at > body.find("://") + 3 and "/" not in body[at:]:   # an @REF suffix, not user@host
        url, ref = body[:at], body[at + 1:]
    if not _SHA.match(ref):
        raise RecipeError(f"a git recipe library must be pinned to a commit (got {'@' + ref if ref else 'no @REF'})",
                          where=f"--lib {spec}",
                          fix=f"append the commit: git+{url}@<sha> (find it with `git ls-remote {url}`)")
    sub = Path(subdir)
    if subdir and (sub.is_absolute() or ".." in sub.parts):
        raise RecipeError(f"#{subdir} must be a folder inside the repository", where=f"--lib {spec}",
                          fix="give a relative folder without '..', e.g. #recipes")
    return url, ref.lower(), subdir


def _repo_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git") or "git"


def git_folder(spec: str, cache_dir: Path) -> Path:
    """Where ``git+URL@COMMIT[#SUBDIR]`` is fetched: ``<cache>/libs/<repo>-<url hash>-<commit>``."""
    url, sha, _ = parse_git_spec(spec)
    return Path(cache_dir) / "libs" / (f"{re.sub(r'[^A-Za-z0-9_.-]', '_', _repo_name(url))}-"
                                       f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{sha}")


def fetched_folders(specs: list[str]) -> list[str]:
    """The ``<cache>/libs`` folder names of the git libraries among ``specs`` and ``QFLOW_RECIPE_PATH``
    (what a run's summary records, so that ``qflow cache gc`` keeps them)."""
    env = [s for s in os.environ.get("QFLOW_RECIPE_PATH", "").split(os.pathsep) if s]
    out = set()
    for spec in list(specs) + env:
        spec = _split_name(spec)[1]
        if spec.startswith("git+"):
            try:
                out.add(git_folder(spec, Path(".")).name)
            except RecipeError:
                continue
    return sorted(out)


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:   # a read-only cache: the library is simply never counted as used
        pass


def _git_library(spec: str, cache_dir: Path) -> Library:
    url, sha, subdir = parse_git_spec(spec)
    base = _repo_name(url)
    dest = git_folder(spec, cache_dir)
    stamp = dest / FETCHED_STAMP
    if not stamp.is_file():
        _git_fetch(url, sha, dest, spec)
    _touch(dest / USED_STAMP)
    commit = stamp.read_text().strip()
    root = (dest / "tree" / subdir).resolve() if subdir else (dest / "tree").resolve()
    if not root.is_dir() or not _inside(root, (dest / "tree").resolve()):
        raise RecipeError(f"the repository has no folder {subdir!r} at commit {commit[:12]}", where=f"--lib {spec}",
                          fix="check the #SUBDIR part")
    return Library(re.sub(r"[^A-Za-z0-9_.-]", "_", base), root, "git", spec, commit)


def _git_fetch(url: str, sha: str, dest: Path, spec: str) -> None:
    timeout = float(os.environ.get("QFLOW_GIT_TIMEOUT", "120"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    env = _git_env()

    def git(*args: str, cwd: Path | None = None) -> str:
        try:
            done = subprocess.run(["git", *GIT_SAFE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RecipeError(f"git did not answer within {timeout:g} s fetching {url} (unreachable or offline?)",
                              where=f"--lib {spec}",
                              fix="check the network or the URL, clone it yourself and pass --lib DIR, or raise "
                                  "QFLOW_GIT_TIMEOUT") from None
        except FileNotFoundError:
            raise RecipeError("git is not installed", where=f"--lib {spec}", fix="install git, or pass --lib DIR") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RecipeError(f"git {args[0]} failed for {url}: {last}", where=f"--lib {spec}",
                              fix="check the URL and the commit (it must exist in the repository)")
        return done.stdout.strip()

    try:
        git("clone", "--no-checkout", "--no-recurse-submodules", "--template=", url, str(tmp / "tree"))
        git("checkout", "--detach", sha, cwd=tmp / "tree")
        commit = git("rev-parse", "HEAD", cwd=tmp / "tree")
        if not commit.startswith(sha):
            raise RecipeError(f"{sha} resolved to commit {commit}, not a commit with that prefix",
                              where=f"--lib {spec}", fix="pin the library to a commit id, not a branch or tag name")
        (tmp / FETCHED_STAMP).write_text(commit + "\n")
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / FETCHED_STAMP).is_file():   # not a concurrent fetch of the same commit
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- search path ---------------------------------------------------------------------

def resolve_libraries(specs: list[str], cache_dir: Path) -> list[Library]:
    """The libraries of ``--lib`` specs, then ``QFLOW_RECIPE_PATH``, then installed entry points, then qflow's."""
    env = [s for s in os.environ.get("QFLOW_RECIPE_PATH", "").split(os.pathsep) if s]
    libs = [resolve_library(s, cache_dir) for s in list(specs) + env]
    libs += entry_point_libraries()
    libs.append(builtin())
    seen: dict[Path, Library] = {}
    names: dict[str, Library] = {}
    for lib in libs:
        if lib.root in seen:
            continue
        other = names.get(lib.name)
        if other is not None:
            raise RecipeError(f"two recipe libraries are both named '{lib.name}': {other.root} ({other.spec}) and "
                              f"{lib.root} ({lib.spec})", where=f"--lib {lib.spec}",
                              fix="name one of them explicitly: --lib OTHERNAME=SPEC")
        seen[lib.root] = lib
        names[lib.name] = lib
    return list(seen.values())


def qualified_root(libs: list[Library], cache_dir: Path) -> Path | None:
    """A folder of links ``NAME -> library root`` so that ``NAME/piece`` finds the library's ``piece``.

    qflow's own library needs none (``recipe_lib`` holds ``qflow/lib``)."""
    mine = [lib for lib in libs if lib.kind != "qflow"]
    if not mine:
        return None
    digest = hashlib.sha256("\n".join(f"{lib.name}={lib.root}" for lib in mine).encode()).hexdigest()[:16]
    folder = Path(cache_dir).resolve() / "libs" / "names" / digest
    if folder.is_dir():
        _touch(folder)   # its age is the time since the last run used it (qflow cache gc)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".names-", dir=folder.parent))
        for lib in mine:
            (tmp / lib.name).symlink_to(lib.root, target_is_directory=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def search_entries(libs: list[Library], cache_dir: Path) -> list[str]:
    """Hydra search-path entries: each library's root, the qualified-name folder, and qflow's qualified root."""
    entries = [f"file://{lib.root}" for lib in libs]
    named = qualified_root(libs, cache_dir)
    if named is not None:
        entries.append(f"file://{named}")
    entries.append(f"file://{QFLOW_LIB_ROOT}")
    return entries


def roots_for(libs: list[Library], cache_dir: Path, recipe_dir: Path) -> list[tuple[str, Path, Path]]:
    """(label, search root, containment root) of every place a name can come from, the recipe's folder first."""
    out = [("the recipe's folder", recipe_dir.resolve(), recipe_dir.resolve())]
    for lib in libs:
        out.append((f"library '{lib.name}'", lib.root, lib.root))
    named = qualified_root(libs, cache_dir)
    for lib in libs:
        if lib.kind == "qflow":
            out.append(("library 'qflow'", QFLOW_LIB_ROOT, lib.root))
        elif named is not None:
            out.append((f"library '{lib.name}'", named, lib.root))
    return out


def providers(config_path: str, roots: list[tuple[str, Path, Path]]) -> list[tuple[str, Path, Path]]:
    """Every (label, file, containment root) that provides ``config_path`` (one per distinct file)."""
    found: dict[str, tuple[str, Path, Path]] = {}
    for label, root, contain in roots:
        for ext in (".yaml", ".yml"):
            candidate = root / f"{config_path}{ext}"
            if candidate.is_file() or candidate.is_symlink():
                key = os.path.realpath(candidate)
                found.setdefault(key, (label, candidate, contain))
                break
    return list(found.values())


def check_config_path(config_path: str, where: str) -> None:
    parts = config_path.replace("\\", "/").split("/")
    if ".." in parts or config_path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", config_path):
        raise RecipeError(f"the defaults entry '{config_path}' leaves the library it is in ('..' or an absolute path)",
                          where=where, fix="name pieces relative to a library root, e.g. lib/model/smollm2")


def check_unambiguous(config_path: str, roots: list[tuple[str, Path, Path]], where: str) -> None:
    found = providers(config_path, roots)
    if len(found) > 1:
        files = " and ".join(f"{f} ({label})" for label, f, _ in found)
        raise RecipeError(f"'{config_path}' is ambiguous: {files} both provide it", where=where,
                          fix=f"qualify it with the library's name, e.g. {_qualified_hint(config_path, found)}, "
                              f"or remove one of the files")


def _qualified_hint(config_path: str, found) -> str:
    for label, _, _ in found:
        if label.startswith("library '"):
            return f"{label.split(chr(39))[1]}/{config_path}"
    return f"NAME/{config_path}"


def check_contained(file: Path, contain: Path, where: str) -> None:
    """A library's file must resolve (symlinks followed) inside the library's root."""
    if not _inside(file, contain):
        raise RecipeError(f"{file} resolves to {Path(file).resolve()}, outside its library {contain} (a symlink "
                          f"or '..' escaping the library)", where=where,
                          fix="keep every file of a library inside its folder; copy the file instead of linking it")


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def header_comment(path: Path) -> str:
    """A recipe's one-line description: the first comment line that is not a ``@package`` header."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                s = line.strip()
                if not s:
                    continue
                if not s.startswith("#"):
                    break
                text = s.lstrip("#").strip()
                if text and not text.startswith("@package"):
                    return text
    except (OSError, UnicodeDecodeError):
        return ""
    return ""


def list_recipes(libs: list[Library], local: Path | None = None) -> list[dict[str, str]]:
    """Every recipe piece of every library (and of ``local``): name, qualified name, library, file, description."""
    rows = []
    sources = ([("local", local)] if local is not None else []) + [(lib.name, lib.root) for lib in libs]
    for lib_name, root in sources:
        for path in sorted(Path(root).rglob("*.y*ml")):
            if path.suffix not in (".yaml", ".yml") or any(p.startswith(".") for p in path.relative_to(root).parts):
                continue
            name = str(path.relative_to(root).with_suffix(""))
            rows.append({"name": name, "qualified": name if lib_name == "local" else f"{lib_name}/{name}",
                         "library": lib_name, "file": str(path), "description": header_comment(path)})
    return rows


# ---- cache gc ------------------------------------------------------------------------

def _days_since(path: Path, now: float) -> float:
    try:
        return (now - path.stat().st_mtime) / 86400
    except OSError:
        return float("inf")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def collect_fetched(cache_dir: Path, keep: set[str], unused_days: float, stale_days: float,
                    dry_run: bool = False) -> dict[str, list[tuple[str, int]]]:
    """Remove (or with ``dry_run`` list) what ``<cache>/libs`` holds that no run needs any more.

    * a fetched git library (``<repo>-<url hash>-<commit>/`` holding ``.qflow-commit``) whose name is not
      in ``keep`` (the libraries the last runs list in their summaries) and that no run resolved for
      ``unused_days`` days (its ``.qflow-used`` stamp; ``.qflow-commit`` for a library never used since);
      a run that needs it again fetches it again (the commit is pinned);
    * a qualified-name folder (``names/<digest>/`` of links only) unused for ``unused_days`` days or
      whose link targets are gone (re-created on the next use);
    * temp folders of fetches or name folders (``.fetch-*``, ``names/.names-*``) ``stale_days`` old.

    Anything else (other names, files, links, a folder holding something qflow does not write) is
    never touched. Returns ``{"libraries" | "names" | "temps": [(name, bytes)]}``.
    """
    out: dict[str, list[tuple[str, int]]] = {"libraries": [], "names": [], "temps": []}
    libs = Path(cache_dir) / "libs"
    if libs.is_symlink() or not libs.is_dir():
        return out
    now = time.time()

    def drop(kind: str, folder: Path) -> None:
        size = _size(folder)
        out[kind].append((folder.name, size))
        if dry_run:
            return
        if kind == "libraries":   # out of the way first: a killed gc leaves a temp the next gc removes
            moved = folder.with_name(f".fetch-gc-{folder.name}")
            os.replace(folder, moved)
            folder = moved
        shutil.rmtree(folder, ignore_errors=True)

    for child in sorted(libs.iterdir()):
        if child.is_symlink() or not child.is_dir():
            continue
        if child.name.startswith(".fetch-"):
            if _days_since(child, now) >= stale_days:
                drop("temps", child)
        elif _FETCHED.match(child.name) and (child / FETCHED_STAMP).is_file() and child.name not in keep:
            used = child / USED_STAMP
            if _days_since(used if used.exists() else child / FETCHED_STAMP, now) >= unused_days:
                drop("libraries", child)
    names = libs / "names"
    if names.is_dir() and not names.is_symlink():
        for child in sorted(names.iterdir()):
            if child.is_symlink() or not child.is_dir():
                continue
            links = list(child.iterdir())
            if not all(link.is_symlink() for link in links):
                continue   # not a folder of links qflow wrote
            if child.name.startswith(".names-"):
                if _days_since(child, now) >= stale_days:
                    drop("temps", child)
            elif _NAMES.match(child.name):
                if any(not link.exists() for link in links) or _days_since(child, now) >= unused_days:
                    drop("names", child)
    return out
