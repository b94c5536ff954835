"""Round-trip checks: logits of a reloaded export against qflow's own quantized model.

    ref, tok, ids = verify_setup(Checkpoint(ir_dir), cfg.verify_data, cfg.verify_windows, cache_root)
    metrics = compare_logits(ref, exported_model, ids)      # roundtrip_kl / top1_agree / max_abs_diff

``verify_setup`` is what every exporter's round trip starts from: qflow's model
(dequantized, fp32), its tokenizer and the evaluation windows.

KL is the full-vocabulary ``KL(p_qflow || p_export)`` per position in fp64,
averaged over every position of every window; top-1 agreement compares argmaxes;
``max_abs_diff`` is the largest absolute logit difference. Windows run one at a
time so memory holds two ``[L, vocab]`` logit tensors, not the whole set.
"""

from __future__ import annotations

from typing import Any, Callable

from qflow.specs import DataSpec

DEFAULT_VERIFY_DATA = DataSpec(source="zoo:lee-news", seq_len=128)


def reference_model(ckpt, dtype: str = "float32"):
    """qflow's quantized model of ``ckpt``: dequantized weights, or QLinear when activations are quantized."""
    from qflow.models.loading import _torch_dtype
    from qflow.models.quantized import load_quantized_model

    act = any(r.spec.act_bits for r in ckpt.layers.values())
    model, tok = load_quantized_model(ckpt, dtype=_torch_dtype(dtype), mode="qlinear" if act else "dequant")
    model.eval()
    return model, tok


def _scores(out):
    """The output's logits; a bare encoder (AutoModel, no head) has none: its last hidden states
    stand in (then ``roundtrip_kl`` compares softmaxes over hidden units: 0 iff equal, not a distance
    between token distributions)."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def compare_logits(reference, candidate, ids, progress: Callable[[int], None] | None = None) -> dict[str, float]:
    import torch

    kl_sum, n_pos, agree, max_abs = 0.0, 0, 0, 0.0
    with torch.no_grad():
        for i in range(ids.shape[0]):
            window = ids[i:i + 1]
            a = _scores(reference(input_ids=window, use_cache=False))[0].double()
            b = _scores(candidate(input_ids=window, use_cache=False))[0].double()
            la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
            kl = (la.exp() * (la - lb)).sum(-1).clamp(min=0)
            kl_sum += float(kl.sum())
            n_pos += kl.numel()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            max_abs = max(max_abs, float((a - b).abs().max()))
            if progress:
                progress(1)
    return {"roundtrip_kl": kl_sum / max(n_pos, 1), "roundtrip_top1_agree": agree / max(n_pos, 1),
            "roundtrip_max_abs_diff": max_abs}


class ReplayedLogits:
    """A stand-in model that returns precomputed logits ``[n_windows, seq, vocab]``, one window per call
    (another runtime's logits, e.g. llama.cpp's, fed to :func:`compare_logits`)."""

    def __init__(self, logits):
        self.logits, self.i = logits, 0

    def __call__(self, input_ids=None, use_cache=False):
        import numpy as np
        import torch

        out = type("Output", (), {"logits": torch.from_numpy(np.asarray(self.logits[self.i:self.i + 1]))})
        self.i += 1
        return out


def eval_windows(data: Any, tokenizer, n_windows: int, cache_root):
    """``[n, seq_len]`` ids from a DataSpec (the recipe's evaluation text)."""
    from qflow.data.tokens import token_windows

    return token_windows(data, tokenizer, n_windows, cache_root, where="verify")


def verify_setup(ckpt, data: Any, n_windows: int, cache_root):
    """(qflow's model of ``ckpt``, its tokenizer, ``[n_windows, seq_len]`` ids of ``data``): a round trip's inputs."""
    ref, tok = reference_model(ckpt)
    return ref, tok, eval_windows(data, tok, n_windows, cache_root)


def verify_fingerprint_sources(data: Any, n_windows: int, cache_root) -> dict:
    """An exporter's ``fingerprint_sources``: the verify text's content hash, when a round trip runs."""
    if not n_windows:
        return {}
    from qflow.data.tokens import text_fingerprint_source

    return {"verify_data": text_fingerprint_source(data.source, cache_root, data.field)}
