"""Evaluate's logits a chunk of positions at a time (large vocabularies): same metrics, no full-batch logits."""

from __future__ import annotations

import pytest
import torch

from qflow.evaluation import lm

VOCAB = 150_000          # a large vocabulary on a tiny body: logits dominate memory, as for 128k-262k models


def _tiny(vocab: int = VOCAB, seed: int = 0, model_type: str = "llama"):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    if model_type == "gemma2":
        kw |= dict(head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=None, sliding_window=64)
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def models_and_ids():
    fp = _tiny()
    q = _tiny()
    with torch.no_grad():
        for n, p in q.named_parameters():
            if ".layers." in n and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(2))
    return fp, q, ids


def test_chunked_equals_unchunked(models_and_ids, monkeypatch):
    fp, q, ids = models_and_ids
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 7 * VOCAB)         # several chunks per window
    ref_full = lm.float_reference(fp, ids, batch_size=2, topk=16, chunked=False)
    ref_chunk = lm.float_reference(fp, ids, batch_size=2, topk=16)
    assert torch.equal(ref_full.topk_idx, ref_chunk.topk_idx)
    assert torch.allclose(ref_full.nll, ref_chunk.nll, rtol=0, atol=1e-5)
    full = lm.summarize(lm.compare_to_reference(q, ids, ref_full, batch_size=2, topk=16, fp_model=fp, chunked=False))
    chunk = lm.summarize(lm.compare_to_reference(q, ids, ref_chunk, batch_size=2, topk=16, fp_model=fp))
    assert full.keys() == chunk.keys()
    for k in full:
        assert chunk[k] == pytest.approx(full[k], rel=1e-6, abs=1e-7), k


def test_no_full_batch_logits_when_chunked(models_and_ids, monkeypatch):
    """Only the 16-token probe ever asks the model for its logits; the batches go through the split head."""
    fp, q, ids = models_and_ids
    seen = []
    original = lm._next_token_logits

    def spy(model, batch):
        seen.append(tuple(batch.shape))
        return original(model, batch)

    monkeypatch.setattr(lm, "_next_token_logits", spy)
    ref = lm.float_reference(fp, ids, batch_size=3, topk=8)
    lm.compare_to_reference(q, ids, ref, batch_size=3, topk=8, fp_model=fp)
    assert seen and all(shape == (1, 16) for shape in seen), seen


def test_softcapped_head_is_split_and_an_unknown_transform_falls_back(monkeypatch):
    gemma = _tiny(vocab=5000, model_type="gemma2")
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(3))
    assert lm.logit_source(gemma, ids) is not None                     # c·tanh(x/c) reproduced
    llama = _tiny(vocab=5000)
    assert lm.logit_source(llama, ids) is not None
    llama.config.final_logit_softcapping = 1.0                          # Llama's forward ignores it: split differs
    assert lm.logit_source(llama, ids) is None
    ref = lm.float_reference(llama, ids, batch_size=2, topk=8)          # falls back to the full logits, same numbers
    assert torch.equal(ref.topk_idx, lm.float_reference(llama, ids, batch_size=2, topk=8, chunked=False).topk_idx)


def test_cached_float_hidden_gives_the_same_kl_without_a_float_forward(models_and_ids, tmp_path, monkeypatch):
    """The exact KL from the reference's cached float hidden states equals the one from a float forward per batch,
    and the float body never runs again; the cache survives save/load and is skipped above its size cap."""
    fp, q, ids = models_and_ids
    kept = lm.float_reference(fp, ids, batch_size=2, topk=16)
    assert kept.hidden is not None and kept.hidden.shape == (3, 39, 64)
    kept.save(tmp_path)
    kept = lm.FloatReference.load(tmp_path)
    plain = lm.float_reference(fp, ids, batch_size=2, topk=16, keep_hidden=False)
    assert plain.hidden is None
    calls = []
    handle = fp.get_decoder().register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        cached = lm.compare_to_reference(q, ids, kept, batch_size=2, topk=16, fp_model=fp)
        n_cached = len(calls)
        forward = lm.compare_to_reference(q, ids, plain, batch_size=2, topk=16, fp_model=fp)
    finally:
        handle.remove()
    assert all(shape == (1, 16) for shape in calls[:n_cached])          # the split probe only
    assert (2, 40) in calls[n_cached:]                                  # the fallback runs the float body per batch
    assert torch.allclose(cached.kl, forward.kl, rtol=1e-6, atol=1e-9)
    monkeypatch.setattr(lm, "HIDDEN_CACHE_BYTES", 100)
    assert lm.float_reference(fp, ids, batch_size=2, topk=16).hidden is None
