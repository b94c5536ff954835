"""Cache integrity: verified hits, quarantine, fsync, trash-first removal, temp ownership, locked gc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qflow.artifacts import EvalReport
from qflow.engine.cache import CacheStore, file_sha256
from qflow.engine.plan import build_plan
from qflow.engine.runner import RunOptions, execute, run_recipe
from qflow.recipe.validate import validate_shape
from qflow.registry import Stage, StageConfig, register

from .conftest import REPO, run_cli, tiny_recipe, write_recipe


class _Cfg(StageConfig):
    value: int = 1


@register("integrity.source")
class _Source(Stage):
    """A toy stage writing its value to a file."""

    version = 1
    Config = _Cfg
    outputs = {"report": EvalReport}

    def run(self, ctx, cfg):
        out = ctx.output("report")
        (out / "value.txt").write_text(str(cfg.value))
        ctx.log_metric("value", cfg.value)
        return {"report": EvalReport(out)}


def toy_plan(value: int = 1):
    data = {"name": "toy", "stages": {"a": {"uses": "integrity.source", "with": {"value": value}}}}
    return build_plan(validate_shape(data, "toy.yaml"), data, "toy.yaml")


def toy_run(runs_root: Path, value: int = 1):
    return execute(toy_plan(value), RunOptions(runs_root=runs_root, track=False, quiet=True))


def _opts(runs_root: Path, **kw) -> RunOptions:
    return RunOptions(runs_root=runs_root, track=False, quiet=True, **kw)


def _hold_lock_process(lock_path: Path) -> subprocess.Popen:
    """Another process holding a key's lock until killed."""
    code = (f"from filelock import FileLock; l = FileLock({str(lock_path)!r}); l.acquire(); "
            f"print('LOCKED', flush=True); import time; time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "LOCKED"
    return proc


# ---- damaged entries on the tiny recipe ------------------------------------------------

@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir):
    """One full run of the tiny recipe: its runs folder and result (copied per test)."""
    folder = tmp_path_factory.mktemp("integrity-baseline")
    recipe = write_recipe(folder / "recipes", tiny_recipe(tiny_model_dir))
    result = run_recipe(str(recipe), [], _opts(folder / "runs"))
    assert result.status == "ok"
    return recipe, folder / "runs", result


@pytest.fixture()
def copied(baseline, tmp_path):
    recipe, runs, result = baseline
    shutil.copytree(runs / "cache", tmp_path / "runs" / "cache", ignore=shutil.ignore_patterns("locks"))
    return recipe, tmp_path / "runs", result


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _numbers(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that a recomputation must reproduce (memory use varies from run to run)."""
    return {k: v for k, v in metrics.items() if "peak_rss" not in k}


DAMAGE = {
    "flipped byte": lambda e: _flip_byte(e.outputs / "model" / "shard-00000.safetensors"),
    "truncated file": lambda e: os.truncate(e.outputs / "model" / "shard-00001.safetensors", 100),
    "missing file": lambda e: (e.outputs / "model" / "ir.json").unlink(),
    "missing manifest": lambda e: (e.path / "manifest.json").unlink(),
    "empty manifest": lambda e: (e.path / "manifest.json").write_text(""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_quarantined_and_recomputed_identically(copied, damage, capsys):
    recipe, runs, before = copied
    store = CacheStore(runs / "cache")
    key = before.stages["quantize"].key
    original = store.get(key).manifest
    DAMAGE[damage](store.get(key))
    capsys.readouterr()

    after = run_recipe(str(recipe), [], _opts(runs))

    status = {sid: r.status for sid, r in after.stages.items()}
    assert status == {"model": "cached", "calibrate": "cached", "quantize": "ran", "evaluate": "cached"}
    assert after.status == "ok" and _numbers(after.metrics) == _numbers(before.metrics)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and "[quantize]" in warnings[0] and key[:12] in warnings[0]
    quarantined = list((runs / "cache" / "quarantine").iterdir())
    assert [p.name.split("-")[0] for p in quarantined] == [key]
    recomputed = store.get(key).manifest
    assert recomputed["files"] == original["files"]  # the same bytes as the first run
    assert store.verify(store.get(key)) == []


def test_only_refuses_a_damaged_upstream_entry(copied, capsys):
    recipe, runs, before = copied
    store = CacheStore(runs / "cache")
    key = before.stages["quantize"].key
    _flip_byte(store.get(key).outputs / "model" / "shard-00000.safetensors")

    after = run_recipe(str(recipe), [], _opts(runs, only="evaluate"))

    assert after.status == "failed" and after.stages["quantize"].status == "failed"
    assert "damaged" in after.stages["quantize"].error and "without --only" in after.stages["quantize"].error
    assert f"[quantize] cache entry {key[:12]} is damaged" in capsys.readouterr().err
    assert store.get(key) is None and (runs / "cache" / "quarantine").is_dir()


def test_memo_hit_is_verified(tmp_path, capsys):
    store = CacheStore(tmp_path / "cache")
    calls = []

    def compute(out: Path) -> None:
        calls.append(1)
        (out / "ref.bin").write_bytes(os.urandom(64) + b"fixed")

    key, out = store.memo("ref", {"x": 1}, compute)
    _, again = store.memo("ref", {"x": 1}, compute)
    assert len(calls) == 1 and again == out
    _flip_byte(out / "ref.bin")
    store.memo("ref", {"x": 1}, compute)
    assert len(calls) == 2
    assert f"memo 'ref' cache entry {key[:12]} is damaged" in capsys.readouterr().err
    assert store.verify(store.get(key)) == []


def test_sha256_manifests_of_older_caches_still_verify(tmp_path):
    run = toy_run(tmp_path)
    store = CacheStore(tmp_path / "cache")
    entry = store.get(run.stages["a"].key)
    manifest = json.loads((entry.path / "manifest.json").read_text())
    manifest["files"] = {rel: {"bytes": info["bytes"], "sha256": file_sha256(entry.path / rel)}
                         for rel, info in manifest["files"].items()}
    (entry.path / "manifest.json").write_text(json.dumps(manifest))
    hit, damage = store.get_verified(entry.key)
    assert hit is not None and damage is None
    (entry.outputs / "report" / "value.txt").write_text("7")
    hit, damage = store.get_verified(entry.key)
    assert hit is None and "content hash differs" in damage


def test_commit_fsyncs_files_manifest_and_folders(tmp_path, monkeypatch):
    store = CacheStore(tmp_path / "cache")
    key = "ab" * 32
    tmp = store.new_tmp(key)
    (tmp / "outputs" / "slot").mkdir()
    (tmp / "outputs" / "slot" / "w.bin").write_bytes(os.urandom(1000))
    (tmp / "outputs" / "slot" / "artifact.json").write_text("{}")
    synced: list[str] = []
    real_fsync = os.fsync

    def observed_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    entry = store.commit(key, tmp, {"stage_id": "x"})

    for name in ("outputs/slot/w.bin", "outputs/slot/artifact.json", "manifest.json", "outputs/slot", "outputs", ""):
        assert str((tmp / name) if name else tmp) in synced, name
    assert str(entry.path.parent) in synced  # the rename itself is durable
    assert store.verify(entry) == []


# ---- removal that is killed half-way -------------------------------------------------

def test_folder_without_manifest_does_not_block_its_key(tmp_path):
    first = toy_run(tmp_path)
    store = CacheStore(tmp_path / "cache")
    key = first.stages["a"].key
    (store.entry_path(key) / "manifest.json").unlink()

    again = toy_run(tmp_path)
    assert again.status == "ok" and again.stages["a"].status == "ran"
    assert store.verify(store.get(key)) == []


def test_kill_during_removal_leaves_no_stuck_key(tmp_path, runs_dir):
    key = toy_run(runs_dir).stages["a"].key
    script = tmp_path / "remove.py"
    script.write_text(textwrap.dedent(f"""
        import shutil, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from qflow.engine.cache import CacheStore

        def rmtree_then_die(path, *args, **kwargs):
            (Path(path) / "manifest.json").unlink(missing_ok=True)  # rmtree got this far...
            print("READY", flush=True)
            time.sleep(60)                                          # ...when SIGKILL came

        shutil.rmtree = rmtree_then_die
        CacheStore({str(runs_dir / "cache")!r}).remove({key!r})
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    again = toy_run(runs_dir)
    assert again.status == "ok" and again.stages["a"].status == "ran"
    verify = run_cli("cache", "verify", runs_dir=runs_dir)
    assert verify.returncode == 0 and "1 ok, 0 corrupt" in verify.stdout, verify.stdout + verify.stderr
    gc = run_cli("cache", "gc", "--keep", "5", runs_dir=runs_dir, check=True)
    assert "1 leftovers in trash" in gc.stdout
    assert not list((runs_dir / "cache" / "trash").iterdir())


def test_ls_verify_gc_tolerate_broken_entries(tmp_path, runs_dir):
    toy_run(runs_dir, value=1)
    second = toy_run(runs_dir, value=2)
    store = CacheStore(runs_dir / "cache")
    empty, missing = second.stages["a"].key, toy_run(runs_dir, value=3).stages["a"].key
    (store.entry_path(empty) / "manifest.json").write_text("")
    (store.entry_path(missing) / "manifest.json").unlink()

    ls = run_cli("cache", "ls", runs_dir=runs_dir)
    assert ls.returncode == 0, ls.stderr
    assert f"{empty[:12]}  BROKEN: empty manifest.json" in ls.stdout and f"{missing[:12]}  BROKEN" in ls.stdout
    verify = run_cli("cache", "verify", runs_dir=runs_dir)
    assert verify.returncode == 1 and "1 ok, 2 corrupt" in verify.stdout, verify.stdout + verify.stderr
    fixed = run_cli("cache", "verify", "--fix", runs_dir=runs_dir)
    assert fixed.returncode == 0 and f"removed {empty[:12]}" in fixed.stdout, fixed.stdout + fixed.stderr
    assert run_cli("cache", "verify", runs_dir=runs_dir, check=True).stdout.strip() == \
        "verified 1 entries: 1 ok, 0 corrupt"

    (store.entry_path(store.get(toy_run(runs_dir, value=4).stages["a"].key).key) / "manifest.json").write_text("{")
    gc = run_cli("cache", "gc", "--keep", "1", runs_dir=runs_dir)
    assert gc.returncode == 0, gc.stderr
    assert [item.key for item in store.items()] == []  # the broken entry of the last run goes too


# ---- temp folders, locks and scratch -------------------------------------------------------

def _owner_of_tmp(cache: Path, key: str, *, stay: bool) -> tuple[subprocess.Popen, Path]:
    """A process that opens a temp folder for ``key`` (and sleeps if ``stay``)."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from qflow.engine.cache import CacheStore; "
            f"print(CacheStore({str(cache)!r}).new_tmp({key!r}), flush=True); "
            + ("time.sleep(120)" if stay else ""))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    path = Path(proc.stdout.readline().strip())
    if not stay:
        proc.wait()
    return proc, path


def test_temp_folders_of_live_owners_survive_a_concurrent_run(tmp_path):
    cache = tmp_path / "cache"
    two_days_ago = time.time() - 2 * 86400
    live_proc, live = _owner_of_tmp(cache, "1" * 64, stay=True)
    _, dead = _owner_of_tmp(cache, "2" * 64, stay=False)
    reused = live.with_name(live.name.replace(f"-{live_proc.pid}-", f"-{os.getpid()}-"))
    live.rename(reused)  # a live pid (ours), but not the process that made the folder
    live.mkdir()
    try:
        for p in (live, dead, reused):
            os.utime(p, (two_days_ago, two_days_ago))
        dry = execute(toy_plan(), _opts(tmp_path, dry_run=True))
        assert dry.stages["a"].status == "will run"
        assert live.is_dir() and dead.is_dir() and reused.is_dir()  # --dry-run deletes nothing

        assert toy_run(tmp_path).status == "ok"
        assert live.is_dir()
        assert not dead.exists() and not reused.exists()
    finally:
        live_proc.kill()
        live_proc.wait()


def test_temp_folder_without_a_known_owner_goes_only_when_its_lock_is_free(tmp_path):
    cache = tmp_path / "cache"
    store = CacheStore(cache)
    held, free = "3" * 64, "4" * 64
    for key in (held, free):  # folders of another host: only the key's lock tells
        (cache / "tmp" / f"{key}-otherhost-1-1-abcd1234").mkdir(parents=True)
    holder = _hold_lock_process(cache / "locks" / f"{held}.lock")
    try:
        removed = store.clean_tmp()
    finally:
        holder.kill()
        holder.wait()
    assert [p.name[:64] for p in removed] == [free]
    assert (cache / "tmp" / f"{held}-otherhost-1-1-abcd1234").is_dir()


def test_gc_skips_entries_locked_by_another_process(runs_dir):
    key = toy_run(runs_dir).stages["a"].key
    store = CacheStore(runs_dir / "cache")
    holder = _hold_lock_process(runs_dir / "cache" / "locks" / f"{key}.lock")
    try:
        gc = run_cli("cache", "gc", "--keep", "0", runs_dir=runs_dir, check=True)
        assert store.get(key) is not None and "skipped 1 in use" in gc.stdout
        fix = run_cli("cache", "verify", "--fix", runs_dir=runs_dir, check=True)
        assert "1 ok" in fix.stdout
    finally:
        holder.kill()
        holder.wait()
    run_cli("cache", "gc", "--keep", "0", runs_dir=runs_dir, check=True)
    assert store.get(key) is None


def test_gc_collects_orphan_scratch_but_keeps_resume_state(runs_dir):
    key = toy_run(runs_dir).stages["a"].key
    store = CacheStore(runs_dir / "cache")
    committed = store.scratch_path(key)
    fresh, stale, stale_locked = (store.scratch_path(c * 64) for c in "567")
    ten_days_ago = time.time() - 10 * 86400
    for folder in (committed, fresh, stale, stale_locked):
        (folder / "part").mkdir(parents=True)
        (folder / "part" / "state.pt").write_bytes(b"resume")
    for folder in (stale, stale_locked):
        for p in (folder / "part" / "state.pt", folder / "part", folder):
            os.utime(p, (ten_days_ago, ten_days_ago))
    holder = _hold_lock_process(runs_dir / "cache" / "locks" / f"{'7' * 64}.lock")
    try:
        dry = run_cli("cache", "gc", "--dry-run", runs_dir=runs_dir, check=True)
        assert "would remove 2 scratch folders" in dry.stdout and committed.is_dir() and stale.is_dir()
        gc = run_cli("cache", "gc", runs_dir=runs_dir, check=True)
    finally:
        holder.kill()
        holder.wait()
    assert "removed 2 scratch folders" in gc.stdout, gc.stdout
    assert not committed.exists() and not stale.exists()
    assert fresh.is_dir() and stale_locked.is_dir()  # a killed run's resume state, or a key in use
    assert store.get(key) is not None  # the entry itself is used by the last run


def test_gc_deletes_quarantined_entries_only_once_stale(runs_dir):
    first = toy_run(runs_dir, value=1).stages["a"].key
    second = toy_run(runs_dir, value=2).stages["a"].key
    store = CacheStore(runs_dir / "cache")
    old, recent = store.quarantine(first), store.quarantine(second)
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    gc = run_cli("cache", "gc", runs_dir=runs_dir, check=True)
    assert "1 quarantined entries older than 7 days" in gc.stdout, gc.stdout
    assert not old.exists() and recent.is_dir()
