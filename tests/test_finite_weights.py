"""The NaN/Inf weight scan reads in chunks: every chunk is checked, for every float dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from qflow.models.finite import nonfinite_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_chunked_scan_counts_every_bad_value(tmp_path, dtype):
    a = torch.randn(37, 11).to(dtype)
    b = torch.randn(5, 3).to(dtype)
    a.view(-1)[-1] = float("nan")         # the last element of the last chunk
    a.view(-1)[100] = float("inf")
    a.view(-1)[101] = float("-inf")
    save_file({"a.weight": a, "b.weight": b, "ids": torch.arange(7)}, str(tmp_path / "model.safetensors"))
    for chunk in (7, 64, 1 << 20):        # smaller than one element, ragged, whole tensor
        assert nonfinite_tensors(tmp_path, chunk_bytes=chunk) == {"a.weight": (3, 37 * 11)}, chunk


def test_clean_model_passes(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    assert nonfinite_tensors(tmp_path, chunk_bytes=1000) == {}
