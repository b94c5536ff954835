"""GPTQ per-layer algorithm (docs/METHODS.md §5)."""

from __future__ import annotations

import pytest
import torch

from qflow.quant import affine
from qflow.quant.algos.gptq import GPTQResult, HessianAccumulator, dequantize_result, gptq_quantize
from qflow.quant.spec import QuantSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one intra-op thread is faster and immune to oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- a literal port used as oracle

def _row_params(x: torch.Tensor, spec: QuantSpec):
    s, z = affine.compute_params(x, spec.model_copy(update={"group_size": -1}))
    return s[:, 0], z[:, 0]


def _literal_gptq(W, H, spec, blocksize=128, percdamp=0.01, actorder=False, static_groups=False):
    """Column-by-column transcription of IST-DASLab/gptq ``fasterquant`` (returns fp32 Q)."""
    W = W.clone().float()
    H = H.clone().float()
    G, maxq, cols = spec.group_size, float(spec.qmax), W.shape[1]
    s, z = _row_params(W, spec)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [_row_params(W[:, i:i + G], spec) for i in range(0, cols, G)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if G > 0:
                if not static_groups and c % G == 0:
                    s, z = _row_params(W[:, c:c + G], spec)
                elif static_groups:
                    s, z = groups[(int(perm[c]) if actorder else c) // G]
            w = W1[:, i]
            q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z) * s
            Q[:, c] = q
            err = (w - q) / Hinv[c, c]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv[c, c:i2].unsqueeze(0))
            Err1[:, i] = err
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


def _corr_inputs(d=256, n=4096, rho=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(d)
    C = rho ** (idx[:, None] - idx[None, :]).abs().double()
    L = torch.linalg.cholesky(C)
    return (L @ torch.randn(d, n, dtype=torch.float64, generator=g)).t().float()   # [n, d]


@pytest.fixture(scope="module")
def corr():
    X = _corr_inputs()
    acc = HessianAccumulator(X.shape[1])
    for chunk in X.split(1000):
        acc.add(chunk)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    return X, acc.H, W


# ---------------------------------------------------------------- Hessian accumulator

def test_hessian_accumulator_matches_batch_formula():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 37, 24, generator=g)
    acc = HessianAccumulator(24)
    acc.add(X[:2])                      # [2, 37, 24]: leading dims are tokens
    acc.add(X[2])                       # [37, 24]
    acc.add(X[3:].reshape(-1, 24).half())
    flat = torch.cat([X[:3].reshape(-1, 24), X[3:].reshape(-1, 24).half().float()])
    assert acc.n_tokens == 5 * 37
    ref = 2.0 / flat.shape[0] * flat.double().t() @ flat.double()
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), ref, rtol=1e-5, atol=1e-5)
    acc64 = HessianAccumulator(24, dtype=torch.float64)
    acc64.add(flat)
    torch.testing.assert_close(acc64.H, ref, rtol=1e-12, atol=1e-12)


def test_hessian_accumulator_rejects_bad_input():
    acc = HessianAccumulator(4)
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(x)
    with pytest.raises(ValueError, match="shape"):
        acc.add(torch.ones(3, 5))
    assert acc.n_tokens == 0 and not acc.H.any()
    acc.add(torch.ones(0, 4))
    assert acc.n_tokens == 0


# ---------------------------------------------------------------- METHODS §5 test 1: H = c·I is RTN

@pytest.mark.parametrize("G,sym", [(-1, False), (-1, True), (32, False), (32, True), (128, False), (48, True)])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, True), (True, False)])
def test_identity_hessian_equals_rtn(G, sym, act_order, static_groups):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 200, generator=g) * 0.3
    spec = QuantSpec(bits=4, group_size=G, symmetric=sym, pad_last_group=True)
    scale, zero = affine.compute_params(W, spec)
    for c in (1.0, 0.37, 25.0):
        res = gptq_quantize(W, c * torch.eye(200), spec, act_order=act_order, static_groups=static_groups)
        assert res.g_idx is None
        assert torch.equal(res.scale, scale) and torch.equal(res.zero, zero)
        assert torch.equal(res.codes, affine.quantize(W, scale, zero, spec))
        assert torch.equal(affine.dequantize(res.codes, res.scale, res.zero, spec), affine.fake_quant(W, spec))


# ---------------------------------------------------------------- METHODS §5 test 2: correlated inputs

@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("G", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_correlated_inputs_beat_rtn(corr, bits, G, sym, act_order):
    X, H, W = corr
    spec = QuantSpec(bits=bits, group_size=G, symmetric=sym)
    res = gptq_quantize(W, H, spec, act_order=act_order, static_groups=act_order)
    Q = dequantize_result(res, spec)
    e_gptq = ((W - Q) @ X.t()).double().pow(2).sum()
    e_rtn = ((W - affine.fake_quant(W, spec)) @ X.t()).double().pow(2).sum()
    ratio = float(e_gptq / e_rtn)
    assert ratio <= 0.5, ratio
    if not act_order:
        assert 0.12 < ratio < 0.26, ratio          # numpy port: ~0.18-0.20
    assert res.loss > 0 and res.damp == 0.01


# ---------------------------------------------------------------- agreement with the literal port

@pytest.mark.parametrize("G", [-1, 32, 64, 256])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("block_size", [128, 40])
def test_matches_literal_reference(G, act_order, static_groups, block_size):
    g = torch.Generator().manual_seed(11)
    d = 200                                                # 200 % 64 != 0: partial last group
    X = torch.randn(2000, d, generator=g) @ (0.1 * torch.randn(d, d, generator=g)) + torch.randn(2000, 1, generator=g)
    H = 2.0 / X.shape[0] * X.t() @ X
    W = torch.randn(40, d, generator=g)
    spec = QuantSpec(bits=3, group_size=G, symmetric=False, pad_last_group=True)
    res = gptq_quantize(W, H, spec, block_size=block_size, act_order=act_order, static_groups=static_groups)
    Q_ref = _literal_gptq(W, H, spec, blocksize=block_size, actorder=act_order, static_groups=static_groups)
    Q = dequantize_result(res, spec)
    # blocked arithmetic differs from the literal port only by fp32 rounding
    assert (Q != Q_ref).float().mean() < 1e-3
    assert res.codes.dtype == torch.uint8 and res.codes.shape == W.shape
    assert res.scale.shape == (40, spec.n_groups(d)) == res.zero.shape


# ---------------------------------------------------------------- METHODS §5 test 3: act-order round trip

@pytest.mark.parametrize("G", [32, 48])
def test_act_order_g_idx_round_trip(G):
    g = torch.Generator().manual_seed(5)
    d = 192
    X = torch.randn(1024, d, generator=g) * torch.linspace(0.1, 3.0, d)[torch.randperm(d, generator=g)]
    H = 2.0 / X.shape[0] * X.t() @ X
    W = torch.randn(32, d, generator=g)
    spec = QuantSpec(bits=4, group_size=G, symmetric=True)
    res = gptq_quantize(W, H, spec, act_order=True, static_groups=False)
    assert res.g_idx is not None and res.g_idx.dtype == torch.int32 and res.g_idx.shape == (d,)
    perm = res.perm
    assert torch.equal(perm, torch.argsort(torch.diag(H), descending=True, stable=True))
    invperm = torch.argsort(perm)
    assert torch.equal(res.g_idx.long(), invperm // G)          # g_idx[perm[k]] = k // G
    via_gidx = dequantize_result(res, spec)
    via_perm = affine.dequantize(res.codes[:, perm], res.scale, res.zero, spec)[:, invperm]
    assert torch.equal(via_gidx, via_perm)
    # static groups: parameters follow the original column order
    res_s = gptq_quantize(W, H, spec, act_order=True, static_groups=True)
    assert res_s.g_idx is None
    assert torch.equal(dequantize_result(res_s, spec),
                       affine.dequantize(res_s.codes, res_s.scale, res_s.zero, spec))
    assert gptq_quantize(W, H, spec, act_order=False, static_groups=False).g_idx is None


# ---------------------------------------------------------------- edge cases

def test_damping_retry_and_failure():
    W = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, group_size=-1)
    H = torch.tensor([[1.0, 1.5], [1.5, 1.0]])             # eigenvalues -0.5, 2.5: needs damp >= 0.5
    res = gptq_quantize(W, H, spec)
    assert res.damp == pytest.approx(1.0)                   # 0.01 -> 0.1 -> 1.0
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(W, H, spec, max_damp_retries=1)
    with pytest.raises(ValueError, match="Cholesky"):
        gptq_quantize(W, torch.tensor([[1.0, 30.0], [30.0, 1.0]]), spec)


def test_singular_hessian_and_dead_columns():
    g = torch.Generator().manual_seed(2)
    d = 64
    X = torch.randn(16, d, generator=g)                     # rank 16 < 64: singular H
    X[:, [3, 40, 41]] = 0.0                                 # dead inputs
    acc = HessianAccumulator(d)
    acc.add(X)
    W = torch.randn(12, d, generator=g)
    for spec in (QuantSpec(bits=4, group_size=16), QuantSpec(bits=3, group_size=-1, symmetric=True)):
        res = gptq_quantize(W, acc.H, spec, act_order=True, static_groups=False)
        assert res.damp == 0.01
        Q = dequantize_result(res, spec)
        assert torch.isfinite(Q).all()
        assert not Q[:, [3, 40, 41]].any()
        assert Q[:, :3].any()


def test_input_validation_and_no_mutation():
    W = torch.randn(4, 10)
    H = torch.eye(10)
    W0, H0 = W.clone(), H.clone()
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(W, H, QuantSpec(bits=4, group_size=4))
    res = gptq_quantize(W, H, QuantSpec(bits=4, group_size=4, pad_last_group=True))
    assert isinstance(res, GPTQResult) and res.scale.shape == (4, 3)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(W, torch.eye(9), QuantSpec(bits=4, group_size=-1))
    Hbad = H.clone()
    Hbad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(W, Hbad, QuantSpec(bits=4, group_size=-1))
    with pytest.raises(ValueError, match="integer"):
        gptq_quantize(W, H, QuantSpec(format="nf4", group_size=2))
    assert torch.equal(W, W0) and torch.equal(H, H0)


# ---------------------------------------------------------------- one factorisation vs the previous implementation

@pytest.mark.parametrize("out, d", [(48, 96), (96, 192)])
@pytest.mark.parametrize("act_order,static_groups", [(True, True), (True, False), (False, False)])
def test_single_factorisation_matches_the_previous_implementation(out, d, act_order, static_groups):
    """One Cholesky + a blocked triangular inverse vs the previous two-Cholesky path (benchmarks/_gptq_previous.py).

    The factor is the same matrix (Cholesky factors are unique) up to fp32 rounding: U within 1e-4
    relative, and at most 0.2% of the codes move by one step (rounding ties flipped by that noise).
    """
    from benchmarks import _gptq_previous as previous
    from qflow.quant.algos.gptq import _inverse_cholesky_upper

    g = torch.Generator().manual_seed(3)
    X = torch.randn(4 * d, d, generator=g) @ (0.2 * torch.randn(d, d, generator=g)) + torch.randn(4 * d, 1, generator=g)
    X[:, 7] = 0.0                                                  # a dead input
    H = 2.0 / X.shape[0] * X.t() @ X
    W = torch.randn(out, d, generator=g)
    H_dead_one = H.clone()
    H_dead_one[7, 7] = 1.0
    U_old, _ = previous._inverse_cholesky_upper(H_dead_one, 0.01, 3)
    U_new, _ = _inverse_cholesky_upper(H_dead_one, 0.01, 3)
    assert float((U_new - U_old).norm() / U_old.norm()) < 1e-4
    assert torch.equal(U_new, U_new.triu())
    spec = QuantSpec(bits=4, group_size=32)
    old = previous.gptq_quantize(W, H, spec, act_order=act_order, static_groups=static_groups)
    new = gptq_quantize(W, H, spec, act_order=act_order, static_groups=static_groups)
    moved = (new.codes.int() - old.codes.int()).abs()
    assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= 2e-3
    assert new.loss == pytest.approx(old.loss, rel=1e-3)
    assert new.damp == old.damp and (new.g_idx is None) == (old.g_idx is None)


def test_a_shared_factor_gives_the_same_result_and_refuses_other_settings():
    from qflow.quant.algos.gptq import factor_hessian

    g = torch.Generator().manual_seed(4)
    X = torch.randn(512, 64, generator=g)
    H = 2.0 / 512 * X.t() @ X
    spec = QuantSpec(bits=4, group_size=16)
    factor = factor_hessian(H, percdamp=0.01, act_order=True)
    for rows in (8, 24):
        W = torch.randn(rows, 64, generator=g)
        alone = gptq_quantize(W, H, spec, act_order=True)
        shared = gptq_quantize(W, H, spec, act_order=True, factor=factor)
        assert torch.equal(alone.codes, shared.codes) and torch.equal(alone.scale, shared.scale)
    with pytest.raises(ValueError, match="shared Hessian factor"):
        gptq_quantize(W, H, spec, act_order=False, factor=factor)


@pytest.mark.parametrize("n, out", [(40, 24), (128, 200)])
def test_numba_column_loop_matches_the_torch_loop(n, out):
    """qflow/kernels/gptq_cpu.py vs the torch loop on one lazy batch: same codes, errors to fp32 rounding."""
    from qflow.kernels import gptq_cpu
    from qflow.quant.algos.gptq import _columns_torch

    g = torch.Generator().manual_seed(8)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(A @ A.t() / n + torch.eye(n, dtype=torch.float64)),
                              upper=True).float()
    W1 = torch.randn(n, out, generator=g)
    S = torch.rand(n, out, generator=g) * 0.3 + 0.05
    Z = torch.randint(0, 16, (n, out), generator=g).float()
    W_torch, W_numba = W1.clone(), W1.clone().contiguous()
    codes_t, err_t = _columns_torch(W_torch, U, S, Z, 15.0)
    codes_n, err_n = gptq_cpu.run_columns(W_numba.numpy(), U.numpy(), S.numpy(), Z.numpy(), 15.0)
    moved = (torch.from_numpy(codes_n).int() - codes_t.int()).abs()
    assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= 1e-3
    same = moved == 0
    assert torch.allclose(torch.from_numpy(err_n)[same], err_t[same], rtol=1e-4, atol=1e-5)
    assert torch.allclose(W_numba, W_torch, rtol=1e-4, atol=1e-4)


def test_gptq_torch_and_numba_backends_agree(monkeypatch):
    g = torch.Generator().manual_seed(9)
    X = torch.randn(600, 128, generator=g) @ (0.3 * torch.randn(128, 128, generator=g))
    H = 2.0 / 600 * X.t() @ X
    W = torch.randn(64, 128, generator=g)
    spec = QuantSpec(bits=4, group_size=32)
    monkeypatch.setenv("QFLOW_KERNEL_BACKEND", "numba")
    a = gptq_quantize(W, H, spec, act_order=True, static_groups=False)
    monkeypatch.setenv("QFLOW_KERNEL_BACKEND", "torch")
    b = gptq_quantize(W, H, spec, act_order=True, static_groups=False)
    assert float((a.codes != b.codes).float().mean()) <= 2e-3
    assert a.loss == pytest.approx(b.loss, rel=1e-3)


# ---------------------------------------------------------------- in-place factorisation helpers (issue 17)

@pytest.mark.parametrize("n,block", [(7, 3), (64, 64), (100, 32), (130, 512)])
def test_tile_transpose_and_mirror_in_place(n, block):
    from qflow.quant.algos.gptq import _mirror_lower_in_place, _transpose_in_place

    A = torch.randn(n, n)
    B = A.clone()
    _transpose_in_place(B, block=block)
    assert torch.equal(B, A.t())
    C = A.clone()
    _mirror_lower_in_place(C, block=block)
    assert torch.equal(C, A.tril() + A.tril(-1).t())


def test_in_place_cholesky_is_torchs_on_the_lower_triangle():
    """Factoring H's own memory (column-major view) gives bit for bit torch's L of H's lower triangle,
    also when an accumulated H is symmetric only up to rounding."""
    from qflow.quant.algos.gptq import _mirror_lower_in_place, _transpose_in_place

    g = torch.Generator().manual_seed(2)
    X = torch.randn(900, 300, generator=g) @ torch.randn(300, 300, generator=g)
    H = torch.zeros(300, 300).addmm_(X.t(), X, beta=0.0, alpha=2.0 / 900)
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    want = torch.linalg.cholesky(H.tril() + H.tril(-1).t())
    Hd = H.clone()
    info = torch.empty((), dtype=torch.int32)
    _mirror_lower_in_place(Hd, block=128)
    torch.linalg.cholesky_ex(Hd.mT, out=(Hd.mT, info))
    _transpose_in_place(Hd, block=128)
    assert int(info) == 0 and torch.equal(Hd.tril(), want)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("case", ["plain", "dead", "retry"])
def test_consuming_factorisation_is_bit_identical(act_order, case):
    """factor_hessian(consume=True) builds U in H's own memory: the same U and damping, bit for bit,
    also with dead columns and when the first damping fails and a retry (from H's kept triangle) succeeds."""
    from qflow.quant.algos.gptq import factor_hessian

    g = torch.Generator().manual_seed(5)
    n = 160
    X = torch.randn(400, n, generator=g) @ torch.randn(n, n, generator=g)
    H = torch.zeros(n, n).addmm_(X.t(), X, beta=0.0, alpha=2.0 / 400)
    if case == "dead":
        H[7] = 0.0
        H[:, 7] = 0.0
        H[90] = 0.0
        H[:, 90] = 0.0
    if case == "retry":   # indefinite: 1% damping fails, a larger one succeeds
        H.diagonal().sub_(0.05 * float(H.diagonal().mean()))
    want = factor_hessian(H, act_order=act_order, max_damp_retries=3)
    mine = H.clone()
    got = factor_hessian(mine, act_order=act_order, max_damp_retries=3, consume=True)
    assert got.U.data_ptr() == mine.data_ptr()                 # H's memory became U
    assert torch.equal(got.U, want.U) and got.damp == want.damp
    assert (want.damp > 0.01) == (case == "retry")
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    W = torch.randn(24, n, generator=g)
    a = gptq_quantize(W, H, spec, act_order=act_order, factor=want)
    b = gptq_quantize(W, None, spec, act_order=act_order, factor=got)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    with pytest.raises(ValueError, match="needs H"):
        gptq_quantize(W, None, spec)


def test_released_accumulator_says_so():
    acc = HessianAccumulator(8)
    acc.add(torch.randn(4, 8))
    acc.release()
    with pytest.raises(RuntimeError, match="given up"):
        acc.H
