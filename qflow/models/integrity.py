"""Is a safetensors or GGUF file whole? Headers and lengths only, never the weights.

    check_safetensors(Path("model.safetensors"))   # (tensors, metadata, data start) or CorruptFileError
    check_gguf(Path("model.gguf"))                 # {"tensors": n, "data_bytes": n} or CorruptFileError
    check_model_folder(Path("my-model"))           # every *.safetensors of an HF folder

An interrupted download or copy leaves a file that starts well and stops
early; the libraries that read such files fail deep inside (a numpy reshape, a
Rust "file not fully covered") or, memory-mapped, only when a weight is
touched. These checks run first, so the user sees which file is cut short and
by how much:

* safetensors: 8-byte little-endian header length ``n``, ``n`` bytes of JSON,
  then the data section, which must be exactly as long as the largest
  ``data_offsets`` end in the header (the safetensors library refuses extra
  bytes too);
* GGUF (v2/v3): magic, version, tensor and key-value counts, the key-value
  pairs (skipped by type), the tensor infos (dims, type, offset), then the data
  section at ``general.alignment`` (default 32); every tensor's
  ``offset + n_elements / block_size * type_size`` must fit in the file.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any

from qflow.errors import SourceError
from qflow.fingerprint import file_stamp

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "C64": 8}
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20
_REFETCH = "copy or download the file again (an interrupted transfer cuts files short), or point at a complete copy"


class CorruptFileError(SourceError):
    """A weights file is cut short or its header does not describe it."""


def _corrupt(path: Path, what: str, where: str | None) -> CorruptFileError:
    return CorruptFileError(f"{path} {what}", where=where, fix=_REFETCH)


# ---------------------------------------------------------------- safetensors


def check_safetensors(path: Path, *, where: str | None = None) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensors {name: {dtype, shape, data_offsets}}, metadata, data start)`` of a whole safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"is too short to be a safetensors file ({size} bytes)", where)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER_BYTES:
            raise _corrupt(path, f"is not a safetensors file (its first 8 bytes give a header of {n} bytes)", where)
        raw = fh.read(n)
    if len(raw) < n:
        raise _corrupt(path, f"is truncated inside its header: the header is {n} bytes, the file has "
                             f"{len(raw)} after the length field", where)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise _corrupt(path, f"has a damaged header (not JSON: {err})", where) from err
    if not isinstance(header, dict):
        raise _corrupt(path, "has a damaged header (not a JSON object)", where)
    meta = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    need = 0
    for name, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            count = math.prod(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise _corrupt(path, f"has a damaged header entry for tensor '{name}'", where) from err
        item = _ST_BYTES.get(info.get("dtype"))
        if start < 0 or end < start or (item is not None and end - start != count * item):
            raise _corrupt(path, f"has a damaged header: tensor '{name}' ({info.get('dtype')}, shape "
                                 f"{info['shape']}) spans bytes {start}..{end}", where)
        need = max(need, end)
    if data_bytes < need:
        raise _corrupt(path, f"is truncated: its header says {need} bytes of tensor data, the file has "
                             f"{max(data_bytes, 0)}", where)
    if data_bytes > need:
        raise _corrupt(path, f"is damaged: its header says {need} bytes of tensor data, the file has "
                             f"{data_bytes} (extra bytes at the end)", where)
    return header, meta, 8 + n


def safetensors_files(folder: Path, *, where: str | None = None) -> list[Path]:
    """The weight files of an HF folder: the shards its index names (all must exist), else ``*.safetensors``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptFileError(f"{index} is damaged (no readable weight_map)", where=where, fix=_REFETCH) from err
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CorruptFileError(f"{index} names shards that are missing: {', '.join(missing[:5])}",
                                   where=where, fix=_REFETCH)
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def check_model_folder(folder: Path, *, where: str | None = None) -> None:
    """Check every safetensors weight file of an HF model folder (other weight formats are left alone)."""
    for path in safetensors_files(folder, where=where):
        check_safetensors(path, where=where)


# ---------------------------------------------------------------- GGUF

# value type -> struct format of a scalar (8: string, 9: array, handled apart)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


# GGML type id -> (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES (0.19) has them;
# written out so that fingerprinting a source imports no gguf/numpy (ids not here are looked up in gguf)
GGML_BLOCK_BYTES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}


def _ggml_block_bytes(ttype: int) -> tuple[int, int] | None:
    if ttype in GGML_BLOCK_BYTES:
        return GGML_BLOCK_BYTES[ttype]
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ImportError, ValueError, KeyError):
        return None


class _Truncated(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated()
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated()
        self.pos += n

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise _Truncated()
        value = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return value

    def skip_value(self, vtype: int, path: Path, where: str | None) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            self.skip(self.take("<Q"))
            return None
        if vtype == _GGUF_ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _GGUF_SCALARS:
                self.skip(count * struct.calcsize(_GGUF_SCALARS[etype]))
            else:
                for _ in range(count):
                    self.skip_value(etype, path, where)
            return None
        raise _corrupt(path, f"has a damaged GGUF header (unknown value type {vtype} at byte {self.pos})", where)


# (path, size, mtime_ns, inode) -> result of a file that passed: a sweep fingerprints the same GGUF per point,
# and walking its token list costs ~0.1 s
_GGUF_PASSED: dict[tuple, dict[str, int]] = {}


def check_gguf(path: Path, *, where: str | None = None) -> dict[str, int]:
    """``{"tensors": n, "data_bytes": n}`` of a whole GGUF file; CorruptFileError when cut short or damaged."""
    path = Path(path)
    stamp = (str(path.resolve()), *file_stamp(path))
    if stamp not in _GGUF_PASSED:
        _GGUF_PASSED[stamp] = _check_gguf(path, stamp[1], where)
    return dict(_GGUF_PASSED[stamp])


def _check_gguf(path: Path, size: int, where: str | None) -> dict[str, int]:
    if size < 24:
        raise _corrupt(path, f"is too short to be a GGUF file ({size} bytes)", where)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise _corrupt(path, "is not a GGUF file (no GGUF magic)", where)
        cur = _Cursor(buf, size)
        cur.skip(4)
        version = cur.take("<I")
        if version not in (2, 3):
            raise _corrupt(path, f"is GGUF version {version}; qflow reads versions 2 and 3", where)
        try:
            n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
            alignment = 32
            for _ in range(n_kv):
                key = cur.string()
                value = cur.skip_value(cur.take("<I"), path, where)
                if key == b"general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            tensors = []
            for _ in range(n_tensors):
                name = cur.string().decode("utf-8", "replace")
                n_dims = cur.take("<I")
                if n_dims > 8:
                    raise _corrupt(path, f"has a damaged GGUF header (tensor '{name}' has {n_dims} dims)", where)
                dims = [cur.take("<Q") for _ in range(n_dims)]
                tensors.append((name, dims, cur.take("<I"), cur.take("<Q")))
        except _Truncated:
            raise _corrupt(path, f"is truncated inside its GGUF header (the file ends at byte {size}, "
                                 f"before the tensor list does)", where) from None
        header_end = cur.pos
    data_start = -(-header_end // alignment) * alignment
    need = 0
    for name, dims, ttype, offset in tensors:
        sizes = _ggml_block_bytes(ttype)
        if sizes is None:
            raise _corrupt(path, f"has tensor '{name}' of unknown GGML type {ttype}", where)
        block, type_bytes = sizes
        count = math.prod(dims)
        if count % block:
            raise _corrupt(path, f"has a damaged GGUF header (tensor '{name}': {count} elements are not whole "
                                 f"blocks of {block})", where)
        need = max(need, offset + count // block * type_bytes)
    have = max(size - data_start, 0)
    if have < need:
        raise _corrupt(path, f"is truncated: its header says {need} bytes of tensor data, the file has {have}",
                       where)
    return {"tensors": len(tensors), "data_bytes": need}
