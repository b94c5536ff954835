"""A full disk and two concurrent runs of one recipe (issue 17)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qflow.engine.runner import RunOptions, run_recipe

from .conftest import REPO, tiny_recipe, write_recipe


def _opts(runs: Path) -> RunOptions:
    return RunOptions(runs_root=runs, track=False, quiet=True)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


# ---- ENOSPC: a small tmpfs in a private mount namespace --------------------------------------

# Inside `unshare -rm` (a user + mount namespace: no privilege needed, nothing seen outside): a tmpfs
# holds a copy of a finished run's folder, a filler file leaves FREE bytes, and a run with a new
# quantize key must write more than that.
_SCRIPT = r"""
set -u
mount -t tmpfs -o size=64m tmpfs "$MNT"
cp -a "$BASE/." "$MNT/"
for FREE in $FREES; do
  avail=$(df -B1 --output=avail "$MNT" | tail -1)
  fallocate -l $((avail - FREE)) "$MNT/filler"
  "$PY" -m qflow.cli --runs-dir "$MNT" run "$RECIPE" params.bits=3 --no-track --json > "$OUT/run-$FREE.json" 2> "$OUT/run-$FREE.err"
  echo $? > "$OUT/run-$FREE.rc"
  ls "$MNT/cache/tmp" > "$OUT/tmp-$FREE.txt" 2>&1
  rm -f "$MNT/filler"
  "$PY" -m qflow.cli --runs-dir "$MNT" cache verify > "$OUT/verify-$FREE.txt" 2>&1
  echo $? > "$OUT/verify-$FREE.rc"
  ls "$MNT"/cache/?? > "$OUT/ls-$FREE.txt" 2>&1
done
"$PY" -m qflow.cli --runs-dir "$MNT" run "$RECIPE" params.bits=3 --no-track --json > "$OUT/rerun.json" 2> "$OUT/rerun.err"
echo $? > "$OUT/rerun.rc"
"$PY" -m qflow.cli --runs-dir "$MNT" cache verify > "$OUT/verify-final.txt" 2>&1
echo $? > "$OUT/verify-final.rc"
"""

# bytes left free: the disk fills in the quantize stage's IR (24 KiB), also in the run folder's summary
# after that failure (4 KiB), or at evaluate / the cache commit (64 KiB, 256 KiB)
FAST_FREES, SLOW_FREES = (24576,), (4096, 24576, 65536, 262144)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged user/mount namespaces here (unshare -rm)")
@pytest.mark.parametrize("frees", [FAST_FREES, pytest.param(SLOW_FREES, marks=pytest.mark.slow)], ids=["fast", "slow"])
def test_full_disk_gives_a_clean_error_and_keeps_entries(tmp_path, tiny_model_dir, frees):
    base = tmp_path / "base"
    recipe = write_recipe(tmp_path / "recipes", tiny_recipe(tiny_model_dir))
    assert run_recipe(str(recipe), [], _opts(base)).status == "ok"
    shutil.rmtree(base / "runs")
    before = sorted(p.name for p in base.glob("cache/??/*"))
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    env = dict(os.environ, MNT=str(mnt), BASE=str(base), OUT=str(out), PY=sys.executable, RECIPE=str(recipe),
               FREES=" ".join(map(str, frees)))
    done = subprocess.run(["unshare", "-rm", "bash", "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    failed, summary = 0, []
    for free in frees:
        rc = int((out / f"run-{free}.rc").read_text())
        err = (out / f"run-{free}.err").read_text()
        where = next((line.split("no space left")[0].strip(" :")[-60:] or "?" for line in err.splitlines()
                      if "no space left" in line), "no message")
        summary.append(f"{free} B free: exit {rc}" + ("" if rc == 0 else f" ({where})"))
        if rc == 0:    # enough room after all (the outputs fit): nothing to check for this size
            continue
        failed += 1
        assert rc in (1, 2), err                       # a failed run or a refused one, never a crash
        assert "Traceback" not in err, err
        assert "no space left on the device" in err, err
        assert (out / f"tmp-{free}.txt").read_text().strip() == ""    # no temp folder left behind
        verify = (out / f"verify-{free}.txt").read_text()
        assert int((out / f"verify-{free}.rc").read_text()) == 0, verify
        assert "0 corrupt" in verify, verify
        for key in before:                            # every earlier entry is still there
            assert key in (out / f"ls-{free}.txt").read_text()
    assert failed >= 1
    rerun = json.loads((out / "rerun.json").read_text())
    assert int((out / "rerun.rc").read_text()) == 0, (out / "rerun.err").read_text()
    assert rerun["stages"]["calibrate"]["status"] == "cached"
    assert rerun["stages"]["quantize"]["status"] in ("ran", "cached")   # cached when a larger size fit
    assert "0 corrupt" in (out / "verify-final.txt").read_text()
    print(f"\nfull disk: {len(frees)} sizes, {failed} refused cleanly, earlier entries intact, re-run "
          f"{rerun['stages']['quantize']['status']}: " + "; ".join(summary))


# ---- two concurrent runs of the same recipe ----------------------------------------------------

def test_two_concurrent_runs_compute_once(tmp_path, tiny_model_dir, runs_dir):
    """Both succeed; each stage runs in exactly one of them (the other waits on the key's lock, then hits)."""
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir))
    env = dict(os.environ, QFLOW_RUNS_DIR=str(runs_dir))
    cmd = [sys.executable, "-m", "qflow.cli", "run", str(recipe), "--json"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr
    results = [json.loads(stdout) for stdout, _ in outs]
    for sid in results[0]["stages"]:
        statuses = sorted(r["stages"][sid]["status"] for r in results)
        assert statuses == ["cached", "ran"], (sid, statuses)
        assert results[0]["stages"][sid]["key"] == results[1]["stages"][sid]["key"]
    assert results[0]["metrics"]["evaluate/ppl"] == results[1]["metrics"]["evaluate/ppl"]
    assert results[0]["mlflow_run_id"] != results[1]["mlflow_run_id"]          # two tracked runs
    entries = {p.name for p in runs_dir.glob("cache/??/*")}
    stage_keys = {st["key"] for st in results[0]["stages"].values()}
    assert stage_keys <= entries and len(entries - stage_keys) <= 1     # one entry per stage (+ the float-reference memo)
    verify = subprocess.run([sys.executable, "-m", "qflow.cli", "cache", "verify"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and "0 corrupt" in verify.stdout, verify.stdout + verify.stderr
    assert not list((runs_dir / "cache" / "tmp").glob("*"))
