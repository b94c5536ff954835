"""The training knobs every fine-tune stage shares (a pydantic base of each stage's Config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..registry import StageConfig


class TrainConfig(StageConfig):
    """Shared fine-tune settings; a stage's own Config adds its method's knobs.

        with: {steps: 200, lr: 1.0e-4, schedule: cosine, heldout_windows: 4, eval_every: 25}

    Training windows are the calibration set's first ``n - heldout_windows``
    windows, the held-out windows its last ``heldout_windows`` (never overlapping;
    checked). ``seconds`` adds a wall-time budget (results then depend on the
    machine's speed, so reproducibility holds only for a step budget).
    """

    steps: int = Field(100, ge=1, description="optimisation steps (per block for finetune.blockwise)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm (0 = off; AdamW only)")
    seconds: float | None = Field(None, gt=0, description="wall-time budget of the training loop")
    batch_size: int = Field(4, ge=1, description="windows per step")
    heldout_windows: int = Field(2, ge=0, description="last calibration windows kept out of training")
    eval_every: int = Field(0, ge=0, description="held-out loss every N steps (0 = start and end only)")
    patience: int = Field(0, ge=0, description="held-out evaluations without improvement before stopping (0 = off)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable training state every N steps (0 = off)")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _shared_checks(self):
        if self.patience and not self.eval_every:
            raise ValueError("patience needs eval_every > 0 (early stopping watches the held-out loss)")
        if self.patience and not self.heldout_windows:
            raise ValueError("patience needs heldout_windows > 0")
        return self

    def loop_settings(self, optimizer: str = "adamw", *, lr: float | None = None):
        from .loop import LoopSettings

        return LoopSettings(steps=self.steps, lr=self.lr if lr is None else lr, optimizer=optimizer,
                            schedule=self.schedule, warmup_steps=self.warmup_steps,
                            weight_decay=self.weight_decay, grad_clip=self.grad_clip or None,
                            seconds=self.seconds, eval_every=self.eval_every, patience=self.patience,
                            checkpoint_every=self.checkpoint_every)


class RoundingScaleConfig(TrainConfig):
    """What a rounding/scale fine-tune trains: offsets V in [-0.5, 0.5] and per-group scale factors in ``scale_range``."""

    rounding: bool = True
    scale: bool = True
    scale_range: tuple[float, float] = (0.5, 1.0)

    @model_validator(mode="after")
    def _ranges(self):
        lo, hi = self.scale_range
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= 1 <= high (the start factor is 1), got {self.scale_range}")
        if not (self.rounding or self.scale):
            raise ValueError("nothing to train: set rounding and/or scale to true")
        return self


PRECISION_DESCRIPTION = ("compute dtype of the training forward/backward: bfloat16 runs it under autocast (several times "
                         "faster on CPUs with AMX or AVX512-BF16 and on GPUs); parameters, optimizer, loss, held-out KL "
                         "and export stay fp32")


def precision_field():
    """The ``precision`` knob of the end-to-end stages (distill, qat, lora; qflow/finetune/e2e.py)."""
    return Field("float32", description=PRECISION_DESCRIPTION)

