"""docs/METHODS.md §1 (affine core) tests 1-5, §2.1 internal packing, §3 RTN quality, on every CPU backend.

Each numeric test runs through ``qflow.quant.dispatch`` twice: forced to the
torch reference and forced to the numba kernels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qflow.quant import dispatch
from qflow.quant import affine
from qflow.quant.spec import QuantSpec, gguf_bpw
from qflow.quant.sqnr import sqnr_db, sqnr_from_sums


@pytest.fixture(params=["torch", "numba"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv(dispatch.BACKEND_ENV, request.param)
    return request.param


def _run(w: list[float], **spec_kw):
    spec = QuantSpec(**spec_kw)
    t = torch.tensor([w], dtype=torch.float32)
    scale, zero = dispatch.compute_params(t, spec)
    codes = dispatch.quantize(t, scale, zero, spec)
    w_hat = dispatch.dequantize(codes, scale, zero, spec)
    assert torch.equal(dispatch.fake_quant(t, spec), w_hat)
    return scale.flatten().tolist(), zero.flatten().tolist(), codes.flatten().tolist(), w_hat.flatten().tolist()


# ---- §1 tests 1-4 (scale_dtype float32 so the printed scales are exact up to fp32) ----

def test_1_asym_z(backend):
    scale, zero, codes, w_hat = _run([-0.47, 0.0, 0.33, 1.03], bits=4, group_size=-1, scale_dtype="float32")
    assert scale == pytest.approx([0.1], abs=1e-7)
    assert zero == [5.0]
    assert codes == [0, 5, 8, 15]
    assert w_hat == pytest.approx([-0.5, 0.0, 0.3, 1.0], abs=1e-6)


def test_2_all_positive_group(backend):
    scale, zero, codes, w_hat = _run([0.2, 0.5, 1.7], bits=4, group_size=-1, scheme="asym_a", scale_dtype="float32")
    assert scale == pytest.approx([0.1], abs=1e-7)
    assert zero == [0.0]
    assert codes == [2, 5, 15]
    assert w_hat == pytest.approx([0.2, 0.5, 1.5], abs=1e-6)  # the top is clipped: reference behaviour
    scale, zero, _, w_hat = _run([0.2, 0.5, 1.7], bits=4, group_size=-1, scheme="asym_z", scale_dtype="float32")
    assert scale == pytest.approx([0.113333], abs=1e-6)
    assert zero == [0.0]
    assert w_hat == pytest.approx([0.226667, 0.453333, 1.7], abs=1e-6)


def test_3_symmetric(backend):
    scale, zero, codes, w_hat = _run([-1.4, 0.33, 0.75], bits=4, group_size=-1, scheme="sym_r", scale_dtype="float32")
    assert scale == pytest.approx([0.2], abs=1e-7)
    assert zero == [8.0]
    assert [c - 8 for c in codes] == [-7, 2, 4]  # signed q, stored unsigned with z = 8
    assert w_hat == pytest.approx([-1.4, 0.4, 0.8], abs=1e-6)
    scale, zero, codes, w_hat = _run([-1.4, 0.33, 0.75], bits=4, group_size=-1, scheme="sym_f", scale_dtype="float32")
    assert scale == pytest.approx([0.186667], abs=1e-6)
    assert zero == [8.0]
    assert codes == [0, 10, 12]  # GPTQ: -amax -> round(-7.5) = -8 -> code 0
    assert w_hat == pytest.approx([-1.493333, 0.373333, 0.746667], abs=1e-6)


def test_4_nf4_block(backend):
    w = [-2.0, 0.5, 1.0, 0.1, 1.5, -0.3]  # one partial block of 64
    scale, _, codes, w_hat = _run(w, format="nf4", group_size=64, pad_last_group=True)
    assert scale == [2.0]
    assert codes == [0, 10, 12, 8, 14, 5]
    assert w_hat == pytest.approx([-2.0, 0.492225, 0.881420, 0.159161, 1.445914, -0.369547], abs=1e-6)


# ---- §1 test 5: the bits-per-weight table ----

@pytest.mark.parametrize("spec_kw, bpw", [
    (dict(bits=4, group_size=128), 4.15625),                                # AWQ GEMM / GPTQ
    (dict(bits=4, group_size=128, symmetric=True), 4.125),                  # compressed-tensors sym
    (dict(bits=4, group_size=64, scheme="asym_h", zero_float=True), 4.5),   # HQQ
    (dict(format="nf4", group_size=64), 4.5),
    (dict(format="nf4", group_size=64, double_quant=True), 4 + 8 / 64 + 32 / (64 * 256)),
])
def test_5_bpw_table(spec_kw, bpw):
    assert QuantSpec(**spec_kw).bpw() == bpw


def test_5_bpw_nf4_double_quant_rounds_to_table():
    assert round(QuantSpec(format="nf4", group_size=64, double_quant=True).bpw(), 3) == 4.127


@pytest.mark.parametrize("name, bpw", [("Q4_0", 4.5), ("Q4_1", 5.0), ("Q8_0", 8.5),
                                       ("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.5625)])
def test_5_bpw_gguf(name, bpw):
    assert gguf_bpw(name) == bpw


# ---- §2.1 internal packing ----

def test_pack_codes_1_to_8_is_0x87654321(backend):
    packed = dispatch.pack(torch.arange(1, 9, dtype=torch.uint8)[None], 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert int(packed) & 0xFFFFFFFF == 0x87654321
    # byte variant: element 2j in the low nibble, 2j+1 in the high nibble
    assert packed.numpy().view(np.uint8).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert dispatch.unpack(packed, 4, 8).tolist() == [list(range(1, 9))]


# ---- §3 RTN ----

# ---- SQNR: one definition (qflow/quant/sqnr.py), torch or numpy ----

@pytest.mark.parametrize("lib", ["torch", "numpy"])
@pytest.mark.parametrize("signal, approx, expected", [
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], math.inf),      # no signal, no noise
    ([0.0, 0.0, 0.0], [0.0, 0.5, 0.0], -math.inf),     # no signal, some noise
    ([0.3, -1.0, 2.0], [0.3, -1.0, 2.0], math.inf),    # no noise
    ([1.0, 2.0], [1.0, 2.1], 26.9897),                 # 10 log10(5 / 0.01)
])
def test_sqnr_edges(lib, signal, approx, expected):
    y, y_hat = np.array(signal, np.float32), np.array(approx, np.float32)
    if lib == "torch":
        y, y_hat = torch.from_numpy(y), torch.from_numpy(y_hat)
    assert sqnr_db(y, y_hat) == pytest.approx(expected, abs=1e-3)


def test_sqnr_torch_and_numpy_agree_and_sums():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((16, 40)).astype(np.float32)
    y_hat = y + rng.standard_normal(y.shape).astype(np.float32) * 0.01
    from_torch = sqnr_db(torch.from_numpy(y), torch.from_numpy(y_hat))
    assert from_torch == pytest.approx(sqnr_db(y, y_hat), rel=1e-12)
    assert from_torch == pytest.approx(40.0, abs=0.5)
    signal = float((y.astype(np.float64) ** 2).sum())
    noise = float(((y.astype(np.float64) - y_hat) ** 2).sum())
    assert sqnr_from_sums(signal, noise) == pytest.approx(from_torch, rel=1e-12)
    assert sqnr_from_sums(0.0, 0.0) == math.inf and sqnr_from_sums(0.0, 1e-9) == -math.inf


@pytest.mark.parametrize("bits, target_db", [(8, 44.5), (4, 19.9)])
def test_rtn_sqnr_asym_z_g128(backend, bits, target_db):
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((256, 4096), dtype=np.float32))
    spec = QuantSpec(bits=bits, group_size=128)
    assert sqnr_db(w, dispatch.fake_quant(w, spec)) == pytest.approx(target_db, abs=0.5)


def test_rtn_per_channel_8bit_wide_rows(backend):
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 11008), dtype=np.float32))
    assert sqnr_db(w, dispatch.fake_quant(w, QuantSpec(bits=8, group_size=-1))) >= 40


@pytest.mark.parametrize("spec_kw", [
    dict(bits=4, group_size=128), dict(bits=3, group_size=64, scheme="asym_a"),
    dict(bits=4, group_size=32, scheme="sym_f"), dict(bits=8, group_size=-1, scheme="sym_r"),
    dict(bits=2, group_size=0), dict(bits=5, group_size=50, pad_last_group=True, scheme="asym_h", zero_float=True),
])
def test_rtn_error_bounded_by_half_step(backend, spec_kw):
    """|w - w_hat| <= s/2 wherever round(w/s) + z lies in the code range (float64 check)."""
    spec = QuantSpec(**spec_kw)
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((32, 300)) * rng.uniform(0.01, 3, size=(32, 1))).astype(np.float32)
    tw = torch.from_numpy(w)
    scale, zero = dispatch.compute_params(tw, spec)
    codes = dispatch.quantize(tw, scale, zero, spec).numpy().astype(np.float64)
    group = spec.group_size if spec.group_size > 0 else w.shape[1]
    s = np.repeat(scale.numpy().astype(np.float64), group, axis=1)[:, :w.shape[1]]
    z = np.repeat(zero.numpy().astype(np.float64), group, axis=1)[:, :w.shape[1]]
    if spec.group_size == 0:
        s, z = np.broadcast_to(s[:1, :1], w.shape), np.broadcast_to(z[:1, :1], w.shape)
    err = np.abs(w.astype(np.float64) - (codes - z) * s)
    q = np.rint(w / s + z) if affine.has_float_zero(spec) else np.rint(w / s) + z
    unclipped = (q >= 0) & (q <= spec.qmax)
    assert unclipped.mean() > 0.9
    slack = 1e-4 * s  # w / s is rounded to fp32 (ulp ~ 1e-5 of a 255-step range) before rint
    assert (err[unclipped] <= s[unclipped] / 2 + slack[unclipped]).all()
    if spec.scheme == "asym_z":  # zero rounding can push the range ends out by s/2, never more
        assert (err <= s + slack).all()
