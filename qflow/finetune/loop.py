"""The training loop every fine-tune stage shares.

AdamW or signed-gradient descent (SignRound), a cosine, linear-decay or constant
learning-rate schedule with optional warm-up, gradient-norm clipping, a step
and/or wall-time budget, a held-out evaluation every ``eval_every`` steps (the
curve is returned and written by the stage), early stopping on the held-out loss
(the best parameters are restored at the end), and a checkpoint every
``checkpoint_every`` steps: parameters, optimiser state, the batch generator's
state, the curve and the elapsed time, loaded back as data
(``torch.load(weights_only=True)``) when a killed run is re-run with the same key.
Resuming restores everything the next step depends on, so on the same machine and
thread count a resumed run repeats the uninterrupted one bit for bit (a time
budget is the exception: wall time is not reproducible).

    loop = TrainLoop(params, settings, generator=g, state_path=scratch / "train.pt", signature={...})
    result = loop.run(step_loss=lambda step: loss_of_a_batch(), heldout_loss=lambda: float(...),
                      progress=ctx.progress(settings.steps, "distill"))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    lr: float
    optimizer: str = "adamw"          # adamw | signsgd
    schedule: str = "cosine"          # cosine | linear | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0     # max global grad norm (adamw only; signsgd ignores magnitudes)
    seconds: float | None = None      # wall-time budget; None = steps only
    eval_every: int = 0               # 0 = held-out loss only at the end
    patience: int = 0                 # evaluations without improvement before stopping; 0 = never stop early
    checkpoint_every: int = 0         # 0 = no mid-run checkpoints

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.schedule == "linear":
            return self.lr * (1.0 - t)
        return self.lr


@dataclass
class LoopResult:
    steps: int
    stopped: str                       # steps | time | early_stop
    best_step: int
    best_heldout: float | None
    first_heldout: float | None
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_at: int = 0
    seconds: float = 0.0


class SignSGD(torch.optim.Optimizer):
    """``p -= lr · sign(grad)`` (SignRound's update)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def _signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()


def adamw(params: list[torch.Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW, fused (one pass over each parameter and its state per step) where torch has a fused kernel
    for the parameters' device (CPU since torch 2.4, CUDA): the unfused update takes about five passes."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):   # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kwargs)


class TrainLoop:
    """Runs ``settings.steps`` optimisation steps over ``params`` (see the module doc).

    ``after_step`` (e.g. clamping rounding offsets into their bounds) runs after each
    optimiser step. ``state_path`` None disables checkpoints.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], settings: LoopSettings, *,
                 generator: torch.Generator, state_path: Path | None = None,
                 signature: dict[str, Any] | None = None, log: Any = None,
                 after_step: Callable[[], None] | None = None):
        self.params = params
        self.settings = settings
        self.generator = generator
        self.state_path = Path(state_path) if state_path is not None else None
        self.signature = _signature_hash({"settings": settings.__dict__, **(signature or {})})
        self.log = log
        self.after_step = after_step
        plist = list(params.values())
        if settings.optimizer == "signsgd":
            self.optimizer: torch.optim.Optimizer = SignSGD(plist, lr=settings.lr)
        elif settings.optimizer == "adamw":
            self.optimizer = adamw(plist, lr=settings.lr, weight_decay=settings.weight_decay)
        else:
            raise ValueError(f"optimizer must be adamw or signsgd, got {settings.optimizer!r}")

    # -- checkpoints ------------------------------------------------------------
    def _save(self, step: int, curve, best, elapsed: float) -> None:
        if self.state_path is None:
            return
        state = {"signature": self.signature, "step": step, "elapsed": elapsed,
                 "params": {k: p.detach().clone() for k, p in self.params.items()},
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "curve": curve, "best": best}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def _load(self) -> dict[str, Any] | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            state = torch.load(self.state_path, weights_only=True)
        except Exception as exc:  # an unreadable checkpoint is a fresh start, said in the log
            self._warn("training checkpoint %s is unreadable (%s); starting over", self.state_path, exc)
            return None
        if not isinstance(state, dict) or state.get("signature") != self.signature:
            self._warn("training checkpoint %s belongs to other settings; starting over", self.state_path)
            return None
        return state

    def _warn(self, msg: str, *args: Any) -> None:
        if self.log is not None:
            self.log.warning(msg, *args)

    # -- the loop -----------------------------------------------------------------
    def run(self, step_loss: Callable[[int], torch.Tensor], heldout_loss: Callable[[], float] | None = None,
            progress: Any = None) -> LoopResult:
        """``step_loss(step)`` returns the differentiable loss of one batch; ``heldout_loss()`` a float."""
        s = self.settings
        curve: list[dict[str, float]] = []
        best: dict[str, Any] = {"loss": math.inf, "step": 0, "params": None, "bad_evals": 0}
        start, elapsed0 = 0, 0.0
        first_heldout = None
        state = self._load()
        if state is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(state["params"][k])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            curve, best, start, elapsed0 = list(state["curve"]), dict(state["best"]), int(state["step"]), float(state["elapsed"])
            if self.log is not None:
                self.log.info("resuming training at step %d from %s", start, self.state_path)
            if progress is not None:
                progress.update(start, note="resumed")
        elif heldout_loss is not None:
            first_heldout = float(heldout_loss())
            curve.append({"step": 0, "heldout_loss": first_heldout})
            best = {"loss": first_heldout, "step": 0, "params": self._snapshot(), "bad_evals": 0}
        if curve and first_heldout is None:
            first_heldout = curve[0].get("heldout_loss")
        t0 = time.perf_counter() - elapsed0
        stopped, step = "steps", start
        for step in range(start, s.steps):
            if s.seconds is not None and time.perf_counter() - t0 >= s.seconds:
                stopped = "time"
                break
            for group in self.optimizer.param_groups:
                group["lr"] = s.lr_at(step)
            self.optimizer.zero_grad(set_to_none=True)
            loss = step_loss(step)
            loss.backward()
            if s.grad_clip and s.optimizer == "adamw":
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.grad_clip)
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step()
            done = step + 1
            row: dict[str, float] = {"step": done, "train_loss": float(loss.detach()), "lr": s.lr_at(step)}
            if heldout_loss is not None and s.eval_every and done % s.eval_every == 0 and done < s.steps:
                row["heldout_loss"] = float(heldout_loss())
                self._track_best(best, row["heldout_loss"], done)
            curve.append(row)
            if progress is not None:
                progress.update(1, note=f"loss {row['train_loss']:.4g}")
            if s.patience and best["bad_evals"] >= s.patience:
                stopped, step = "early_stop", done
                break
            if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.steps:
                self._save(done, curve, best, time.perf_counter() - t0)
            step = done
        else:
            step = s.steps
        if heldout_loss is not None and (not curve or "heldout_loss" not in curve[-1] or curve[-1]["step"] != step):
            final = float(heldout_loss())
            curve.append({"step": step, "heldout_loss": final})
            self._track_best(best, final, step)
        if best.get("params") is not None and best["step"] != step:
            with torch.no_grad():  # early stopping: the parameters of the best held-out loss
                for k, p in self.params.items():
                    p.copy_(best["params"][k])
        return LoopResult(steps=step, stopped=stopped, best_step=int(best["step"]),
                          best_heldout=None if heldout_loss is None else float(best["loss"]),
                          first_heldout=first_heldout, curve=curve, resumed_at=start,
                          seconds=time.perf_counter() - t0)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def _track_best(self, best: dict[str, Any], loss: float, step: int) -> None:
        if loss < best["loss"]:
            best.update(loss=loss, step=step, params=self._snapshot(), bad_evals=0)
        else:
            best["bad_evals"] = best.get("bad_evals", 0) + 1

    def clear(self) -> None:
        """Drop the checkpoint (after the stage's result is safely written)."""
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
