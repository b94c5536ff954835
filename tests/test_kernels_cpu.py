"""numba CPU kernels (qflow.kernels.cpu) against the torch reference, bit for bit, and the dispatcher.

Property tests draw shapes, group sizes (partial last groups included),
schemes, bit widths, scale dtypes and value distributions; every float is
compared by its bit pattern.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qflow.errors import QflowError
from qflow.kernels import configure_numba, cpu
from qflow.quant import affine, dispatch, packing
from qflow.quant.dispatch import kernel_params, kernel_table
from qflow.quant.spec import QuantSpec

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (-1, 0, 8, 16, 32, 33, 50, 64, 128)
PROPERTY = settings(deadline=None, max_examples=120)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and float bit patterns (any NaN matches any NaN)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        return False
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and (a.view(np.int32)[~nan] == b.view(np.int32)[~nan]).all())


@st.composite
def int_specs(draw) -> QuantSpec:
    scheme = draw(st.sampled_from(["asym_z", "asym_a", "asym_h", "sym_f", "sym_r"]))
    return QuantSpec(bits=draw(st.sampled_from(BITS)), scheme=scheme, group_size=draw(st.sampled_from(GROUPS)),
                     zero_float=scheme in ("asym_a", "asym_h") and draw(st.booleans()),
                     scale_dtype=draw(st.sampled_from(["float16", "float32", "bfloat16"])), pad_last_group=True)


@st.composite
def lut_specs(draw) -> QuantSpec:
    return QuantSpec(format=draw(st.sampled_from(["nf4", "fp4"])), group_size=draw(st.sampled_from((8, 32, 50, 64))),
                     pad_last_group=True)


@st.composite
def weights(draw) -> np.ndarray:
    """Weights ``[rows, cols]`` from one of several distributions, edge cases included."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 260))
    kind = draw(st.sampled_from(["normal", "outliers", "positive", "constant", "grid", "tiny", "huge", "any"]))
    if kind == "any":  # arbitrary finite fp32 values (signed zeros, subnormals, fp32 max), small shapes
        return draw(hnp.arrays(np.float32, (rows, min(cols, 40)),
                               elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal((rows, cols))
    if kind == "outliers":
        w *= np.where(rng.random((rows, cols)) < 0.02, 50.0, 1.0) * 10.0 ** rng.uniform(-3, 3)
    elif kind == "positive":
        w = np.abs(w) + 0.1
    elif kind == "constant":
        w = np.full((rows, cols), rng.choice([0.0, -0.0, 0.37, -2.5]))
    elif kind == "grid":  # values on a coarse grid: exact halves after division, many ties
        w = np.round(w * 4) / 8
    elif kind == "tiny":  # scales that round to 0 in fp16 (-> the 2^-24 guard)
        w *= 1e-9
    elif kind == "huge":  # ranges that overflow fp16 (and sometimes fp32) scales
        w *= 1e37
    return w.astype(np.float32)


def reference(w: np.ndarray, spec: QuantSpec):
    tw = torch.from_numpy(w)
    scale, zero = affine.compute_params(tw, spec)
    codes = affine.quantize(tw, scale, zero, spec)
    return scale.numpy(), zero.numpy(), codes.numpy(), affine.dequantize(codes, scale, zero, spec).numpy()


def check_against_reference(w: np.ndarray, spec: QuantSpec) -> None:
    ref_scale, ref_zero, ref_codes, ref_w_hat = reference(w, spec)
    params, table = kernel_params(spec), kernel_table(spec)
    scale, zero = cpu.compute_params(w, params)
    assert same_bits(scale, ref_scale)
    assert same_bits(zero + np.float32(0), ref_zero + np.float32(0))  # the sign of a zero zero is free
    codes = cpu.quantize(w, scale, zero, params, table)
    np.testing.assert_array_equal(codes, ref_codes)
    assert same_bits(cpu.dequantize(codes, scale, zero, params, table), ref_w_hat)
    assert same_bits(cpu.fake_quant(w, params, table), ref_w_hat)
    packed = cpu.pack(codes, spec.bits)
    assert same_bits(cpu.dequantize_packed(packed, scale, zero, params, w.shape[1], table), ref_w_hat)


# ---- bit-exactness with qflow.quant.affine ---------------------------------------

@PROPERTY
@given(w=weights(), spec=int_specs())
def test_affine_matches_reference(w, spec):
    check_against_reference(w, spec)


@PROPERTY
@given(w=weights(), spec=lut_specs())
def test_lut_matches_reference(w, spec):
    check_against_reference(w, spec)


@settings(deadline=None, max_examples=60)
@given(w=weights(), spec=st.one_of(int_specs(), lut_specs()))
def test_fake_quant_is_dequantize_of_quantize(w, spec):
    params, table = kernel_params(spec), kernel_table(spec)
    scale, zero = cpu.compute_params(w, params)
    w_hat = cpu.dequantize(cpu.quantize(w, scale, zero, params, table), scale, zero, params, table)
    assert same_bits(cpu.fake_quant(w, params, table), w_hat)


@settings(deadline=None, max_examples=60)
@given(w=weights(), spec=int_specs())
def test_dequantize_matches_float64(w, spec):
    """Integer zeros: ``(code - zero)`` is exact, so the fp32 result is the float64 product rounded once."""
    if affine.has_float_zero(spec):
        spec = spec.model_copy(update={"zero_float": False})
    params = kernel_params(spec)
    scale, zero = cpu.compute_params(w, params)
    codes = cpu.quantize(w, scale, zero, params)
    group = spec.group_size if spec.group_size > 0 else w.shape[1]
    expand = (lambda p: np.repeat(p.astype(np.float64), group, axis=1)[:, :w.shape[1]]) if spec.group_size \
        else (lambda p: np.full(w.shape, np.float64(p[0, 0])))
    expected = ((codes.astype(np.float64) - expand(zero)) * expand(scale)).astype(np.float32)
    assert same_bits(cpu.dequantize(codes, scale, zero, params), expected)


def test_round_half_to_even():
    """ASYM-Z, s = 0.25 exactly: w/s lands on k + 0.5 and rounds to the even neighbour."""
    spec = QuantSpec(bits=4, group_size=-1, scale_dtype="float32")
    w = np.array([[-1.75, 2.0] + [(k + 0.5) * 0.25 for k in range(-7, 8)]], np.float32)
    scale, zero = cpu.compute_params(w, kernel_params(spec))
    assert (scale[0, 0], zero[0, 0]) == (0.25, 7.0)
    codes = cpu.quantize(w, scale, zero, kernel_params(spec))
    expected = np.clip(np.rint(w.astype(np.float64) / 0.25) + 7, 0, 15)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(codes, reference(w, spec)[2])


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_lut_ties_take_lowest_index(fmt):
    """At fp32 midpoints between neighbouring table entries, equal distances pick the lower code."""
    spec = QuantSpec(format=fmt, group_size=64, pad_last_group=True)
    table = kernel_table(spec)
    order = np.argsort(table, kind="stable")
    mids = [(table[a] + table[b]) / np.float32(2) for a, b in zip(order[:-1], order[1:])]
    w = np.array([[1.0, *mids]], np.float32)  # absmax 1: w / scale == w
    codes = cpu.quantize(w, *cpu.compute_params(w, kernel_params(spec)), kernel_params(spec), table)
    np.testing.assert_array_equal(codes, reference(w, spec)[2])
    dist = np.abs(w[0, :, None] - table[None, :])
    np.testing.assert_array_equal(codes[0], np.argmin(dist, axis=1))  # numpy argmin: first minimum too


# ---- packing ----------------------------------------------------------------------

@PROPERTY
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 4), cols=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)  # high bits set: pack masks them
    packed = cpu.pack(codes, bits)
    np.testing.assert_array_equal(packed, packing.pack_reference(torch.from_numpy(codes), bits).numpy())
    np.testing.assert_array_equal(cpu.unpack(packed, bits, cols), codes & ((1 << bits) - 1))


@PROPERTY
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 4), words=st.integers(1, 30), data=st.data())
def test_unpack_any_words_matches_reference(bits, rows, words, data):
    """Arbitrary int32 words (spare bits set, trailing padding words) unpack like the reference."""
    packed = data.draw(hnp.arrays(np.int32, (rows, words)))
    cols = data.draw(st.integers(1, words * (32 // bits)))
    ref = packing.unpack_reference(torch.from_numpy(packed), bits, cols).numpy()
    np.testing.assert_array_equal(cpu.unpack(packed, bits, cols), ref)


def test_pack_layout_examples():
    assert cpu.pack(np.arange(1, 9, dtype=np.uint8)[None], 4).view(np.uint32)[0, 0] == 0x87654321
    assert cpu.pack(np.full((1, 10), 7, np.uint8), 3).view(np.uint32)[0, 0] == 0x3FFFFFFF  # bits 30-31 stay 0
    assert cpu.pack(np.array([[1, 2, 3]], np.uint8), 8).view(np.uint32)[0, 0] == 0x030201  # padding fields 0


@pytest.mark.parametrize("call, message", [
    (lambda: cpu.pack(np.zeros((1, 8), np.uint8), 7), "bits"),
    (lambda: cpu.unpack(np.zeros((1, 1), np.int32), 4, 9), "fewer than 9"),
    (lambda: cpu.quantize(np.zeros((2, 64), np.float32), np.ones((2, 1), np.float32), np.zeros((2, 1), np.float32),
                          kernel_params(QuantSpec(bits=4, group_size=32))), "n_groups"),
    (lambda: cpu.dequantize(np.zeros((2, 8), np.uint8), np.ones((1, 2), np.float32), np.ones((1, 2), np.float32),
                            kernel_params(QuantSpec(bits=4, group_size=0))), "one value"),
    (lambda: cpu.compute_params(np.zeros(8, np.float32), kernel_params(QuantSpec(bits=4, group_size=8))), "2-D"),
])
def test_bad_shapes_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_warmup_runs_every_kernel(tmp_path):
    """In a fresh process (nothing compiled yet), warmup() compiles or loads every numba kernel variant."""
    code = ("from qflow.kernels import cpu\n"
            "from qflow.quant.warmup import warmup\n"
            "assert cpu.compiled_variants() == [], cpu.compiled_variants()\n"
            "done = warmup()\n"
            "assert done == cpu.kernel_variants(), sorted(set(cpu.kernel_variants()) - set(done))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kernel_variants_cover_every_op_and_bit_width():
    """The list warmup is held to is complete: each op at each packing width, affine and lookup."""
    variants = set(cpu.kernel_variants())
    for bits in BITS:
        assert {f"pack[{bits}]", f"unpack[{bits}]", f"dequantize_packed[{bits}, affine]"} <= variants
    for op in ("quantize", "dequantize", "fake_quant"):
        assert {f"{op}[affine]", f"{op}[lookup]"} <= variants
    assert {"group_range", "raw_params", "zero_points", "dequantize_packed[4, lookup]"} <= variants
    assert len(variants) == 28


@pytest.mark.parametrize("params, message", [
    (dict(bits=7), "bits"),
    (dict(group_size=-2), "group_size"),
    (dict(lookup=1), "lookup"),            # a table index with an affine scheme
    (dict(float_zero=True), "float zero"),  # asym_z has an integer zero
])
def test_kernel_params_are_checked(params, message):
    base = kernel_params(QuantSpec(bits=4, group_size=8))
    with pytest.raises(ValueError, match=message):
        cpu.compute_params(np.ones((1, 8), np.float32), base._replace(**params))


def test_lookup_format_needs_its_table():
    spec = QuantSpec(format="nf4", group_size=8)
    w = np.ones((1, 8), np.float32)
    scale, zero = cpu.compute_params(w, kernel_params(spec))
    with pytest.raises(ValueError, match="table="):
        cpu.quantize(w, scale, zero, kernel_params(spec))
    with pytest.raises(ValueError, match="16 code values"):
        cpu.dequantize(np.zeros((1, 8), np.uint8), scale, zero, kernel_params(spec), np.zeros(8, np.float32))


# ---- dispatcher -------------------------------------------------------------------

def test_backend_choice(monkeypatch):
    w = torch.randn(4, 64)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert dispatch.backend_for("quantize", w) == "numba"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert dispatch.backend_for("dequantize_packed", w) == "torch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "tpu")
    with pytest.raises(QflowError, match="QFLOW_KERNEL_BACKEND"):
        dispatch.backend_for("pack", w)
    with pytest.raises(ValueError, match="unknown kernel op"):
        dispatch.backend_for("gemm", w)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fall-through")
def test_no_cuda_kernels_without_gpu():
    assert dispatch._cuda_kernels() is None


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=64), QuantSpec(bits=3, group_size=50, pad_last_group=True),
                                  QuantSpec(format="nf4", group_size=64)], ids=str)
def test_dispatch_numba_equals_torch(monkeypatch, spec):
    w = torch.from_numpy(np.random.default_rng(3).standard_normal((16, 200), dtype=np.float32))
    results = {}
    for backend in ("torch", "numba"):
        monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
        scale, zero = dispatch.compute_params(w, spec)
        codes = dispatch.quantize(w, scale, zero, spec)
        packed = dispatch.pack(codes, spec.bits)
        results[backend] = [scale, zero, codes, packed, dispatch.unpack(packed, spec.bits, 200),
                            dispatch.dequantize(codes, scale, zero, spec), dispatch.fake_quant(w, spec),
                            dispatch.dequantize_packed(packed, scale, zero, spec, 200)]
    for a, b in zip(results["torch"], results["numba"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                           b.view(torch.int32) if b.is_floating_point() else b)


def test_numba_cache_dir_default_and_user_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("QFLOW_RUNS_DIR", str(tmp_path))
    configure_numba()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/elsewhere")
    configure_numba()
    assert os.environ["NUMBA_CACHE_DIR"] == "/elsewhere"


def test_import_qflow_does_not_import_numba(tmp_path):
    code = ("import sys, qflow, qflow.kernels, qflow.quant.dispatch, qflow.quant.ir\n"
            "assert 'numba' not in sys.modules, 'numba imported eagerly'\n"
            "import qflow.kernels.cpu, numba.core.config as c, os\n"
            "assert c.CACHE_DIR == os.path.join(sys.argv[1], 'numba'), c.CACHE_DIR\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"QFLOW_RUNS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
