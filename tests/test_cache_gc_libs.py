"""`qflow cache gc` and fetched recipe libraries (issue 16): a git library fetched into ``<cache>/libs`` is
removed once none of the last ``--keep`` runs lists it and no run used it for ``--libs-days`` days; the
qualified-name folders and fetch temps follow; nothing qflow did not write is touched."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qflow.cli import main
from qflow.recipe.libraries import USED_STAMP, fetched_folders, git_folder
from tests.test_recipe_libraries import _compose, _git_repo, _recipe

DAY = 86400


def _age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def test_gc_removes_only_unused_fetched_libraries(tmp_path, capsys):
    repo, first, second = _git_repo(tmp_path)
    runs = tmp_path / "runs"
    cache = runs / "cache"
    specs = {"listed": f"git+file://{repo}@{first}#recipes", "old": f"git+file://{repo}@{second}#recipes",
             "recent": f"git+file://{repo}@{second[:10]}#recipes"}
    recipe = _recipe(tmp_path / "r", ["team/base"], extra="")
    for spec in specs.values():
        _compose(recipe, tmp_path / "runs", [spec])          # fetches into runs/cache/libs, one names/ folder each
    folders = {k: git_folder(s, cache) for k, s in specs.items()}
    assert all((f / USED_STAMP).is_file() for f in folders.values())
    names = sorted((cache / "libs" / "names").iterdir())
    assert len(names) == 3
    for key in ("listed", "old"):
        _age(folders[key] / USED_STAMP, 40)
    # the last run lists the library it used (what the engine writes into summary.json)
    assert fetched_folders([f"team={specs['listed']}"]) == [folders["listed"].name]
    run = runs / "runs" / "20261207-000000-r"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"keys": {}, "libraries": [folders["listed"].name]}))

    libs = cache / "libs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    foreign = {libs / "notes.txt": "a user's file", libs / "team-0123456789-abcdef1" / "x.yaml": "no stamp",
               libs / "names" / ("f" * 16) / "file.txt": "not a link"}
    for path, text in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        _age(path.parent, 400)
    (libs / "link-0123456789-abcdef1").symlink_to(outside, target_is_directory=True)
    stale, fresh = libs / ".fetch-stale", libs / ".fetch-fresh"
    for temp in (stale, fresh):
        (temp / "tree").mkdir(parents=True)
    _age(stale, 10)

    assert main(["--runs-dir", str(runs), "cache", "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 1 fetched recipe libraries" in out and folders["old"].name in out
    assert all(f.is_dir() for f in folders.values()) and stale.is_dir()

    assert main(["--runs-dir", str(runs), "cache", "gc"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 fetched recipe libraries" in out and "1 qualified-name folders, 1 fetch temps" in out
    assert not folders["old"].exists() and folders["listed"].is_dir() and folders["recent"].is_dir()
    assert not stale.exists() and fresh.is_dir()
    assert len(list((libs / "names").iterdir())) == 3   # the two in use, and the foreign folder
    assert all(path.read_text() == text for path, text in foreign.items())
    assert (outside / "keep.txt").read_text() == "mine" and (libs / "link-0123456789-abcdef1").is_symlink()
    assert not list(libs.glob(".fetch-gc-*"))
    # a pinned library that gc removed is fetched again on its next use
    assert _compose(recipe, tmp_path / "runs", [specs["old"]])["params"]["bits"] == 2
    assert (folders["old"] / USED_STAMP).is_file()
