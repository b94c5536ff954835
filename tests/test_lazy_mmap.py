"""The lazy model's embedding is memory-mapped from the safetensors file, with the same outputs."""

from __future__ import annotations

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
