"""Export target paths (qflow/export/atomic.py): qflow writes only into an absent path, an empty folder or a
previous qflow export; anything else is refused before any work unless `overwrite: true`, and even then no file
qflow did not write is ever deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qflow.errors import QflowError
from qflow.export.atomic import (MARKER, SIDECAR_SUFFIX, ExportPathError, ensure_placed, place, placed_matches,
                                 read_marker, target_problem)

from .conftest import run_cli, tiny_recipe, write_recipe


def export_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".qflow-"))


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# ---------------------------------------------------------------- folders


def test_foreign_folder_is_refused_and_left_intact(tmp_path):
    src = export_folder(tmp_path / "src", {"config.json": b"{}", "model.safetensors": b"w"})
    target = export_folder(tmp_path / "mine", {"notes.txt": b"my notes", "sub/data.csv": b"1,2"})
    problem = target_problem(target, is_dir=True)
    assert str(target) in problem and "notes.txt" in problem and "overwrite: true" in problem
    with pytest.raises(ExportPathError, match="qflow did not write") as err:
        place(src, target, where="stages.export.with.path")
    assert isinstance(err.value, QflowError) and str(err.value).startswith("stages.export.with.path: ")
    assert (target / "notes.txt").read_bytes() == b"my notes" and (target / "sub/data.csv").read_bytes() == b"1,2"
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "sub"] and siblings(target) == []


def test_overwrite_replaces_only_qflow_files(tmp_path):
    target = export_folder(tmp_path / "mine", {"notes.txt": b"my notes", "config.json": b"user's"})
    first = export_folder(tmp_path / "a", {"config.json": b"{1}", "model.safetensors": b"aa", "extra.json": b"x"})
    assert target_problem(target, is_dir=True, overwrite=True) is None
    place(first, target, overwrite=True, record={"stage_key": "k1", "format": "safetensors"})
    assert (target / "notes.txt").read_bytes() == b"my notes"              # foreign: kept
    assert (target / "config.json").read_bytes() == b"{1}"                 # a name qflow writes: replaced
    record = read_marker(target / MARKER)
    assert record["stage_key"] == "k1" and record["format"] == "safetensors"
    assert record["files"] == {"config.json": {"bytes": 3}, "extra.json": {"bytes": 1}, "model.safetensors": {"bytes": 2}}
    # the next export drops extra.json (qflow wrote it) and still keeps notes.txt
    second = export_folder(tmp_path / "b", {"config.json": b"{2}", "model.safetensors": b"bb"})
    assert "notes.txt" in target_problem(target, is_dir=True)               # still foreign: refused without overwrite
    place(second, target, overwrite=True, record={"stage_key": "k2"})
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "config.json", "model.safetensors", "notes.txt"]
    assert (target / "notes.txt").read_bytes() == b"my notes" and (target / "config.json").read_bytes() == b"{2}"
    assert set(read_marker(target / MARKER)["files"]) == {"config.json", "model.safetensors"}
    assert siblings(target) == []


def test_previous_qflow_export_and_empty_folder_are_replaced(tmp_path):
    target = tmp_path / "out" / "llama"
    (tmp_path / "out").mkdir()
    target.mkdir()                                                          # empty: fine
    place(export_folder(tmp_path / "a", {"config.json": b"{1}", "old-only.bin": b"o"}), target, record={"stage_key": "k1"})
    assert target_problem(target, is_dir=True) is None                      # a qflow export: fine
    place(export_folder(tmp_path / "b", {"config.json": b"{2}", "sub/w.bin": b"w"}), target, record={"stage_key": "k2"})
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == \
        sorted([MARKER, "config.json", "sub", "sub/w.bin"])
    assert read_marker(target / MARKER)["stage_key"] == "k2" and siblings(target) == []
    # a file the user drops into a qflow export makes it foreign again
    (target / "README.md").write_text("mine")
    assert "README.md" in target_problem(target, is_dir=True)


def test_kind_mismatch_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    assert "is a file and this export is a folder" in target_problem(tmp_path / "a-file", is_dir=True, overwrite=True)
    assert "is a folder and this export is a file" in target_problem(tmp_path / "a-folder", is_dir=False,
                                                                     overwrite=True)
    assert "which is a file" in target_problem(tmp_path / "a-file" / "x", is_dir=True)


def test_only_dead_qflow_siblings_are_cleaned(tmp_path):
    target = tmp_path / "llama"
    dead = dead_pid()

    def sibling(name: str, files: dict[str, bytes], listed: list[str] | None) -> Path:
        folder = export_folder(tmp_path / name, files)
        if listed is not None:
            (folder / MARKER).write_text(json.dumps({"qflow_export": 1, "files": {f: {} for f in listed}}))
        return folder

    crashed = sibling(f".qflow-tmp-llama-{dead}-0123abcd", {"config.json": b"{}"}, ["config.json", "w.bin"])
    mixed = sibling(f".qflow-old-llama-{dead}-4567abcd", {"config.json": b"{}", "user.txt": b"u"}, ["config.json"])
    unmarked = sibling(f".qflow-tmp-llama-{dead}-89abcdef", {"keep.bin": b"k"}, None)
    running = sibling(f".qflow-tmp-llama-{os.getppid()}-0000abcd", {"config.json": b"{}"}, ["config.json"])
    place(export_folder(tmp_path / "src", {"config.json": b"{}"}), target)
    assert not crashed.exists()                                             # qflow's, its writer is gone
    assert sorted(p.name for p in mixed.iterdir()) == ["user.txt"]          # only the listed file went
    assert (unmarked / "keep.bin").read_bytes() == b"k"                     # no marker: not provably qflow's
    assert (running / "config.json").is_file()                              # its writer still runs


def test_ensure_placed_restores_what_a_cache_hit_owes(tmp_path):
    """A cached export stage re-places its export when the copy at ``path`` is gone, half-placed or changed,
    cleans a dead run's temp sibling, and otherwise touches nothing."""
    src = export_folder(tmp_path / "cache-entry", {"config.json": b"{}", "model.safetensors": b"weights"})
    target = tmp_path / "models" / "llama"
    key = "k" * 64
    assert ensure_placed(src, target, stage_key=key)[1] is True                  # absent: placed
    marker = read_marker(target / MARKER)
    assert marker["stage_key"] == key and placed_matches(src, target, key)
    assert not placed_matches(src, target, "other" * 12)                        # another stage's export
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    (target / "my-notes.txt").write_bytes(b"notes")                             # the user's file beside it
    assert ensure_placed(src, target, stage_key=key)[1] is False                # in place: untouched
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    # a run killed while placing: a temp sibling of a dead pid, the export itself intact
    crashed = export_folder(tmp_path / "models" / f".qflow-tmp-llama-{dead_pid()}-0123abcd", {"config.json": b"{}"})
    (crashed / MARKER).write_text(json.dumps({"qflow_export": 1, "files": {"config.json": {}}, "partial": True}))
    assert ensure_placed(src, target, stage_key=key)[1] is False and not crashed.exists()
    # a listed file changed or removed: placed again, the user's file kept (overwrite: only qflow's files)
    (target / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ExportPathError):                                        # a foreign file: refused as place is
        ensure_placed(src, target, stage_key=key)
    assert ensure_placed(src, target, stage_key=key, overwrite=True)[1] is True
    assert (target / "model.safetensors").read_bytes() == b"weights" and (target / "my-notes.txt").is_file()
    (target / "my-notes.txt").unlink()
    import shutil

    shutil.rmtree(target)                                                       # the user removed it
    assert ensure_placed(src, target, stage_key=key)[1] is True and placed_matches(src, target, key)
    assert siblings(target) == []


def test_ensure_placed_single_file(tmp_path):
    src = tmp_path / "entry" / "model.gguf"
    src.parent.mkdir()
    src.write_bytes(b"GGUF-1")
    target = tmp_path / "out" / "model.gguf"
    assert ensure_placed(src, target, stage_key="a" * 64)[1] is True
    assert ensure_placed(src, target, stage_key="a" * 64)[1] is False
    target.unlink()
    assert ensure_placed(src, target, stage_key="a" * 64)[1] is True and target.read_bytes() == b"GGUF-1"


# ---------------------------------------------------------------- single files (GGUF)


def test_single_file_target(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF-new")
    target = tmp_path / "out" / "model-q4.gguf"
    target.parent.mkdir()
    target.write_bytes(b"someone else's model")
    assert "qflow did not write" in target_problem(target, is_dir=False)
    with pytest.raises(ExportPathError):
        place(src, target)
    assert target.read_bytes() == b"someone else's model"
    place(src, target, overwrite=True, record={"format": "gguf"})              # the user named this file
    assert target.read_bytes() == b"GGUF-new"
    sidecar = read_marker(target.with_name(target.name + SIDECAR_SUFFIX))
    assert sidecar["files"]["model-q4.gguf"]["bytes"] == 8 and len(sidecar["files"]["model-q4.gguf"]["sha256"]) == 64
    src.write_bytes(b"GGUF-newer")
    assert target_problem(target, is_dir=False) is None                     # qflow's own file: replaced freely
    place(src, target)
    assert target.read_bytes() == b"GGUF-newer" and siblings(target) == []
    target.write_bytes(b"GGUF-edited")                                       # changed since: no longer provably ours
    assert "content differs" in target_problem(target, is_dir=False)


# ---------------------------------------------------------------- through the CLI, as a user meets it


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory, mlflow_template) -> Path:
    """One runs folder for this module's CLI tests: the second finds model/calibrate/quantize cached."""
    import shutil

    path = tmp_path_factory.mktemp("export-safety-runs")
    shutil.copy(mlflow_template, path / "mlflow.db")
    return path


def export_recipe(model_dir: Path, path: Path, with_extra: str = "") -> str:
    return tiny_recipe(model_dir, n_windows=1, seq_len=32, extra=f"""
  export:
    uses: export.safetensors
    needs: [quantize]
    with: {{path: "{path}", verify_windows: 0{with_extra}}}
""")


def test_cli_refuses_a_foreign_folder_before_any_work_then_overwrite_keeps_it(tmp_path, tiny_model_dir, shared_runs):
    runs_dir = shared_runs
    before = set((runs_dir / "runs").iterdir()) if (runs_dir / "runs").exists() else set()
    target = export_folder(tmp_path / "models", {"my-notes.txt": b"three weeks of notes"})
    recipe = write_recipe(tmp_path, export_recipe(tiny_model_dir, target))
    done = run_cli("run", str(recipe), runs_dir=runs_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"path {target} is a folder qflow did not write" in done.stderr and "overwrite: true" in done.stderr
    after = set((runs_dir / "runs").iterdir()) if (runs_dir / "runs").exists() else set()
    assert after == before                                                  # refused in preflight: no run, no stage
    assert (target / "my-notes.txt").read_bytes() == b"three weeks of notes"

    recipe = write_recipe(tmp_path, export_recipe(tiny_model_dir, target, ", overwrite: true"))
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (target / "my-notes.txt").read_bytes() == b"three weeks of notes"
    assert (target / "config.json").is_file() and (target / MARKER).is_file()
    assert "my-notes.txt" not in read_marker(target / MARKER)["files"]


def test_cli_re_export_replaces_a_previous_qflow_export(tmp_path, tiny_model_dir, shared_runs):
    runs_dir = shared_runs
    target = tmp_path / "out" / "tiny-ct"
    recipe = write_recipe(tmp_path, export_recipe(tiny_model_dir, target))
    run_cli("run", str(recipe), runs_dir=runs_dir, check=True)
    first = read_marker(target / MARKER)
    assert first["format"] == "safetensors" and len(first["stage_key"]) == 64
    assert set(first["files"]) == {p.name for p in target.iterdir()} - {MARKER}
    recipe = write_recipe(tmp_path, export_recipe(tiny_model_dir, target, ", layout: gptq"))
    done = run_cli("run", str(recipe), "--json", runs_dir=runs_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    second = read_marker(target / MARKER)
    assert second["stage_key"] != first["stage_key"]
    assert json.loads((target / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert set(second["files"]) == {p.name for p in target.iterdir()} - {MARKER}
    assert siblings(target) == []


def test_cli_cached_run_places_a_removed_export_again(tmp_path, tiny_model_dir, shared_runs):
    """A re-run that finds the export stage cached still leaves the export at its path."""
    import shutil

    target = tmp_path / "out" / "tiny-again"
    recipe = write_recipe(tmp_path, export_recipe(tiny_model_dir, target, ", layout: awq-gemm"))
    run_cli("run", str(recipe), runs_dir=shared_runs, check=True)
    files = {p.name: p.read_bytes() for p in target.iterdir() if p.name != MARKER}
    shutil.rmtree(target)
    done = run_cli("run", str(recipe), "--json", runs_dir=shared_runs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["stages"]["export"]["status"] == "cached"
    assert "export placed again at" in done.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.name != MARKER} == files
    done = run_cli("run", str(recipe), runs_dir=shared_runs, check=True)
    assert "export placed again" not in done.stderr                          # in place: nothing to do
