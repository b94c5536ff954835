"""AWQ (docs/METHODS.md §4 tests 1-4) on synthetic layers and tiny random Llamas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qflow.quant import dispatch
from qflow.models.adapters import get_adapter
from qflow.quant import affine
from qflow.quant.algos import awq
from qflow.quant.algos.awq import (AWQOptions, candidate_scales, clip_block, fold_block_scales,
                                   quantize_model_awq, search_block_scales, search_clip, search_scale)
from qflow.quant.algos.blockwise import Block, capture_block0_inputs, capture_block_kwargs
from qflow.models.quantized import apply_checkpoint
from qflow.quant.ir import Checkpoint, CheckpointWriter
from qflow.quant.spec import QuantSpec

from .test_blockwise import calib_ids, make_ctx, tiny_llama

ASYM_A4_G128 = QuantSpec(bits=4, group_size=128, scheme="asym_a")


def _outlier_problem(seed: int = 0, n: int = 2048, cin: int = 1024, cout: int = 512):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, generator=gen)
    x[:, torch.randperm(cin, generator=gen)[:10]] *= 50
    w = torch.randn(cout, cin, generator=gen) * 0.02
    lin = nn.Linear(cin, cout, bias=False)
    lin.weight.data = w
    return x, lin


def _blocks_with_inputs(model, ids, tmp_path):
    adapter = get_adapter(model)
    writer = CheckpointWriter(tmp_path / "ir", base_model="tiny", method="test")
    h = capture_block0_inputs(model, adapter, ids, batch_size=4)
    kwargs = capture_block_kwargs(model, adapter, ids)
    return adapter, writer, h, kwargs


def _block(adapter, writer, i, h, kwargs):
    return Block(index=i, name=adapter.block_name(i), module=adapter.blocks()[i], adapter=adapter, writer=writer,
                 inputs=h, kwargs=kwargs[i], batch_size=4, generator=torch.Generator(), records=[])


# ---- test 1: ratio 0 is RTN ----------------------------------------------------

def test_ratio_zero_is_identity_scale():
    x_mean = torch.rand(64) * 10 + 1e-3
    assert torch.equal(candidate_scales(x_mean, 0.0), torch.ones(64))


def test_ratio_zero_loss_equals_rtn_linear_site():
    x, lin = _outlier_problem(n=512, cin=256, cout=128)
    spec = QuantSpec(bits=4, group_size=64, scheme="asym_a")
    res = search_scale(lin, [lin], x, spec)
    with torch.no_grad():
        rtn = (x.double() @ (lin.weight.double() - dispatch.fake_quant(lin.weight, spec).double()).T).pow(2).mean()
    assert res.losses[0] == pytest.approx(float(rtn), rel=1e-6)
    assert min(res.losses) <= res.losses[0]
    assert len(res.losses) == 20


def test_ratio_zero_loss_equals_rtn_nonlinear_site():
    """MLP loss module (gate/up scaled): loss_0 is the RTN loss exactly, best <= RTN, weights restored."""
    model = tiny_llama(layers=1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(6, 16, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=32, scheme="asym_a")
    before = [mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone()]
    with torch.no_grad():
        y_ref = mlp(x)
        res = search_scale(mlp, [mlp.gate_proj, mlp.up_proj], x, spec, batch_size=4)
        assert torch.equal(mlp.gate_proj.weight, before[0]) and torch.equal(mlp.up_proj.weight, before[1])
        mlp.gate_proj.weight.data = dispatch.fake_quant(before[0], spec)
        mlp.up_proj.weight.data = dispatch.fake_quant(before[1], spec)
        rtn = float((y_ref - mlp(x)).double().pow(2).mean())
    assert res.losses[0] == pytest.approx(rtn, rel=1e-6)
    assert min(res.losses) <= rtn


def test_gram_loss_matches_forward_loss():
    """The linear-site shortcut sum((dW G) * dW) equals the forward-pass MSE for every ratio."""
    x, lin = _outlier_problem(n=512, cin=256, cout=64, seed=3)
    spec = QuantSpec(bits=4, group_size=64, scheme="asym_a")
    fast = search_scale(lin, [lin], x, spec)
    slow = search_scale(nn.Sequential(lin), [lin], x, spec, batch_size=512)  # not the linear itself: forwards
    assert fast.losses == pytest.approx(slow.losses, rel=1e-4)
    assert fast.best_ratio == slow.best_ratio


# ---- test 3: synthetic outliers ------------------------------------------------------

def test_synthetic_outliers_halve_the_loss():
    x, lin = _outlier_problem()
    res = search_scale(lin, [lin], x, ASYM_A4_G128)
    rtn, best = res.losses[0], min(res.losses)
    assert best <= 0.5 * rtn, (best / rtn, res.best_ratio)
    assert res.best_ratio > 0
    # the first strict minimum
    assert res.losses.index(best) == round(res.best_ratio * 20)


def test_duo_scaling_changes_the_candidates():
    x, lin = _outlier_problem(n=256, cin=256, cout=64)
    spec = QuantSpec(bits=4, group_size=64, scheme="asym_a")
    plain = search_scale(lin, [lin], x, spec)
    duo = search_scale(lin, [lin], x, spec, duo_scaling=True)
    assert plain.losses[0] != duo.losses[0]  # ratio 0 is not the identity under duo scaling
    assert min(duo.losses) < duo.losses[0] or duo.best_ratio == 0


def test_no_finite_loss_is_an_error():
    from qflow.errors import StageError

    x, lin = _outlier_problem(n=64, cin=128, cout=64)
    x[0, 0] = float("nan")
    with pytest.raises(StageError, match="no finite loss"):
        search_scale(nn.Sequential(lin), [lin], x, QuantSpec(bits=4, group_size=64, scheme="asym_a"))


# ---- test 4: clip search ---------------------------------------------------------------

def test_clip_search_evaluates_ten_factors_and_never_increases_loss(monkeypatch):
    x, lin = _outlier_problem(n=4096, cin=512, cout=512, seed=1)
    w = lin.weight.data.clone()
    spec = QuantSpec(bits=4, group_size=128, scheme="asym_a")
    m0 = w.abs().reshape(512, 4, 128).amax(-1)
    seen = []
    real = dispatch.fake_quant

    def spy(t, s):
        rows = t.shape[0]
        r0 = 256 * (len(seen) // 10)  # 256-row batches, 10 factors each
        ratio = t.abs().reshape(rows, 4, 128).amax(-1) / m0[r0:r0 + rows]
        seen.append(float(ratio.mean()))
        return real(t, s)

    monkeypatch.setattr(dispatch, "fake_quant", spy)
    clip = search_clip(w, x, spec, row_batch=256)  # llm-awq's batching: 2 batches of 256 rows
    monkeypatch.setattr(dispatch, "fake_quant", real)
    whole = search_clip(w, x, spec)  # one batch: the same thresholds
    assert torch.equal(whole.max_val, clip.max_val)
    factors = [1 - i / 20 for i in range(10)]
    assert clip.factors == pytest.approx(factors)
    assert len(seen) == 20  # 2 row batches x 10 factors
    assert seen == pytest.approx(factors * 2, abs=1e-6)
    assert bool((clip.err_best <= clip.err_unclipped).all())
    # independent float64 recomputation of the per-group objective on the sampled tokens
    xs = awq.sample_tokens(x, 512).double()
    assert xs.shape[0] == 512

    def objective(wq):
        d = (wq.double() - w.double()).reshape(512, 4, 128)
        return float(torch.einsum("tgk,ogk->otg", xs.reshape(-1, 4, 128), d).pow(2).mean(1).sum())

    clipped = torch.maximum(torch.minimum(w.reshape(512, 4, 128), clip.max_val[..., None]), -clip.max_val[..., None])
    assert objective(affine.fake_quant(clipped.reshape(512, 512), spec)) <= objective(affine.fake_quant(w, spec))


def test_clip_sampling_step_guard():
    x = torch.randn(100, 8)
    assert awq.sample_tokens(x, 512).shape[0] == 100  # n_tok < 512: step 1, not 0
    assert awq.sample_tokens(torch.randn(2048, 8), 512).shape[0] == 512


# ---- sites and folding ---------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads,has_v_o", [(2, False), (4, True)])
def test_site_two_only_without_gqa(kv_heads, has_v_o):
    model = tiny_llama(layers=1, kv_heads=kv_heads)
    names = [s.name for s in get_adapter(model).awq_sites(model.model.layers[0])]
    assert ("v_o" in names) == has_v_o
    assert names[0] == "attn_in" and names[-1] == "up_down"


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folding_preserves_block_and_model_outputs(tmp_path, kv_heads):
    model = tiny_llama(layers=2, kv_heads=kv_heads)
    ids = calib_ids(8, 32)
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
        adapter, writer, h, kwargs = _blocks_with_inputs(model, ids, tmp_path)
        opts = AWQOptions(bits=3, group_size=32)
        for i in range(adapter.n_blocks()):
            block = _block(adapter, writer, i, h, kwargs)
            names = adapter.linear_names(block.module)
            acts = block.run(capture=names, outputs=True, module_outputs=["self_attn", "mlp"])
            searches = search_block_scales(block, opts, acts)
            assert any(r.best_ratio > 0 for _, r in searches)  # a non-trivial fold is exercised
            assert (len(searches) == 4) == (kv_heads == 4)
            changed = fold_block_scales(block, searches, acts.inputs)
            assert {n.rsplit(".", 2)[-2] for n, _ in changed} >= {"input_layernorm", "post_attention_layernorm"}
            after = block.run(outputs=True).outputs
            rel = float((after - acts.outputs).norm() / acts.outputs.norm())
            assert rel <= 1e-5, rel
            # the cached inputs were divided by s: they equal what the folded block now feeds its linears
            fresh = block.run(capture=names).inputs
            for key, cached in acts.inputs.items():
                assert torch.allclose(cached, fresh[key], rtol=1e-4, atol=1e-5), key
            h = acts.outputs
        logits = model(input_ids=ids).logits
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    assert rel <= 1e-4, rel


def test_clip_block_skips_query_and_key(tmp_path):
    model = tiny_llama(layers=1)
    ids = calib_ids(4, 32)
    adapter, writer, h, kwargs = _blocks_with_inputs(model, ids, tmp_path)
    block = _block(adapter, writer, 0, h, kwargs)
    acts = block.run(capture=adapter.linear_names(block.module))
    clipped = [name for name, _ in clip_block(block, AWQOptions(bits=3, group_size=32), acts.inputs)]
    assert clipped == ["self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


# ---- the whole model ---------------------------------------------------------------------------

def _logit_error(model_q, model_fp, ids):
    with torch.no_grad():
        ref = model_fp(input_ids=ids).logits
        out = model_q(input_ids=ids).logits
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def _rtn_model(model, spec):
    import copy

    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                mod.weight.data = dispatch.fake_quant(mod.weight.data, spec)
    return q


def test_awq_model_checkpoint_applies_and_beats_rtn(tmp_path):
    fp = tiny_llama(layers=2, seed=5)
    ids = calib_ids(16, 64, seed=2)
    work = tiny_llama(layers=2, seed=5)
    opts = AWQOptions(bits=3, group_size=32)
    res = quantize_model_awq(make_ctx(tmp_path), work, get_adapter(work), ids, opts, base_model="tiny",
                             batch_size=8)
    ckpt = Checkpoint(res.checkpoint_dir)
    assert ckpt.method == "awq" and len(ckpt.layers) == 14
    assert all(r.spec.scheme == "asym_a" for r in ckpt.layers.values())
    assert "model.layers.0.input_layernorm.weight" in ckpt.floats
    quant = apply_checkpoint(tiny_llama(layers=2, seed=5), ckpt, mode="dequant")
    err_awq = _logit_error(quant, fp, ids)
    err_rtn = _logit_error(_rtn_model(fp, opts.spec()), fp, ids)
    assert err_awq < err_rtn, (err_awq, err_rtn)
    assert any(r.get("best_ratio", 0) > 0 for r in res.records)


def test_awq_zero_point_false_uses_sym_r(tmp_path):
    work = tiny_llama(layers=1)
    res = quantize_model_awq(make_ctx(tmp_path), work, get_adapter(work), calib_ids(4, 32),
                             AWQOptions(bits=4, group_size=32, zero_point=False, n_grid=4), base_model="tiny")
    assert {r.spec.scheme for r in Checkpoint(res.checkpoint_dir).layers.values()} == {"sym_r"}


def test_awq_then_gptq_composition(tmp_path):
    fp = tiny_llama(layers=2, seed=5)
    ids = calib_ids(16, 64, seed=2)
    work = tiny_llama(layers=2, seed=5)
    opts = AWQOptions(bits=3, group_size=32, then="gptq", gptq={"act_order": False, "static_groups": False})
    res = quantize_model_awq(make_ctx(tmp_path), work, get_adapter(work), ids, opts, base_model="tiny")
    ckpt = Checkpoint(res.checkpoint_dir)
    assert ckpt.method == "awq+gptq" and len(ckpt.layers) == 14
    assert any("gptq_loss" in r for r in res.records)
    quant = apply_checkpoint(tiny_llama(layers=2, seed=5), ckpt, mode="dequant")
    assert _logit_error(quant, fp, ids) < _logit_error(_rtn_model(fp, opts.spec()), fp, ids)


def test_n_search_tokens_subsamples_whole_sequences():
    assert awq._search_rows(64, 512, None) is None
    rows = awq._search_rows(64, 512, 8192)
    assert rows.tolist() == torch.linspace(0, 63, 16).round().long().tolist()
    assert awq._search_rows(4, 512, 10**6) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_by_column_blocks_equals_the_fp64_product(dtype):
    torch.manual_seed(3)
    x = (torch.randn(3, 37, 70) * torch.linspace(0.1, 8, 70)).to(dtype)
    got = awq.gram(x, chunk_rows=16, chunk_cols=32)          # ragged row chunks and column blocks
    x64 = x.reshape(-1, 70).double()
    want = x64.t() @ x64
    assert got.dtype == torch.float32 and got.shape == (70, 70)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


# ---- streamed inputs (o_proj, down_proj: no [N, T, in] capture) ---------------------------------

@pytest.mark.parametrize("n_rows,n_clip", [(70, 16), (512, 512), (300, 1000), (1023, 512), (4096, 512)])
def test_sample_tokens_keeps_its_own_sample_whole(n_rows, n_clip):
    """The clip search re-samples what it is given: on a sample it already took, that is the identity."""
    x = torch.randn(n_rows, 3)
    once = awq.sample_tokens(x, n_clip)
    assert torch.equal(awq.sample_tokens(once, n_clip), once)


@pytest.mark.parametrize("batches", [[70], [16, 16, 16, 22], [5, 33, 1, 31]])
def test_streamed_input_equals_the_whole_input(batches):
    torch.manual_seed(5)
    x = torch.randn(sum(batches), 48) * torch.linspace(0.1, 6, 48)
    st = awq.StreamedInput(48, x.shape[0], 16, want_gram=True, chunk_rows=8, chunk_cols=20)
    r0 = 0
    for b in batches:
        st.add(x[r0:r0 + b])
        r0 += b
    st.check_complete("test")
    assert torch.equal(st.sample, awq.sample_tokens(x, 16))           # the same rows, in order
    torch.testing.assert_close(st.mean(), awq.act_mean(x), rtol=1e-7, atol=0)
    whole = awq.gram(x, chunk_rows=8, chunk_cols=20)
    if len(batches) == 1:
        assert torch.equal(st.gram, whole)
    else:   # rounded to fp32 once per mini-batch
        torch.testing.assert_close(st.gram, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))


def test_streamed_input_counts_rows():
    st = awq.StreamedInput(4, 10, 4, want_gram=False)
    st.add(torch.randn(6, 4))
    assert st.gram is None
    with pytest.raises(Exception, match="streamed 6 input rows, expected 10"):
        st.check_complete("model.layers.0.mlp.down_proj")


def test_linear_loss_in_row_chunks_equals_the_whole_weight(monkeypatch):
    x, lin = _outlier_problem(n=512, cin=256, cout=96, seed=4)
    spec = QuantSpec(bits=3, group_size=64, scheme="asym_a")
    whole = search_scale(lin, [lin], x, spec)
    g, mean = awq.gram(x), awq.act_mean(x)
    # without x: the Gram matrix, the column means and the row count are enough
    streamed = search_scale(lin, [lin], None, spec, x_gram=g, x_mean=mean, n_rows=512)
    assert streamed.losses == whole.losses and torch.equal(streamed.scales, whole.scales)
    monkeypatch.setattr(awq, "LINEAR_LOSS_CHUNK_ELEMENTS", 40 * 256)   # ragged chunks: 40, 40, 16 rows
    chunked = search_scale(lin, [lin], x, spec)
    assert chunked.losses == pytest.approx(whole.losses, rel=1e-6)
    assert chunked.best_ratio == whole.best_ratio
    with pytest.raises(ValueError, match="without x"):
        search_scale(nn.Sequential(lin), [lin], None, spec, x_gram=g, x_mean=mean, n_rows=512)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_streamed_block_search_equals_the_captured_one(tmp_path, kv_heads):
    """awq_block streams o_proj/down_proj's inputs; its searches and clip inputs match a full capture."""
    model = tiny_llama(layers=1, kv_heads=kv_heads)
    ids = calib_ids(8, 32)
    opts = AWQOptions(bits=3, group_size=32, n_clip_tokens=64)
    with torch.no_grad():
        adapter, writer, h, kwargs = _blocks_with_inputs(model, ids, tmp_path)
        block = _block(adapter, writer, 0, h, kwargs)     # mini-batches of 4: two per pass
        names = adapter.linear_names(block.module)
        spec = lambda rel: opts.spec()
        acts = block.run(capture=names, module_outputs=["self_attn", "mlp"])
        want = search_block_scales(block, opts, acts, spec)
        streamed = awq.streamable_inputs(block, names, spec, opts.n_clip_tokens)
        assert set(streamed) == {"self_attn.o_proj", "mlp.down_proj"}
        assert (streamed["self_attn.o_proj"].gram is not None) == (kv_heads == 4)   # the v->o site
        canon = adapter.canonical_input
        acts2 = block.run(capture=[n for n in names if canon(n) not in streamed], stream=list(streamed),
                          on_input=lambda rel, x2: streamed[canon(rel)].add(x2))
        assert not set(streamed) & set(acts2.inputs)
        assert not acts2.module_outputs
        got = search_block_scales(block, opts, acts2, spec, streamed)   # y_ref recomputed per site
    assert [s.name for s, _ in got] == [s.name for s, _ in want]
    for (site, a), (_, b) in zip(want, got):
        assert a.best_ratio == b.best_ratio, site.name
        if site.name in ("attn_in", "mlp_in"):   # forward-based: the module alone = the block pass, bit for bit
            assert a.losses == b.losses, site.name
        assert a.losses == pytest.approx(b.losses, rel=1e-5), site.name
    for key, st in streamed.items():
        assert torch.equal(st.sample, awq.sample_tokens(acts.inputs[key], opts.n_clip_tokens)), key
    # awq_block's setting: once no later site reads a captured input, only its clip rows stay
    with torch.no_grad():
        acts3 = block.run(capture=names)
        full = {k: v.clone() for k, v in acts3.inputs.items()}
        again = search_block_scales(block, opts, acts3, spec, keep_clip_rows_only=True, inputs_shape=tuple(h.shape))
    assert [r.best_ratio for _, r in again] == [r.best_ratio for _, r in want]
    site_inputs = {adapter.canonical_input(s.input_of) for s, _ in want}
    for key, x in full.items():   # a site's input is cut to its clip rows after its search; others stay whole
        expect = awq.sample_tokens(x, opts.n_clip_tokens) if key in site_inputs else x
        assert torch.equal(acts3.inputs[key], expect), key
