"""Teacher logits, computed once from the float model and cached as an artifact (top-k + tail bin).

Storing full-vocabulary logits costs ``windows × seq_len × vocab`` floats (16 × 512 ×
49 152 × 4 B = 1.6 GB for the bundled model), so the teacher keeps, per token, its
``topk`` largest logits, their token ids and ``logsumexp(logits / T)`` (and at T = 1 for the held-out KL). The
distillation loss then is the KL over the ``topk`` tokens plus one tail bin holding
the remaining probability mass (a lower bound of the full KL that is exact as
``topk`` approaches the vocabulary; docs/METHODS.md §10.3).

    folder = ctx.memo("teacher-logits", ingredients, lambda d: write_teacher(d, net, ids, topk=64, temperature=2.0))
    teacher = load_teacher(folder)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def ids_fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def write_teacher(folder: Path, net: nn.Module, ids: torch.Tensor, *, topk: int, temperature: float,
                  batch_size: int = 2) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    n, t = ids.shape
    values = torch.empty((n, t, topk), dtype=torch.float32)
    indices = torch.empty((n, t, topk), dtype=torch.int32)
    lse = torch.empty((n, t), dtype=torch.float32)
    lse1 = torch.empty((n, t), dtype=torch.float32)
    for b0 in range(0, n, batch_size):
        logits = net(input_ids=ids[b0:b0 + batch_size], use_cache=False).logits.float()
        v, i = logits.topk(topk, dim=-1)
        values[b0:b0 + batch_size], indices[b0:b0 + batch_size] = v, i.to(torch.int32)
        lse[b0:b0 + batch_size] = torch.logsumexp(logits / temperature, dim=-1)
        lse1[b0:b0 + batch_size] = torch.logsumexp(logits, dim=-1)
    save_file({"values": values, "indices": indices, "lse": lse, "lse1": lse1, "ids": ids.to(torch.int64)},
              str(folder / "teacher.safetensors"))


def load_teacher(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "teacher.safetensors"))


def kl_topk(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher_T || student_T) on the teacher's top-k tokens plus a tail bin, nats."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q.gather(-1, indices.long())
    log_p_top = values / temperature - lse.unsqueeze(-1)
    p_top = log_p_top.exp()
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(1e-12)
    q_tail = (1.0 - log_q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_top * (log_p_top - log_q_top)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return kl.mean()
