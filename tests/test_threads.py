"""Thread choice from the free cores, QFLOW_THREADS, the passive OpenMP wait policy (qflow/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qflow import threads
from qflow.errors import QflowError
from qflow.threads import choose_threads, parse_request


@pytest.mark.parametrize("cores, load, sampled, expected", [
    (2, 0.05, 0.1, 2),        # quiet machine: every core
    (2, 1.02, 0.2, 1),        # one competing CPU-bound process (load average)
    (2, 0.1, 0.97, 1),        # one that just started (the sample sees it, the load average not yet)
    (2, 3.0, 2.0, 1),         # overloaded: never below one thread
    (16, 4.4, 3.6, 12),       # busier estimate, rounded to whole cores
    (8, 2.5, None, 5),        # 2.5 rounds up to 3 busy cores
    (4, None, None, 4),       # nothing known: every usable core
])
def test_threads_are_the_free_cores(cores, load, sampled, expected):
    choice = choose_threads(cores, load, sampled, None)
    assert choice.threads == expected
    assert f"{cores} usable cores" in choice.reason


def test_qflow_threads_wins_over_the_load():
    choice = choose_threads(2, 5.0, 2.0, 3)
    assert choice.threads == 3 and choice.reason == "QFLOW_THREADS=3"


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), ("", None), (" AUTO ", None),
                                             ("1", 1), (" 4 ", 4)])
def test_parse_request(value, expected):
    assert parse_request(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_qflow_threads_is_a_clear_error(value):
    with pytest.raises(QflowError, match="QFLOW_THREADS.*positive integer"):
        parse_request(value)


def test_sampled_busy_cores_reads_proc_stat(monkeypatch):
    samples = iter([(100, 400), (250, 600)])          # 150 of 200 jiffies busy
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    assert threads.sampled_busy_cores(0.0, cores=4, sleep=lambda s: None) == pytest.approx(3.0)


def test_current_choice_with_env(monkeypatch):
    monkeypatch.setenv("QFLOW_THREADS", "1")
    assert threads.current_choice().threads == 1
    monkeypatch.setenv("QFLOW_THREADS", "auto")
    choice = threads.current_choice(sample_seconds=0.01)
    assert 1 <= choice.threads <= threads.usable_cores()


def test_cli_sets_passive_wait_and_the_thread_count(tmp_path):
    """`qflow` sets OMP_WAIT_POLICY before torch loads and the chosen count in torch and numba."""
    code = ("import os, sys\n"
            "from qflow import cli\n"
            "cli._offline_defaults()\n"
            "assert 'torch' not in sys.modules\n"
            "import argparse\n"
            "cli._set_threads(argparse.Namespace(multirun=False, jobs=1, quiet=True))\n"
            "import torch, numba\n"
            "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), numba.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NUMBA_NUM_THREADS")}
    env["QFLOW_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PASSIVE", "1", "1"]


def test_cli_bad_qflow_threads_no_traceback(tmp_path):
    env = {**os.environ, "QFLOW_THREADS": "many"}
    out = subprocess.run([sys.executable, "-m", "qflow.cli", "run", "recipes/llama-awq.yaml"], env=env,
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 2
    assert "QFLOW_THREADS" in out.stderr and "Traceback" not in out.stderr
