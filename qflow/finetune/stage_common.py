"""What every fine-tune stage does around its method: open the start IR and the windows, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import StageError


def open_start(ctx: Any, cfg: Any, model: Any, calib: Any):
    """(start Checkpoint, Windows, IR meta) from a stage's ``model`` (an IR) and ``calib`` inputs."""
    from ..quant.algos.calibrated import calibration_ids, calibration_info
    from ..quant.ir import Checkpoint
    from .data import split_windows

    where = f"stages.{ctx.stage_id}"
    try:
        start = Checkpoint(model.path)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(f"the model input is not a qflow quantized checkpoint ({exc})", where=f"{where}.needs",
                         fix="feed the fine-tune stage from a quantize.* stage") from None
    if not start.layers:
        raise StageError("the starting checkpoint has no quantized layer", where=f"{where}.needs",
                         fix="feed the fine-tune stage from a quantize.* stage that quantizes layers")
    ids = calibration_ids(ctx, calib, uses=ctx.uses)
    windows = split_windows(ids, cfg.heldout_windows, where=f"{where}.with.heldout_windows")
    info = calibration_info(calib)
    meta = {"config": cfg.model_dump(mode="json"), "calib_fingerprint": info.get("fingerprint"),
            "calib_source": info.get("source"), **windows.describe()}
    for k, v in windows.describe().items():
        ctx.info[k] = v
    ctx.log_metric("train_windows", windows.train.shape[0])
    ctx.log_metric("heldout_windows", windows.heldout.shape[0])
    return start, windows, meta


def finish_report(ctx: Any, windows: Any, records: list[dict[str, Any]]) -> None:
    """``finetune.json`` (windows, overlap statement, per-block/step records) into the stage's report."""
    path = Path(ctx.scratch) / "finetune.json"
    path.write_text(json.dumps({**windows.describe(), "records": records}, indent=1, default=float))
    try:
        ctx.log_artifact(path, "finetune.json")
    except Exception as exc:  # a report copy must not fail the stage; say so
        ctx.log.warning("could not record finetune.json: %s", exc)


def log_e2e_result(ctx: Any, result: Any, seconds: float) -> None:
    """The loop's outcome as metrics: steps run, why it stopped, held-out KL at the start and the best."""
    ctx.log_metric("train_steps", result.steps)
    ctx.log_metric("train_seconds", seconds)
    ctx.log_metric("best_step", result.best_step)
    ctx.info["stopped"] = result.stopped
    if result.first_heldout is not None:
        ctx.log_metric("heldout_kl_start", result.first_heldout)
        ctx.log_metric("heldout_kl_best", result.best_heldout)
        ctx.log_metric("heldout_kl_ratio", result.best_heldout / result.first_heldout if result.first_heldout else float("nan"))
    log_curve(ctx, result.curve)
    losses = [row["train_loss"] for row in result.curve if "train_loss" in row]
    if losses:
        ctx.log_metric("train_loss_last", losses[-1])


def log_curve(ctx: Any, curve: list[dict[str, float]], *, offset: int = 0, prefix: str = "") -> None:
    """Train loss and held-out loss per step as tracked curves (``<prefix>train_loss_curve``,
    ``<prefix>heldout_loss_curve``: MLflow metrics with steps; held-out = the method's held-out loss)."""
    if not hasattr(ctx, "log_metric_at"):
        return
    for row in curve:
        for key in ("train_loss", "heldout_loss"):
            if key in row:
                ctx.log_metric_at(f"{prefix}{key}_curve", offset + int(row["step"]), row[key])
