"""Write a model's tensors as safetensors shards, holding one shard in memory at a time.

    writer = ShardWriter(out_dir, max_bytes=2 * 2**30, metadata={"format": "pt"})
    writer.add("model.norm.weight", tensor)   # torch tensors or numpy arrays (one kind per writer)
    files = writer.close()                    # ["model.safetensors"], or the shards and an index file

One shard is named ``model.safetensors``; more are ``model-00001-of-0000N.safetensors``
with ``model.safetensors.index.json`` (total size and weight map), the names
transformers looks for. Shards are written as ``part-*.safetensors`` and renamed
once their count is known. Used by the GGUF converter and the safetensors export.

The safetensors library writes the ``__metadata__`` entries in its hash map's order,
which changes from process to process; each shard's header is rewritten with them
sorted (same bytes otherwise), so one export is byte-identical whichever process wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class ShardWriter:
    """safetensors shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""

    def __init__(self, out_dir: Path, *, max_bytes: int, metadata: dict[str, str] | None = None):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes
        # transformers refuses safetensors files without format metadata
        self.metadata = metadata if metadata is not None else {"format": "pt"}
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[str, list[str], int]] = []  # (file, tensor names, bytes)

    def add(self, name: str, tensor) -> None:
        """Queue a tensor (made contiguous); the pending shard is written first when it would overflow."""
        if isinstance(tensor, np.ndarray):
            tensor, size = np.ascontiguousarray(tensor), tensor.nbytes
        else:
            tensor, size = tensor.contiguous(), tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def _flush(self) -> None:
        if any(isinstance(t, np.ndarray) for t in self.pending.values()):
            from safetensors.numpy import save_file
        else:
            from safetensors.torch import save_file

        filename = f"part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, str(self.out_dir / filename), metadata=self.metadata)
        sort_metadata(self.out_dir / filename)
        self.parts.append((filename, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending, give the shards their final names; the weight files written."""
        if self.pending or not self.parts:
            self._flush()
        if len(self.parts) == 1:
            os.replace(self.out_dir / self.parts[0][0], self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, total, files = {}, 0, []
        for index, (part, names, size) in enumerate(self.parts, start=1):
            filename = f"model-{index:05d}-of-{len(self.parts):05d}.safetensors"
            os.replace(self.out_dir / part, self.out_dir / filename)
            weight_map.update(dict.fromkeys(names, filename))
            total += size
            files.append(filename)
        index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2, sort_keys=True))
        return files


def sort_metadata(path: Path) -> None:
    """Rewrite the safetensors file ``path``'s header in place with its ``__metadata__`` keys sorted.

    The header keeps its length (the same entries, re-serialized compactly and padded with
    spaces as safetensors pads it); tensor data is not touched."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None)
        if not metadata or len(metadata) < 2:
            return
        text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **header},
                          separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:   # not expected (same content); the file stays valid, only its bytes vary
            log.warning("%s: header grows when its metadata is sorted; left in the writer's order", path)
            return
        f.seek(8)
        f.write(text.ljust(size, b" "))
