"""How many CPU threads torch and numba use: the cores actually free, or ``QFLOW_THREADS``.

torch's default (one thread per core, OpenMP threads spinning while they wait)
collapses on a shared machine: with another CPU-bound process on a 2-core box,
two spinning threads fight it for one free core and a pass runs several times
slower than with one thread. So qflow

* sets ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of spinning) before
  torch loads, where qflow starts the process (``qflow`` CLI), unless set;
* picks the thread count once per run from the cores this process may use
  (``os.sched_getaffinity``) minus the cores other processes keep busy, the
  larger of two estimates of the latter: the 1-minute load average and the
  busy share of every core sampled over ``SAMPLE_SECONDS`` (``/proc/stat``),
  each rounded to whole cores; at least one thread;
* takes ``QFLOW_THREADS=N`` (a positive integer) as given, and
  ``QFLOW_THREADS=auto`` (or unset) as the choice above.

Thread counts never enter a cache key: they change speed, not results
(reductions may round differently in the last bit; no cached artifact depends on it).

Example::

    choice = apply_thread_policy()        # at the start of a run
    choice.threads, choice.reason         # 1, "2 usable cores, 1.0 busy (load average 1.02, sampled 0.97)"
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .errors import QflowError

ENV = "QFLOW_THREADS"
SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (runnable + uninterruptible tasks), None where unavailable."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies summed over all cores from ``/proc/stat``; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)       # idle + iowait
    total = sum(values[:8])                                        # guest time is already in user
    return total - idle, total


def sampled_busy_cores(seconds: float = SAMPLE_SECONDS, cores: int | None = None,
                       sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Cores kept busy by every process during ``seconds`` (this one sleeping meanwhile); None off Linux."""
    first = _cpu_times()
    if first is None:
        return None
    sleep(seconds)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (cores if cores is not None else (os.cpu_count() or 1))


def parse_request(value: str | None) -> int | None:
    """``QFLOW_THREADS``: None for unset/``auto``, else a positive integer; a clear error otherwise."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    try:
        n = int(value.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise QflowError(f"{ENV}={value!r} is not a thread count", where=f"environment variable {ENV}",
                         fix=f"set {ENV} to a positive integer (e.g. {ENV}=2) or to 'auto' (the free cores), "
                             f"or unset it")
    return n


def choose_threads(cores: int, load: float | None, sampled: float | None, requested: int | None) -> ThreadChoice:
    """The thread count for ``cores`` usable cores, given other processes' busy cores (two estimates)."""
    if requested is not None:
        return ThreadChoice(requested, f"{ENV}={requested}")
    estimates = [x for x in (load, sampled) if x is not None]
    if not estimates:
        return ThreadChoice(cores, f"{cores} usable cores, load unknown")
    busy = max(estimates)
    threads = max(1, min(cores, cores - int(busy + 0.5)))
    parts = ", ".join(f"{name} {x:.2f}" for name, x in (("load average", load), ("sampled", sampled))
                      if x is not None)
    return ThreadChoice(threads, f"{cores} usable cores, {busy:.1f} busy ({parts})")


def current_choice(sample_seconds: float = SAMPLE_SECONDS) -> ThreadChoice:
    """:func:`choose_threads` for this machine now and ``QFLOW_THREADS``."""
    requested = parse_request(os.environ.get(ENV))
    if requested is not None:
        return choose_threads(usable_cores(), None, None, requested)
    cores = usable_cores()
    # the sample covers every core of the machine; only those in our affinity mask matter, so scale it
    sampled = sampled_busy_cores(sample_seconds, cores=os.cpu_count() or cores)
    if sampled is not None and (os.cpu_count() or cores) > cores:
        sampled *= cores / (os.cpu_count() or cores)
    return choose_threads(cores, load_average(), sampled, None)


def passive_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set; effective only before torch (its OpenMP runtime) loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def apply_thread_policy(choice: ThreadChoice | None = None) -> ThreadChoice:
    """Set torch's and numba's thread counts (numba's pool size too, if numba is not loaded yet)."""
    import torch

    choice = choice or current_choice()
    torch.set_num_threads(choice.threads)
    numba = sys.modules.get("numba")
    if numba is None:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(choice.threads))
    else:
        numba.set_num_threads(min(choice.threads, numba.config.NUMBA_NUM_THREADS))
    return choice
