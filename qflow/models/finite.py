"""Refuse a model whose float weights hold NaN or Inf, naming the tensors, before any work.

    check_finite_weights(Path("my-model"))   # None, or StageError naming the first bad tensors

A NaN in one weight spreads to every activation after it: calibration, AWQ's
scale search or GPTQ's Hessian then fail far from the cause (or, worse, write a
checkpoint full of NaN). The weights are read in 16 MiB chunks with plain file
reads, so memory stays at one chunk; ``model.load``
runs this once per model (its cache entry records that the folder passed).
"""

from __future__ import annotations

from pathlib import Path

from qflow.errors import StageError

MAX_NAMED = 5
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CHUNK_BYTES = 16 * 2**20


def nonfinite_tensors(folder: Path, chunk_bytes: int = CHUNK_BYTES) -> dict[str, tuple[int, int]]:
    """``{tensor name: (non-finite count, element count)}`` over the float tensors of every safetensors file.

    Read with plain file reads into one reused buffer of ``chunk_bytes``: memory-mapping a shard
    left every page it touched resident until the shard closed (a 128k-vocabulary fp32
    embedding: 1 GiB of RSS, the peak of a block-wise run at Llama-3.2-1B shapes).
    """
    import torch

    from .integrity import check_safetensors, safetensors_files

    bad: dict[str, tuple[int, int]] = {}
    for path in safetensors_files(Path(folder)):
        header, _, data_start = check_safetensors(path)
        tensors = sorted(((info["data_offsets"], name, info["dtype"]) for name, info in header.items()
                          if isinstance(info, dict) and info.get("dtype") in _FLOAT_DTYPES))
        with open(path, "rb") as fh:
            for (begin, end), name, dtype in tensors:
                torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
                item = torch_dtype.itemsize
                step = max(item, chunk_bytes - chunk_bytes % item)
                buf = bytearray(min(step, end - begin))
                n_bad = 0
                fh.seek(data_start + begin)
                for at in range(begin, end, step):
                    n = min(step, end - at)
                    view = memoryview(buf)[:n]
                    if fh.readinto(view) != n:
                        raise StageError(f"{path} ends inside tensor {name}", where=str(path),
                                         fix="the file is truncated; use an intact copy of the model")
                    t = torch.frombuffer(view, dtype=torch_dtype)
                    # one fp32 sum decides the common (clean) case without a full boolean mask
                    if not bool(torch.isfinite(t.sum(dtype=torch.float32))):
                        n_bad += int((~torch.isfinite(t)).sum())
                if n_bad:
                    bad[name] = (n_bad, (end - begin) // item)
    return bad


def check_finite_weights(folder: Path, *, where: str) -> None:
    """StageError naming the tensors (layers) that hold NaN or Inf; nothing when all are finite."""
    bad = nonfinite_tensors(folder)
    if not bad:
        return
    listed = ", ".join(f"{name} ({n} of {total} values)" for name, (n, total) in list(bad.items())[:MAX_NAMED])
    more = f" and {len(bad) - MAX_NAMED} more tensors" if len(bad) > MAX_NAMED else ""
    raise StageError(f"the model in {folder} has NaN or Inf weights in {listed}{more}", where=where,
                     fix="use an intact copy of the model (a diverged fine-tune or a bad conversion "
                         "leaves NaN/Inf); nothing was computed or cached for it")
