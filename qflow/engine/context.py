"""What a running stage sees: ``ctx``.

A stage never touches the cache or MLflow directly. It writes its outputs
under ``ctx.output(slot)`` (a scratch folder the engine commits atomically on
success), keeps resumable state under ``ctx.scratch`` (kept across a crash,
removed after commit), keeps what it derives from outside sources and shares
with later runs (tokenized text, converted models) under ``ctx.memo_dir``, and
reports through ``ctx.log_metric`` / ``ctx.log_artifact`` / ``ctx.progress``.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class Progress:
    """A minimal live progress line on stderr: ``[stage] desc  3/30  12.0s  eta 1m48s``."""

    def __init__(self, stage_id: str, desc: str, total: int | None, stream=None, quiet: bool = False):
        self.stage_id, self.desc, self.total = stage_id, desc, total
        self.n = 0
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._render(force=True)

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        self._render(note=note, force=self.total is not None and self.n >= self.total)

    def _render(self, note: str = "", force: bool = False) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if not force and now - self._last < (0.2 if self._tty else 5.0):
            return
        self._last = now
        elapsed = now - self.t0
        if self.total:
            frac = min(1.0, self.n / self.total)
            width = 24
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            eta = elapsed / self.n * (self.total - self.n) if self.n else math.nan
            eta_s = _fmt_seconds(eta) if math.isfinite(eta) else "?"
            line = f"[{self.stage_id}] {self.desc} [{bar}] {self.n}/{self.total} {_fmt_seconds(elapsed)} eta {eta_s}"
        else:
            line = f"[{self.stage_id}] {self.desc} {self.n} {_fmt_seconds(elapsed)}"
        if note:
            line += f"  {note}"
        if self._tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.quiet and self._tty:
            self._render(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


@dataclass
class StageContext:
    stage_id: str
    uses: str
    key: str | None
    out_dir: Path                   # scratch outputs, committed by the engine on success
    scratch: Path                   # resumable state, survives a crash for the same key
    run_dir: Path                   # this run's folder (reports, logs)
    memo_dir: Path                  # shared, content-keyed folder for what stages derive from sources
    device: str = "cpu"
    seed: int = 0
    quiet: bool = False
    memo_fn: Callable[[str, dict, Callable[[Path], None]], Path] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)   # extra summary facts (e.g. peak RSS)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)   # metric -> [(step, value)]

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"qflow.stage.{self.stage_id}")

    def output(self, slot: str) -> Path:
        path = self.out_dir / slot
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_metric(self, name: str, value: float) -> None:
        value = float(value)
        self.metrics[name] = value

    def log_metric_at(self, name: str, step: int, value: float) -> None:
        """One point of a curve (e.g. a held-out loss during training), tracked as an MLflow metric with a step."""
        self.curves.setdefault(name, []).append((int(step), float(value)))

    def log_metrics(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.log_metric(k, v)

    def log_artifact(self, path: str | Path, name: str | None = None) -> Path:
        """Copy a file into this stage's report folder; the tracker uploads it.

        A copy also goes into the cache entry (``<entry>/artifacts/``) so a later
        run that hits the cache shows the same reports.
        """
        src = Path(path)
        dest_dir = self.run_dir / "artifacts" / self.stage_id
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / (name or src.name)
        if src.resolve() != dest.resolve():
            shutil.copy2(src, dest)
        keep = self.out_dir.parent / "artifacts"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dest, keep / dest.name)
        self.artifacts.append(dest)
        return dest

    def progress(self, total: int | None = None, desc: str = "") -> Progress:
        return Progress(self.stage_id, desc or self.uses, total, quiet=self.quiet)

    def memo(self, name: str, ingredients: dict[str, Any], compute: Callable[[Path], None]) -> Path:
        """A cached sub-result (e.g. float-model logits) keyed by ``name`` + ``ingredients``.

        ``compute(folder)`` fills a fresh folder; the engine commits it atomically and
        returns its final path. Ingredients must be JSON-able and cover everything
        the result depends on.
        """
        if self.memo_fn is None:
            folder = self.scratch / "memo" / name
            if not folder.exists():
                compute(folder)
            return folder
        return self.memo_fn(name, ingredients, compute)

    def rng(self, salt: str = "") -> "Any":
        """A numpy Generator seeded from the recipe seed and this stage (no global state)."""
        import hashlib

        import numpy as np

        digest = hashlib.sha256(f"{self.seed}:{self.stage_id}:{salt}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def torch_generator(self, salt: str = "") -> "Any":
        import torch

        g = torch.Generator()
        g.manual_seed(int(self.rng(salt).integers(0, 2**62)))
        return g
