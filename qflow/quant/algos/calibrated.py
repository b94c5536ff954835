"""What every calibration-based quantize stage does before its algorithm runs.

    net, adapter, calib_info = open_float_model(ctx, cfg, model, calib)
    ids = calibration_ids(ctx, calib, uses="quantize.gptq")

The float model is built in fp32 with the stage's attention kernel and its
decoder blocks left on disk for the block-wise driver to load one at a time, its
architecture adapter is resolved (an unknown architecture is an error naming the
supported ones), and the calibration set's ``info.json`` (source, fingerprint)
is read so the checkpoint's metadata says which data calibrated it.
"""

from __future__ import annotations

import json
from typing import Any

from qflow.errors import StageError


def calibration_info(calib: Any) -> dict[str, Any]:
    """``info.json`` of a CalibSet (empty when an older calibrate stage wrote none)."""
    info_path = calib.path / "info.json"
    return json.loads(info_path.read_text()) if info_path.is_file() else {}


def calibration_ids(ctx: Any, calib: Any, *, uses: str):
    """The ``[n, seq_len]`` token ids of a CalibSet, or a StageError naming the wiring fix."""
    import torch

    ids_path = calib.path / "ids.pt"
    if not ids_path.is_file():
        raise StageError(f"{ids_path} is missing", where=f"stages.{ctx.stage_id}.needs",
                         fix=f"feed {uses} from a calibrate stage")
    return torch.load(ids_path, weights_only=True)


def open_float_model(cfg: Any, model: Any, *, lazy: bool = True):
    """(fp32 model, its architecture adapter) with the stage's ``attn_implementation``.

    ``lazy``: the decoder blocks stay on disk until the block-wise driver loads
    them one at a time (``qflow.models.lazy``); ``False`` loads the model whole
    (for a full forward pass).
    """
    from qflow.models.adapters import get_adapter
    from qflow.models.lazy import load_model_lazy
    from qflow.models.loading import load_model

    from qflow.models.moe import set_calibrate_all_experts

    if lazy:
        net, adapter = load_model_lazy(model.base_model_dir, dtype="float32",
                                       attn_implementation=cfg.attn_implementation)
    else:
        net, _ = load_model(model.base_model_dir, dtype="float32", attn_implementation=cfg.attn_implementation)
        adapter = get_adapter(net)
    # mixture-of-experts: every expert sees every token in calibration passes (docs/METHODS.md §4.2)
    set_calibrate_all_experts(net, getattr(cfg, "moe_calibrate_all_experts", False))
    return net, adapter


def checkpoint_meta(cfg: Any, calib: Any, ids: Any = None) -> dict[str, Any]:
    """The quantized checkpoint's provenance: the stage config and the calibration data."""
    info = calibration_info(calib)
    meta = {"config": cfg.model_dump(mode="json"), "calib_fingerprint": info.get("fingerprint"),
            "calib_source": info.get("source")}
    if ids is not None:
        meta["calib_shape"] = list(ids.shape)
    return meta
