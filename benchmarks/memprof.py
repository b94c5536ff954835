"""Where the memory goes: run ``qflow`` in this process while a thread prints the main thread's qflow
stack at each new RSS high-water mark (16 MiB steps), with the resident anonymous / file-backed split.

The profile behind the issue-17 memory cuts (benchmarks/RESULTS.md "Scale")::

    .venv/bin/python benchmarks/memprof.py runs/awq-mem.txt --runs-dir /work/scale-work/runs \\
        run /work/scale-work/recipes/awq.yaml --no-track --force quantize

(the recipe and runs folder that ``benchmarks/scale.py --work /work/scale-work`` writes). Each entry:
``--- <RSS MiB> <time> {'RssAnon': .., 'RssFile': ..}`` then the innermost qflow frames. The split is
read just after the RSS, so a short-lived allocation may already be gone from it.
"""

from __future__ import annotations

import runpy
import sys
import threading
import time
import traceback

STEP_KIB = 16 * 1024


def _status(*fields: str) -> dict[str, int]:
    """``/proc/self/status`` fields in MiB."""
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f if line.startswith(fields)}


def _sampler(out, main_ident: int) -> None:
    high = 0
    while True:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        if rss > high + STEP_KIB:
            high = rss
            frame = sys._current_frames().get(main_ident)
            if frame is not None:
                stack = [f for f in traceback.extract_stack(frame) if "qflow" in f.filename or "stages" in f.filename]
                out.write(f"--- {rss // 1024} MiB {time.strftime('%H:%M:%S')} {_status('RssAnon', 'RssFile')}\n")
                for f in stack[-8:]:
                    out.write(f"   {'/'.join(f.filename.rsplit('/', 2)[-2:])}:{f.lineno} {f.name}: {f.line}\n")
                out.flush()
        time.sleep(0.002)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out = open(sys.argv[1], "w")
    threading.Thread(target=_sampler, args=(out, threading.main_thread().ident), daemon=True).start()
    sys.argv = ["qflow", *sys.argv[2:]]
    runpy.run_module("qflow.cli", run_name="__main__")


if __name__ == "__main__":
    main()
