"""Peak-memory estimates and preflight checks of the fine-tune stages, before anything runs.

    finetune_peak_bytes(cfg, inputs_meta, upstream, method="blockwise")   # Stage.estimate_peak_bytes
    heldout_problems(cfg, inputs_meta)                                    # Stage.check

Like ``qflow.models.memory`` (whose building blocks these use), the figures are
rough upper estimates of the resident set from the model's ``config.json`` and
the calibration set's shape: the runtime, the weights the method holds, what a
training step keeps for its backward pass, and the method's caches.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..models.memory import F32, RUNTIME_BYTES, _dims, calibration_shape, model_config_of, model_params

# fp32 tensors the size of one trained weight per quantized linear. FakeQuantLinear (distill, blockwise): the
# folded float weight, the start offsets, V, its gradient, the fake-quantized weight the matmul keeps for its
# backward, one transient of the backward, and AdamW's two moments (signed-gradient descent keeps none).
# LSQ (qat): the weight, its gradient, AdamW's moments and about five autograd intermediates of the fake-quant.
# Bundled model, 2 x 512-token batch (benchmarks/RESULTS.md, finetune_step): distill's peak RSS 6.2 GiB, estimate 8.4 GiB.
_TRAINED_COPIES = {"distill": 8, "qat": 10, "blockwise": 6, "lora": 2}
# saved activations of one decoder block's forward for the backward, per token: in units of hidden / intermediate
_SAVED_HIDDEN, _SAVED_INTER = 12, 5


def _linear_elements(d: dict[str, int]) -> int:
    """Weights of one block's linears (the block's parameters less its two norm vectors)."""
    return d["block"] - 2 * d["hidden"]


def blockwise_bytes(config: dict[str, Any] | None, *, n_samples: int, seq_len: int, train_batch: int,
                    forward_batch: int) -> int | None:
    """``finetune.blockwise``: non-block weights + one float block + its fake-quantized linears being trained
    (signed-gradient copies) + four streams of calibration activations (float and quantized, inputs and
    outputs) + one training batch's saved activations and attention scores + one no-grad forward batch."""
    d = _dims(config or {})
    if d is None:
        return None
    embed = d["vocab"] * d["hidden"] * (1 if d["tied"] else 2)
    streams = 4 * n_samples * seq_len * d["hidden"]
    train = train_batch * seq_len * (_SAVED_HIDDEN * d["hidden"] + _SAVED_INTER * d["inter"])
    scores = (train_batch * 3 + forward_batch) * d["heads"] * seq_len * seq_len
    forward = forward_batch * seq_len * (3 * d["hidden"] + d["inter"])
    block = d["block"] + _TRAINED_COPIES["blockwise"] * _linear_elements(d)
    return RUNTIME_BYTES + F32 * (embed + block + streams + train + scores + forward)


def e2e_bytes(config: dict[str, Any] | None, *, n_samples: int, seq_len: int, train_batch: int,
              forward_batch: int, topk: int, trained_copies: int) -> int | None:
    """``finetune.distill|qat|lora``: the whole fp32 student + ``trained_copies`` fp32 copies of every decoder
    linear (what the method trains and keeps per weight) + the saved activations of the whole model for one
    training batch + that batch's logits (logits, log-softmax, their gradients, the KL's work: five copies) +
    the cached teacher (top-k values and ids, two log-sum-exps per token). The teacher's own forward (a second
    float model, before the student is built) is smaller and is not added."""
    d = _dims(config or {})
    params = model_params(config or {})
    if d is None or params is None:
        return None
    linears = d["layers"] * _linear_elements(d)
    saved = d["layers"] * train_batch * seq_len * (_SAVED_HIDDEN * d["hidden"] + _SAVED_INTER * d["inter"])
    scores = d["layers"] * train_batch * 3 * d["heads"] * seq_len * seq_len
    logits = max(train_batch, forward_batch) * seq_len * d["vocab"] * 5
    teacher = n_samples * seq_len * (2 * topk + 3)
    return RUNTIME_BYTES + F32 * (params + trained_copies * linears + saved + scores + logits + teacher)


def finetune_peak_bytes(cfg: Any, inputs_meta: dict[str, Any], upstream: Sequence[Any], *, method: str) -> int | None:
    """``Stage.estimate_peak_bytes`` of ``finetune.<method>`` (None until the model and calibration shape are known)."""
    shape = calibration_shape(inputs_meta)
    config = model_config_of(inputs_meta, upstream)
    if shape is None or config is None:
        return None
    n, seq = shape
    train_batch = min(int(cfg.batch_size), max(1, n - int(cfg.heldout_windows)))
    if method == "blockwise":
        return blockwise_bytes(config, n_samples=n, seq_len=seq, train_batch=train_batch,
                               forward_batch=min(n, int(cfg.forward_batch)))
    # lora keeps the frozen dequantized base and the start codes (two copies); its adapters are small
    copies = _TRAINED_COPIES[method]
    return e2e_bytes(config, n_samples=n, seq_len=seq, train_batch=train_batch,
                     forward_batch=min(n, int(cfg.forward_batch)), topk=int(cfg.topk), trained_copies=copies)


def heldout_problems(cfg: Any, inputs_meta: dict[str, Any]) -> list[str]:
    """Preflight: the held-out windows the recipe asks for exist, leave training windows, and (once the
    calibration set is computed) repeat no training window. One message per problem, naming the key and the fix."""
    heldout = int(cfg.heldout_windows)
    problems = []
    if heldout == 0 and cfg.eval_every:
        problems.append(f"with.eval_every: {cfg.eval_every} asks for a held-out loss but with.heldout_windows is 0, "
                        "so there is no held-out window to evaluate; set heldout_windows >= 1 or eval_every: 0")
    shape = calibration_shape(inputs_meta)
    if shape is None:
        return problems
    n = shape[0]
    if heldout >= n:
        problems.append(f"with.heldout_windows: {heldout} held-out windows leave no training window out of the "
                        f"{n} calibration windows; lower heldout_windows to at most {n - 1} or raise the calibrate "
                        f"stage's n_samples to at least {heldout + 1}")
        return problems
    repeat = _repeated_window(inputs_meta.get("calib"), heldout)
    if repeat is not None:
        problems.append(f"with.heldout_windows: held-out window {repeat} repeats a training window (the calibration "
                        "text repeats a passage), so the held-out loss would be a training loss; use a calibration "
                        "text without repeated passages or heldout_windows: 0")
    return problems


def _repeated_window(calib: Any, heldout: int) -> int | None:
    """Index of the first held-out window identical to a training window of a computed CalibSet, else None."""
    path = getattr(calib, "path", None)
    if not heldout or path is None or not (path / "ids.pt").is_file():
        return None
    import torch

    from .data import repeated_window

    ids = torch.load(path / "ids.pt", weights_only=True)
    return repeated_window(ids, heldout)
