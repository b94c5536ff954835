"""Training and held-out windows from a calibration set, and the IR a fine-tune starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import StageError
from ..quant.ir import Checkpoint, CheckpointWriter


@dataclass
class Windows:
    train: torch.Tensor      # [n_train, seq_len]
    heldout: torch.Tensor    # [n_heldout, seq_len] (may be empty)

    def describe(self) -> dict[str, Any]:
        return {"train_windows": int(self.train.shape[0]), "heldout_windows": int(self.heldout.shape[0]),
                "heldout_overlap": "none: held-out windows are the calibration set's last windows, "
                                   "disjoint token spans of the same text (checked: no shared window)"}


def split_windows(ids: torch.Tensor, heldout: int, *, where: str) -> Windows:
    """The first ``n - heldout`` calibration windows for training, the last ``heldout`` held out.

    Calibration windows are consecutive non-overlapping spans of one text
    (qflow.data.tokens.token_windows), so the two sets share no token position;
    the check below also refuses a held-out window identical to a training one
    (repeated text), which would make the held-out loss a training loss.
    """
    n = int(ids.shape[0])
    if heldout >= n:
        raise StageError(f"heldout_windows {heldout} leaves no training window out of {n} calibration windows",
                         where=where, fix=f"lower heldout_windows below {n} or raise calibrate.with.n_samples")
    j = repeated_window(ids, heldout)
    if j is not None:
        raise StageError(f"held-out window {j} repeats a training window (the calibration text repeats)",
                         where=where, fix="use a calibration text without repeated passages or heldout_windows: 0")
    return Windows(ids[: n - heldout], ids[n - heldout:])


def repeated_window(ids: torch.Tensor, heldout: int) -> int | None:
    """Index (among the last ``heldout`` windows of ``ids``) of the first held-out window identical to a
    training window, else None."""
    n = int(ids.shape[0])
    if not 0 < heldout < n:
        return None
    train, held = ids[: n - heldout], ids[n - heldout:]
    for j, row in enumerate(held):
        if bool((train == row).all(dim=1).any()):
            return j
    return None


def open_writer(path, start: Checkpoint, method: str, meta: dict[str, Any]) -> CheckpointWriter:
    """A writer for the fine-tuned IR: same base model, method ``<start method>+<method>``."""
    return CheckpointWriter(path, base_model=start.base_model, method=f"{start.method}+{method}",
                            meta={"start_method": start.method, "start_meta": start.meta, **meta})


def copy_floats_and_folds(writer: CheckpointWriter, start: Checkpoint, *, block_prefix: str | None = None) -> None:
    """Carry the start IR's float deltas and fold records (those of one block when ``block_prefix``)."""
    def wanted(name: str) -> bool:
        return block_prefix is None or name.startswith(block_prefix + ".")

    for param in start.floats:
        if wanted(param):
            writer.add_float(param, start.float_tensor(param))
    for prev, fold in start.folds.items():
        if wanted(prev):
            writer.add_fold(prev, fold["linears"], start.fold_scale(prev))


def copy_layer(writer: CheckpointWriter, start: Checkpoint, name: str) -> None:
    """A layer written unchanged (its exact stored tensors re-encoded from codes and parameters)."""
    from ..quant.ir import decode_params
    from ..quant import dispatch

    rec = start.layers[name]
    t = start.layer_tensors(name)
    codes = dispatch.unpack(t["qweight"], rec.spec.bits, rec.in_features)
    scale, zero = decode_params(rec.spec, t)
    writer.add_quantized(name, rec.spec, codes, scale, zero, t.get("g_idx"))
