"""Refuse a model whose float weights hold NaN or Inf, naming the tensors, before any work.

    check_finite_weights(Path("my-model"))   # None, or StageError naming the first bad tensors

A NaN in one weight spreads to every activation after it: calibration, AWQ's
scale search or GPTQ's Hessian then fail far from the cause (or, worse, write a
checkpoint full of NaN). The weights are read tensor by tensor from the
memory-mapped safetensors files, so memory stays at one tensor; ``model.load``
runs this once per model (its cache entry records that the folder passed).
"""

from __future__ import annotations

from pathlib import Path

from qflow.errors import StageError

MAX_NAMED = 5
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def nonfinite_tensors(folder: Path) -> dict[str, tuple[int, int]]:
    """``{tensor name: (non-finite count, element count)}`` over the float tensors of every safetensors file."""
    import torch
    from safetensors import safe_open

    from .integrity import check_safetensors, safetensors_files

    bad: dict[str, tuple[int, int]] = {}
    for path in safetensors_files(Path(folder)):
        header, _, _ = check_safetensors(path)
        names = [n for n, info in header.items() if isinstance(info, dict) and info.get("dtype") in _FLOAT_DTYPES]
        with safe_open(str(path), framework="pt") as fh:
            for name in names:
                t = fh.get_tensor(name)
                # one fp32 sum decides the common (clean) case without a full boolean mask
                if bool(torch.isfinite(t.sum(dtype=torch.float32))):
                    continue
                n_bad = int((~torch.isfinite(t)).sum())
                if n_bad:
                    bad[name] = (n_bad, t.numel())
                del t
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
