"""The lazy model's embedding is memory-mapped from the safetensors file, with the same outputs."""

from __future__ import annotations

import pytest
import torch

from qflow.models import lazy


def test_mapped_embedding_gives_the_same_logits(tiny_model_dir, monkeypatch):
    from qflow.models.loading import load_model

    monkeypatch.setattr(lazy, "MAP_MIN_BYTES", 0)
    net, adapter = lazy.load_model_lazy(tiny_model_dir, dtype="float32", attn_implementation="eager")
    emb = net.get_input_embeddings().weight
    assert not emb.untyped_storage().resizable()           # a numpy memmap's buffer, not torch's own storage
    assert net.get_output_embeddings().weight is emb        # still tied
    loader = lazy.block_loader(net)
    for i in range(len(adapter.blocks())):
        loader.load(i)
    whole, _ = load_model(tiny_model_dir, dtype="float32")
    ids = torch.randint(0, emb.shape[0], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, whole(input_ids=ids).logits)


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return -1


def test_paging_out_the_mapped_embedding_keeps_its_values(tiny_model_dir, monkeypatch):
    """run_blockwise pages the mapped embedding out after block 0's inputs: same values after."""
    monkeypatch.setattr(lazy, "MAP_MIN_BYTES", 0)
    net, _ = lazy.load_model_lazy(tiny_model_dir, dtype="float32", attn_implementation="eager")
    loader = lazy.block_loader(net)
    emb = net.get_input_embeddings().weight
    assert len(loader.mapped) == 2                           # MAP_MIN_BYTES 0: the (tied) embedding once, the norm
    before = emb.clone()
    assert loader.page_out_mapped() >= emb.numel() * emb.element_size()
    assert torch.equal(emb, before)                          # faulted back from the file


def test_page_out_lowers_the_resident_file_pages(tmp_path):
    import numpy as np
    import sys

    if not sys.platform.startswith("linux"):
        return
    path = tmp_path / "table.bin"
    np.arange(16 * 2**20 // 4, dtype=np.float32).tofile(path)          # 16 MiB
    array = np.memmap(path, dtype=np.float32, mode="c")
    start = _rss_file_kib()
    total = float(torch.from_numpy(array).sum())                        # every page resident
    touched = _rss_file_kib()
    lazy.page_out([array])
    after = _rss_file_kib()
    assert touched - start >= 12 * 1024, (start, touched)
    assert after <= touched - 12 * 1024, (touched, after)              # the kernel took them back
    assert float(torch.from_numpy(array).sum()) == total



_MMAP_CHECK = """
import ctypes, sys, torch
from qflow.models import lazy

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
try:
    info = ctypes.CDLL("libc.so.6").mallinfo2
except (OSError, AttributeError):
    sys.exit(3)
info.restype = MallInfo2
x = torch.ones(6 << 20); del x   # a freed 24 MiB mapping raises glibc's dynamic threshold past 3 MiB
if sys.argv[1] == "fix":
    assert lazy.fix_mmap_threshold() is True
before = info().hblks
big = [torch.ones(3 << 18) for _ in range(4)]   # 3 MiB each
print(info().hblks - before)
"""


@pytest.mark.parametrize("fix", ["fix", "default"])
def test_fixed_mmap_threshold_maps_each_large_tensor(fix):
    """After ``fix_mmap_threshold`` every tensor of 1 MiB or more is its own mapping (returned to the OS
    when freed), even once glibc's dynamic threshold has risen; without it they come from the heap."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MMAP_CHECK, fix], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        pytest.skip("not glibc >= 2.33")
    assert proc.returncode == 0, proc.stderr
    mapped = int(proc.stdout.split()[-1])
    assert mapped == (4 if fix == "fix" else 0)
