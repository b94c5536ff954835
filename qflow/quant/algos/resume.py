"""Per-block resume state of a quantize stage, kept in the stage's scratch folder.

A block-wise stage writes its IR shards into ``<scratch>/ir`` and, after each
finished block, an atomically replaced ``blockwise_state.pt``: the signature of
everything the output depends on, the next block, the IR writer's index and
whatever the method needs to continue (the next block's inputs, the RNG state,
per-layer records). A re-run with the same key finds the state, checks the
signature and that the listed shards exist, and continues from the next block;
the result is bit-identical to an uninterrupted run. The state is loaded as
data only (``torch.load(weights_only=True)``): anyone who can write a shared
runs folder could otherwise plant a pickle that runs code.

    state = BlockState(ctx.scratch, {"method": "hqq", ...}, ctx.log)
    saved = state.load()                    # None: start at block 0
    ...
    state.save(i + 1, writer, records=records)
    state.publish(ctx.output("model"))      # the finished IR into the stage's output
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "blockwise_state.pt"


def signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()


def load_resume_state(path: Path, log: Any) -> dict[str, Any] | None:
    """A state file loaded as data (tensors, numbers, strings, lists, dicts); an unreadable one is a
    warning and a fresh start, never a crash."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        log.warning("resume state %s is unreadable (%s); starting over", path, str(exc).splitlines()[0][:200])
        return None
    if not isinstance(state, dict) or "signature" not in state or "writer" not in state:
        log.warning("resume state %s has an unexpected shape; starting over", path)
        return None
    return state


class BlockState:
    """The resume state of one stage run (see the module docstring)."""

    def __init__(self, scratch: str | os.PathLike, signature: dict[str, Any], log: Any):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.ir_dir = self.scratch / "ir"
        self.path = self.scratch / STATE_FILE
        self.signature = signature_hash(signature)
        self.log = log

    def load(self) -> dict[str, Any] | None:
        """The saved state when it belongs to these settings and its shards exist; otherwise clear both."""
        state = load_resume_state(self.path, self.log)
        if state is not None and state.get("signature") != self.signature:
            self.log.warning("resume state in %s belongs to other settings; starting over", self.scratch)
            state = None
        elif state is not None and not self._shards_present(state["writer"]):
            self.log.warning("resume state in %s lists checkpoint shards that are gone; starting over", self.scratch)
            state = None
        if state is None:
            shutil.rmtree(self.ir_dir, ignore_errors=True)
            self.path.unlink(missing_ok=True)
        return state

    def save(self, next_block: int, writer: Any, **extra: Any) -> None:
        """Record that every block before ``next_block`` is done (``writer`` flushed first)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"signature": self.signature, "next_block": next_block, "writer": writer.state(), **extra}, tmp)
        os.replace(tmp, self.path)

    def publish(self, out_dir: str | os.PathLike) -> Path:
        """Hard-link (or copy) the finished IR into ``out_dir``, then drop the state; the IR stays whole
        until then, so a crash while publishing leaves a resumable state behind."""
        dest = Path(out_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.ir_dir.iterdir()):
            target = dest / p.name
            if target.exists():
                target.unlink()
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.ir_dir, ignore_errors=True)
        return dest

    def _shards_present(self, writer_state: dict[str, Any]) -> bool:
        shards = ({r["shard"] for r in writer_state["layers"].values()} | set(writer_state["floats"].values())
                  | {f["shard"] for f in writer_state.get("folds", {}).values()})
        return all((self.ir_dir / s).is_file() for s in shards)
