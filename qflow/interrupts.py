"""SIGTERM as an exception, so a terminated command cleans up like an interrupted one.

Python's default for SIGTERM is to die on the spot: no ``finally`` blocks run,
so an MLflow run stays RUNNING and a child server keeps its port. Inside
``sigterm_raises()`` the signal raises :class:`Terminated` in the main thread
instead; like ``KeyboardInterrupt`` it is a ``BaseException``, so the runner's
``except BaseException`` cleanups (temp cache folders) run and ``except
Exception`` handlers do not swallow it. The CLI turns it into exit status
``128 + signum`` without a traceback::

    with sigterm_raises():
        execute(plan, opts)      # SIGTERM -> Terminated(15) -> exit 143
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(BaseException):
    """The process received SIGTERM (``signum``); raised where the main thread was."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = int(signum)
        super().__init__(f"terminated by {signal.Signals(self.signum).name}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
