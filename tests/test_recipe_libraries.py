"""Recipe libraries (issue 16): qflow's own pieces from anywhere, folder / installed-package / pinned-git
libraries, qualified names and the ambiguity error, and the rules that keep a library inside its root."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from qflow.errors import RecipeError
from qflow.recipe.compose import compose_recipe, to_plain
from tests.conftest import write_recipe

TAIL = "name: r\nstages:\n  q: {uses: quantize.rtn, with: {bits: \"${params.bits}\"}}\n"


def _recipe(folder: Path, defaults: list[str], extra: str = "params: {bits: 4}\n") -> Path:
    text = "defaults:\n" + "".join(f"  - {d}\n" for d in defaults) + "  - _self_\n" + extra + TAIL
    return write_recipe(folder, text)


def _piece(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _compose(recipe: Path, tmp_path: Path, libs=(), overrides=()):
    return to_plain(compose_recipe(recipe, list(overrides), libraries=list(libs), cache_dir=tmp_path / "cache"))


def test_qflow_library_is_reachable_from_a_recipe_anywhere(tmp_path):
    recipe = _recipe(tmp_path / "elsewhere", ["qflow/lib/eval/default", "qflow/lib/model/smollm2", "lib/data/default"])
    cfg = _compose(recipe, tmp_path)
    assert cfg["eval"]["batch_size"] == 4 and cfg["model"]["source"] == "zoo:smollm2-135m"
    assert cfg["data"]["calib"]["source"] == "zoo:wiki-pages"


def test_folder_library_by_flag_and_by_recipe_path(tmp_path, monkeypatch):
    lib = tmp_path / "teamlib"
    _piece(lib, "team/base", "# @package _global_\nparams: {bits: 3, group_size: 32}\n")
    recipe = _recipe(tmp_path / "r", ["team/base"], extra="")
    assert _compose(recipe, tmp_path, [str(lib)])["params"] == {"bits": 3, "group_size": 32}
    assert _compose(recipe, tmp_path, [f"mine={lib}"])["params"]["bits"] == 3
    monkeypatch.setenv("QFLOW_RECIPE_PATH", os.pathsep.join([str(tmp_path / "missing-is-an-error"), str(lib)]))
    with pytest.raises(RecipeError, match="missing-is-an-error"):
        _compose(recipe, tmp_path)
    monkeypatch.setenv("QFLOW_RECIPE_PATH", str(lib))
    qualified = _recipe(tmp_path / "q", ["teamlib/team/base"], extra="")
    assert _compose(qualified, tmp_path)["params"]["group_size"] == 32


def _installed_package(site: Path, marker: Path) -> None:
    """A package ``teampkg`` with a recipes folder, and its dist-info declaring the ``qflow.recipes`` entry point."""
    pkg = site / "teampkg"
    (pkg / "recipes").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    _piece(pkg / "recipes", "team/awq4", "# @package _global_\n# AWQ at 4 bits, the team's default\n"
                                         "params: {bits: 4, group_size: 64}\n")
    _piece(pkg / "recipes", "team/awq3", "# @package _global_\ndefaults: [/team/awq4]\nparams: {bits: 3}\n")
    info = site / "teampkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: teampkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qflow.recipes]\nteamlib = teampkg.recipes\n")


def test_installed_package_library_is_found_without_importing_it(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    _installed_package(tmp_path / "site", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    recipe = _recipe(tmp_path / "r", ["teamlib/team/awq3"], extra="")
    assert _compose(recipe, tmp_path)["params"] == {"bits": 3, "group_size": 64}
    unqualified = _recipe(tmp_path / "u", ["team/awq4"], extra="")
    assert _compose(unqualified, tmp_path, ["pkg://teamlib"])["params"]["bits"] == 4
    assert not marker.exists(), "locating a recipe library imported (ran) the package"


def _git(repo: Path, *args: str, env=None) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                          capture_output=True, text=True, env=env).stdout.strip()


def _git_repo(tmp_path: Path) -> tuple[Path, str, str]:
    repo = tmp_path / "team-recipes"
    repo.mkdir()
    _git(repo, "init", "-q")
    _piece(repo / "recipes", "team/base", "# @package _global_\nparams: {bits: 3}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "v1")
    first = _git(repo, "rev-parse", "HEAD")
    _piece(repo / "recipes", "team/base", "# @package _global_\nparams: {bits: 2}\n")
    _git(repo, "commit", "-qam", "v2")
    return repo, first, _git(repo, "rev-parse", "HEAD")


def test_git_library_pinned_to_a_commit(tmp_path):
    repo, first, second = _git_repo(tmp_path)
    recipe = _recipe(tmp_path / "r", ["team/base"], extra="")
    assert _compose(recipe, tmp_path, [f"git+file://{repo}@{first}#recipes"])["params"]["bits"] == 3
    assert _compose(recipe, tmp_path, [f"git+file://{repo}@{second[:10]}#recipes"])["params"]["bits"] == 2
    # fetched once: the cached copy serves the commit after the repository is gone
    (repo / ".git").rename(tmp_path / "moved")
    assert _compose(recipe, tmp_path, [f"git+file://{repo}@{first}#recipes"])["params"]["bits"] == 3
    with pytest.raises(RecipeError, match="pinned to a commit"):
        _compose(recipe, tmp_path, [f"git+file://{repo}@main#recipes"])


def test_git_fetch_runs_no_hooks_and_no_lfs_filter(tmp_path):
    repo, first, _ = _git_repo(tmp_path)
    (repo / ".gitattributes").write_text("*.yaml filter=lfs diff=lfs merge=lfs\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "lfs attributes")
    pinned = _git(repo, "rev-parse", "HEAD")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hook_marker, lfs_marker = tmp_path / "hook-ran", tmp_path / "lfs-ran"
    for name in ("post-checkout", "post-merge", "reference-transaction"):
        (hooks / name).write_text(f"#!/bin/sh\ntouch {hook_marker}\n")
        (hooks / name).chmod(0o755)
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text(f"[core]\n\thooksPath = {hooks}\n[filter \"lfs\"]\n\tsmudge = sh -c 'touch {lfs_marker}; cat'\n"
                         f"\tprocess = sh -c 'touch {lfs_marker}'\n\trequired = true\n")
    old = os.environ.get("GIT_CONFIG_GLOBAL")
    os.environ["GIT_CONFIG_GLOBAL"] = str(gitconfig)
    try:
        recipe = _recipe(tmp_path / "r", ["team/base"], extra="")
        assert _compose(recipe, tmp_path, [f"git+file://{repo}@{pinned}#recipes"])["params"]["bits"] == 2
    finally:
        os.environ.pop("GIT_CONFIG_GLOBAL") if old is None else os.environ.__setitem__("GIT_CONFIG_GLOBAL", old)
    assert not hook_marker.exists(), "a git hook ran while fetching a recipe library"
    assert not lfs_marker.exists(), "an LFS filter ran while fetching a recipe library"


def test_unreachable_git_library_is_an_error_not_a_hang(tmp_path, monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)            # accepts the connection, never answers
    monkeypatch.setenv("QFLOW_GIT_TIMEOUT", "3")
    recipe = _recipe(tmp_path / "r", ["team/base"], extra="")
    try:
        with pytest.raises(RecipeError, match="did not answer within 3 s"):
            _compose(recipe, tmp_path, [f"git+http://127.0.0.1:{silent.getsockname()[1]}/x.git@{'a' * 40}"])
    finally:
        silent.close()
    assert not list((tmp_path / "cache" / "libs").glob("x-*")), "a failed fetch left a half-written library"


def test_same_name_in_two_libraries_is_an_error_unless_qualified(tmp_path):
    a = _piece(tmp_path / "liba", "team/base", "# @package _global_\nparams: {bits: 3}\n")
    b = _piece(tmp_path / "libb", "team/base", "# @package _global_\nparams: {bits: 2}\n")
    libs = [str(tmp_path / "liba"), str(tmp_path / "libb")]
    recipe = _recipe(tmp_path / "r", ["team/base"], extra="")
    with pytest.raises(RecipeError) as err:
        _compose(recipe, tmp_path, libs)
    assert str(a) in str(err.value) and str(b) in str(err.value) and "libb/team/base" in str(err.value) \
        or "liba/team/base" in str(err.value)
    qualified = _recipe(tmp_path / "q", ["libb/team/base"], extra="")
    assert _compose(qualified, tmp_path, libs)["params"]["bits"] == 2
    # qflow's own pieces count too: a copied lib/eval/default next to the recipe must be qualified
    _piece(tmp_path / "c", "lib/eval/default", "# @package _global_\neval: {batch_size: 1}\n")
    copied = _recipe(tmp_path / "c", ["lib/eval/default"])
    with pytest.raises(RecipeError, match="ambiguous"):
        _compose(copied, tmp_path)
    assert _compose(_recipe(tmp_path / "c", ["qflow/lib/eval/default"]), tmp_path)["eval"]["batch_size"] == 4


def test_library_file_cannot_escape_its_root(tmp_path):
    outside = _piece(tmp_path / "outside", "secret", "# @package _global_\nparams: {bits: 1}\n")
    lib = tmp_path / "teamlib"
    (lib / "team").mkdir(parents=True)
    (lib / "team" / "linked.yaml").symlink_to(outside)
    recipe = _recipe(tmp_path / "r", ["team/linked"], extra="")
    with pytest.raises(RecipeError, match="outside its library"):
        _compose(recipe, tmp_path, [str(lib)])
    (lib / "team" / "dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(RecipeError, match="outside its library"):
        _compose(_recipe(tmp_path / "r2", ["team/dir/secret"], extra=""), tmp_path, [str(lib)])
    for bad in ("team/../../outside/secret", "../outside/secret"):
        with pytest.raises(RecipeError, match=r"leaves the library|'\.\.'"):
            _compose(_recipe(tmp_path / "r3", [bad], extra=""), tmp_path, [str(lib)])
    with pytest.raises(RecipeError, match="inside the repository"):
        _compose(recipe, tmp_path, [f"git+file://{tmp_path}@{'a' * 40}#../outside"])
