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
