"""HQQ (docs/METHODS.md §7) and SmoothQuant (docs/METHODS.md §6) per-layer algorithms."""

from __future__ import annotations

import pytest
import torch

from qflow.quant import affine
from qflow.quant.algos.hqq import HQQResult, hqq_quantize, shrink_lp
from qflow.quant.algos.smoothquant import (
    fold_into_norm,
    quantize_activation,
    quantize_weight_per_channel_int8,
    scale_linear_inputs,
    smooth_scales,
)
from qflow.quant.spec import QuantSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one intra-op thread is faster and immune to oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hqq_spec(bits=4, G=64, **kw):
    return QuantSpec(bits=bits, group_size=G, scheme="asym_h", zero_float=True, **kw)


# ---------------------------------------------------------------- HQQ

def test_shrink_lp_values():
    x = torch.tensor([2.0, 0.05, -1.0])
    torch.testing.assert_close(shrink_lp(x, 10.0, 0.7), torch.tensor([1.918775, 0.0, -0.9]), atol=1e-6, rtol=0)
    torch.testing.assert_close(shrink_lp(x, 10.0, 1.0), torch.tensor([1.9, 0.0, -0.9]), atol=1e-6, rtol=0)
    z = shrink_lp(torch.zeros(3), 10.0, 0.7)
    assert torch.equal(z, torch.zeros(3))                  # |0|^(p-1) = inf must not give NaN


def _check_consistent(res: HQQResult, W, spec):
    assert res.codes.dtype == torch.uint8 and res.codes.shape == W.shape
    assert int(res.codes.max()) <= spec.qmax
    # stored params are what fp16 storage holds
    assert torch.equal(res.scale, res.scale.half().float())
    assert torch.equal(res.zero, res.zero.half().float())
    W_hat = affine.dequantize(res.codes, res.scale, res.zero, spec)
    assert float((W_hat - W).abs().mean()) == pytest.approx(res.final_error, rel=1e-6)
    # codes are the nearest levels of the stored grid
    s = affine._expand(res.scale, spec, tuple(W.shape))
    z = affine._expand(res.zero, spec, tuple(W.shape))
    assert torch.equal(res.codes.float(), torch.round(W / s + z).clamp(0, spec.qmax))


@pytest.mark.parametrize("seed", [0, 1])
def test_hqq_error_decreases_gaussian(seed):
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(seed))
    spec = _hqq_spec()
    res = hqq_quantize(W, spec)
    errs = res.errors
    assert len(errs) >= 2
    assert all(b <= a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]
    assert 0.076 < errs[0] < 0.080                         # min-max start (reference 0.0782)
    assert res.final_error <= errs[0] * 0.98                # reference: ~5% lower (0.0742)
    assert res.final_error == pytest.approx(errs[-1], rel=1e-3)
    assert res.scale.shape == (256, 8) == res.zero.shape
    _check_consistent(res, W, spec)
    # the start really is min-max with a rounded zero
    wg = W.reshape(256, 8, 64)
    lo, hi = wg.amin(-1), wg.amax(-1)
    torch.testing.assert_close(res.scale, ((hi - lo) / 15).half().float(), rtol=1e-3, atol=0)


def test_hqq_no_early_stop_keeps_best_and_partial_groups():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 200, generator=g) * 0.02
    W[0, :64] = 0.5                                         # constant group (range guard)
    spec = _hqq_spec(bits=3, G=64, pad_last_group=True)     # 200 = 3*64 + 8
    res = hqq_quantize(W, spec, iters=30, early_stop=False)
    assert len(res.errors) == 30
    assert res.final_error < res.errors[0]
    assert res.scale.shape == (48, 4)
    _check_consistent(res, W, spec)
    assert torch.allclose(affine.dequantize(res.codes, res.scale, res.zero, spec)[0, :64],
                          torch.full((64,), 0.5), atol=1e-3)
    # the partial group's zero comes from its 8 valid columns only: same as quantizing them alone
    spec8 = _hqq_spec(bits=3, G=8)
    alone = hqq_quantize(W[:, 192:], spec8, iters=30, early_stop=False)
    res2 = hqq_quantize(W, spec, iters=2, early_stop=False)
    alone2 = hqq_quantize(W[:, 192:], spec8, iters=2, early_stop=False)
    assert res2.errors[1] < res2.errors[0] and alone2.errors[1] < alone2.errors[0]
    torch.testing.assert_close(res2.scale[:, 3], alone2.scale[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(res2.zero[:, 3], alone2.zero[:, 0], rtol=0, atol=2e-3)
    assert alone.scale.shape == (48, 1)
    with pytest.raises(ValueError, match="group_size"):
        hqq_quantize(W, _hqq_spec(bits=3, G=64))


def test_hqq_does_not_mutate_and_rejects_symmetric():
    W = torch.randn(8, 64)
    W0 = W.clone()
    hqq_quantize(W, _hqq_spec(G=32))
    assert torch.equal(W, W0)
    with pytest.raises(ValueError):
        hqq_quantize(W, QuantSpec(bits=4, group_size=32, symmetric=True))


# ---------------------------------------------------------------- SmoothQuant

def test_smooth_scales_reference_example():
    xmax = torch.tensor([10.0, 1.0])
    W = torch.tensor([[1.0, -4.0], [-0.5, 2.0]])           # column maxima [1, 4]
    s = smooth_scales(xmax, [W], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([3.162278, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(xmax / s, torch.tensor([3.162278, 2.0]), atol=1e-6, rtol=0)
    Ws = scale_linear_inputs(W, s)
    torch.testing.assert_close(Ws.abs().amax(dim=0), torch.tensor([3.162278, 2.0]), atol=1e-6, rtol=0)
    # fused linears: max over output rows AND over the linears (per input channel)
    W2 = torch.tensor([[3.0, 0.1]])
    s2 = smooth_scales(xmax, [W, W2], alpha=0.5)
    torch.testing.assert_close(s2, torch.sqrt(xmax) / torch.sqrt(torch.tensor([3.0, 4.0])))
    # clamps: zero weight column and zero activation channel
    s3 = smooth_scales(torch.tensor([0.0, 1.0]), [torch.zeros(2, 2)], alpha=0.5)
    assert torch.all(s3 >= 1e-5) and torch.isfinite(s3).all()


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_preserves_fp64_outputs(with_bias):
    g = torch.Generator().manual_seed(0)
    d, n = 32, 50
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    gamma = torch.rand(d, dtype=torch.float64, generator=g) + 0.5
    gamma[5] = 40.0                                          # an outlier channel after the norm
    beta = torch.randn(d, dtype=torch.float64, generator=g) if with_bias else None
    Wq = torch.randn(48, d, dtype=torch.float64, generator=g)
    Wk = torch.randn(16, d, dtype=torch.float64, generator=g)
    bq = torch.randn(48, dtype=torch.float64, generator=g)

    def block(gm, bt, wq, wk):
        h = torch.nn.functional.layer_norm(x, (d,), gm, bt)
        return torch.cat([h @ wq.t() + bq, h @ wk.t()], dim=1), h

    ref, h = block(gamma, beta, Wq, Wk)
    s = smooth_scales(h.abs().amax(dim=0), [Wq, Wk], alpha=0.5)
    assert s.dtype == torch.float64
    inputs = [t.clone() for t in (gamma, Wq, Wk)]
    g2, b2 = fold_into_norm(gamma, beta, s)
    out, h2 = block(g2, b2, scale_linear_inputs(Wq, s), scale_linear_inputs(Wk, s))
    assert ((out - ref).norm() / ref.norm()) <= 1e-12
    assert (b2 is None) == (beta is None)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (gamma, Wq, Wk)))    # no in-place mutation
    # smoothing flattened the outlier channel of the activations
    assert h2.abs().amax(dim=0)[5] < h.abs().amax(dim=0)[5] / 3


def test_alpha_extremes():
    g = torch.Generator().manual_seed(1)
    xmax = torch.rand(16, generator=g) * 10 + 0.1
    W = torch.randn(24, 16, generator=g)
    s1 = smooth_scales(xmax, [W], alpha=1.0)
    torch.testing.assert_close(s1, xmax)
    torch.testing.assert_close(xmax / s1, torch.ones(16))
    s0 = smooth_scales(xmax, [W], alpha=0.0)
    torch.testing.assert_close(scale_linear_inputs(W, s0).abs().amax(dim=0), torch.ones(16))


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_activation_quant_sym_r(granularity):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 40, generator=g) * torch.rand(3, 7, 1, generator=g) * 5
    x[0, 0] = 0.0                                            # an all-zero token
    x0 = x.clone()
    xh = quantize_activation(x, bits=8, granularity=granularity)
    assert torch.equal(x, x0) and xh.shape == x.shape and xh.dtype == x.dtype
    amax = x.abs().amax(dim=-1, keepdim=True) if granularity == "token" else x.abs().amax()
    s = amax.clamp(min=1e-5) / 127
    q = xh / s
    assert torch.allclose(q, q.round(), atol=1e-3)          # integers times the scale
    assert q.round().abs().max() <= 127
    assert torch.all((xh - x).abs() <= s / 2 + 1e-6)
    assert torch.equal(xh, torch.round(x / s) * s)
    assert not xh[0, 0].any()
    # 4-bit activations use qmax 7
    x4 = quantize_activation(x, bits=4, granularity=granularity)
    assert (x4 / (amax.clamp(min=1e-5) / 7)).round().abs().max() <= 7


def test_weight_int8_per_channel():
    W = torch.randn(12, 30, generator=torch.Generator().manual_seed(6))
    codes, scale, zero = quantize_weight_per_channel_int8(W)
    spec = QuantSpec(bits=8, group_size=-1, scheme="sym_r")
    assert codes.dtype == torch.uint8 and scale.shape == (12, 1) and torch.all(zero == 128)
    assert int(codes.min()) >= 1 and int(codes.max()) <= 255
    torch.testing.assert_close(scale, (W.abs().amax(dim=1, keepdim=True) / 127).half().float(), rtol=0, atol=0)
    W_hat = affine.dequantize(codes, scale, zero, spec)
    assert torch.all((W_hat - W).abs() <= scale / 2 * (1 + 1e-3) + 1e-7)
