"""Who owns a cache temp folder: its name carries the host, pid and process start time.

``tmp_name(key)`` -> ``<key>-<host>-<pid>-<start>-<rand>``; the cleaner removes a
folder of this host only when ``owner_alive`` says its process is gone (a reused
pid has another start time). Example::

    key, host, pid, start = parse_tmp_name(tmp_name("ab" * 32))
    assert host == this_host() and owner_alive(pid, start)
"""

from __future__ import annotations

import os
import socket
import uuid


def start_stamp(pid: int) -> int | None:
    """A process's start time in centiseconds since the epoch, or None when it does not run."""
    import psutil

    try:
        return int(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def this_host() -> str:
    """The host name as it appears in temp-folder names (no dashes: they separate the fields)."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def tmp_name(key: str) -> str:
    pid = os.getpid()
    return f"{key}-{this_host()}-{pid}-{start_stamp(pid) or 0}-{uuid.uuid4().hex[:8]}"


def parse_tmp_name(name: str) -> tuple[str, str | None, int | None, int | None]:
    """``key-host-pid-start-rand`` (or the older ``key-pid-rand``) -> key, host, pid, start."""
    key, _, rest = name.partition("-")
    parts = rest.split("-")
    try:
        if len(parts) == 4:
            return key, parts[0], int(parts[1]), int(parts[2])
        if len(parts) == 2:
            return key, None, int(parts[0]), None
    except ValueError:
        pass
    return key, None, None, None


def owner_alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` of this host, started at ``start`` (0/None: unknown), still runs."""
    now_start = start_stamp(pid)
    if now_start is None:
        return False
    return not start or abs(now_start - start) <= 100  # within 1 s: the same process, not a reused pid
