"""GPTQ for one linear layer (docs/METHODS.md §5, following IST-DASLab/gptq ``fasterquant``).

Pure torch, fp32. Two pieces:

* :class:`HessianAccumulator` collects ``H = (2/N) Σ_t x_t x_tᵀ`` online over
  calibration tokens (N counts tokens, not sequences; any positive scaling of H
  leaves the result unchanged).
* :func:`gptq_quantize` quantizes ``W [out, in]`` column by column with
  error feedback through the upper Cholesky factor of the damped ``H⁻¹``.

Parameters come from :func:`qflow.quant.affine.compute_params` and codes are
made with exactly :func:`qflow.quant.affine.quantize`'s arithmetic
(``clamp(round(w / scale) + zero, 0, qmax)`` with the fp16-rounded scale), so
``affine.dequantize(codes, scale, zero, spec)`` reproduces the quantized
weight bit for bit whenever ``g_idx`` is ``None`` (and :func:`dequantize_result`
does in every case).

Implementation notes (numerically equivalent to the reference, not
bit-identical in the error-feedback arithmetic):

* the working matrix is kept transposed (``[in, out]``) so a column is a
  contiguous row;
* inside each lazy-batch block (``block_size`` columns) a second level of
  blocking (``_SUB`` columns) replaces most rank-1 updates by matmuls. Group
  parameters are still taken from the block-level working matrix (it holds
  every completed block's update but none of the current block's), exactly as
  the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..affine import compute_params, dequantize
from ..spec import QuantSpec

_SUB = 32  # inner sub-block (columns) for the intra-block error feedback


# --------------------------------------------------------------------------- Hessian


class HessianAccumulator:
    """Online ``H = (2/N) Σ x xᵀ`` over every token fed to :meth:`add`.

    ``dtype`` is the accumulation dtype (float32 by default, as the reference;
    float64 is accepted). Half-precision accumulation is refused (METHODS §5).
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if int(in_features) <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian accumulation dtype must be float32 or float64, got {dtype}")
        self.in_features = int(in_features)
        self.dtype = dtype
        self._H = torch.zeros(self.in_features, self.in_features, dtype=dtype, device=device)
        self.n_tokens = 0

    @property
    def H(self) -> torch.Tensor:
        """The current ``[in, in]`` Hessian estimate (zeros before any token)."""
        if self._H is None:
            raise RuntimeError("this Hessian was given up to its factorisation (factor_hessian(consume=True))")
        return self._H

    def release(self) -> None:
        """Drop the Hessian (after ``factor_hessian(acc.H, consume=True)`` took its memory)."""
        self._H = None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations ``x`` of shape ``[..., in]`` (every leading index is a token)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator.add: expected input of shape [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        if not x.is_floating_point():
            raise ValueError(f"HessianAccumulator.add: expected a floating-point input, got {x.dtype}")
        if not bool(torch.isfinite(x.sum(dtype=torch.float32))):  # cheap test first; count only on failure
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"HessianAccumulator.add: input contains {bad} non-finite value(s) "
                             f"(NaN/Inf) out of {x.numel()}; refusing to accumulate the Hessian")
        x = x.to(device=self._H.device, dtype=self.dtype)
        n = self.n_tokens
        total = n + m
        # H ← (n/total)·H + (2/total)·xᵀx in one call: no scaled copy of x (at 8 x 512 tokens of
        # a 8192-wide input that copy alone was 128 MiB)
        self._H.addmm_(x.t(), x, beta=n / total, alpha=2.0 / total)
        self.n_tokens = total

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"HessianAccumulator(in_features={self.in_features}, n_tokens={self.n_tokens})"


# --------------------------------------------------------------------------- GPTQ


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    ``codes``: uint8 ``[out, in]`` in the original column order.
    ``scale``/``zero``: fp32 ``[out, n_groups]`` (``[1, 1]`` per tensor). With
    act-order and dynamic groups, group ``k`` is the ``k``-th run of ``G``
    columns in permuted order and ``g_idx`` maps each original column to it.
    ``g_idx``: int32 ``[in]`` or ``None`` when it is the default ``j // G``.
    ``loss``: ``Σ e²/2`` with ``e = (w − q)/U_cc`` (reporting only).
    ``damp``: the ``percdamp`` that was finally used.
    ``perm``: the act-order permutation (int64 ``[in]``) or ``None``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    loss: float
    damp: float
    perm: torch.Tensor | None = None


def dequantize_result(res: GPTQResult, spec: QuantSpec) -> torch.Tensor:
    """fp32 ``[out, in]`` weight of a :class:`GPTQResult`, honouring ``g_idx``."""
    if res.g_idx is None:
        return dequantize(res.codes, res.scale, res.zero, spec)
    gi = res.g_idx.long()
    s = res.scale.float()[:, gi]
    z = res.zero.float()[:, gi]
    return (res.codes.float() - z) * s


def _all_finite(x: torch.Tensor) -> bool:
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)                        # NaN and ±inf propagate; one pass, no copy
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _lower_triangular_invert_(L: torch.Tensor, leaf: int = 512) -> None:
    """``L ← L⁻¹`` for a lower-triangular ``L`` (strict upper triangle zero), in place.

    Recursive 2x2 blocking (``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]]``): the
    diagonal blocks are inverted in place, the off-diagonal one through two matmul
    temporaries of a quarter of ``L`` at most; ``n³/3``-order flops in matmuls (a triangular
    solve against the identity would cost ``n³`` and a second ``n²`` buffer).
    """
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return
    h = n // 2
    A, B, C = L[:h, :h], L[h:, :h], L[h:, h:]
    _lower_triangular_invert_(A, leaf)
    _lower_triangular_invert_(C, leaf)
    B.copy_(C @ (B @ A)).neg_()


def _reverse_in_place(A: torch.Tensor, chunk: int = 1 << 20) -> None:
    """``A.flip(0, 1)`` written into ``A`` itself (C-contiguous square): the flat array reversed,
    swapping ``chunk``-element slices from both ends (a temporary of ``chunk`` elements, not ``n²``)."""
    flat = A.view(-1)
    total = flat.numel()
    half = total // 2
    for k in range(0, half, chunk):
        c = min(chunk, half - k)
        lo = flat[k:k + c]
        hi = flat[total - k - c:total - k]
        tmp = lo.flip(0)
        lo.copy_(hi.flip(0))
        hi.copy_(tmp)


def _transpose_in_place(A: torch.Tensor, block: int = 512) -> None:
    """``A ← Aᵀ`` for a square C-contiguous ``A``, swapping ``block x block`` tiles (temporaries of one tile)."""
    n = A.shape[0]
    for i in range(0, n, block):
        i1 = min(n, i + block)
        A[i:i1, i:i1] = A[i:i1, i:i1].t().clone()
        for j in range(i1, n, block):
            j1 = min(n, j + block)
            upper = A[i:i1, j:j1].clone()
            A[i:i1, j:j1] = A[j:j1, i:i1].t()
            A[j:j1, i:i1] = upper.t()


def _mirror_lower_in_place(A: torch.Tensor, block: int = 512) -> None:
    """``A``'s strict upper triangle ← its strict lower one transposed (square C-contiguous ``A``; tile by tile)."""
    n = A.shape[0]
    for i in range(0, n, block):
        i1 = min(n, i + block)
        d = A[i:i1, i:i1]
        d.copy_(d.tril() + d.tril(-1).t())
        for j in range(i1, n, block):
            j1 = min(n, j + block)
            A[i:i1, j:j1] = A[j:j1, i:i1].t()


def _gather(H: torch.Tensor, order: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``H[order][:, order]`` as a new contiguous matrix, built ``rows`` rows at a time (no second ``n²`` temporary)."""
    out = torch.empty(H.shape, dtype=H.dtype, device=H.device)
    for r0 in range(0, H.shape[0], rows):
        out[r0:r0 + rows] = H.index_select(0, order[r0:r0 + rows]).index_select(1, order)
    return out


def _permute_rows_(A: torch.Tensor, order: torch.Tensor) -> None:
    """``A ← A[order]`` in place, cycle by cycle (a temporary of one row)."""
    idx = order.tolist()
    seen = bytearray(len(idx))
    for start, first in enumerate(idx):
        if seen[start]:
            continue
        seen[start] = 1
        if first == start:
            continue
        held = A[start].clone()
        j = start
        while True:
            k = idx[j]
            seen[j] = 1
            if k == start:
                A[j].copy_(held)
                break
            A[j].copy_(A[k])
            j = k


def _pack_strict_lower(A: torch.Tensor) -> torch.Tensor:
    """``A``'s strict lower triangle, row after row, in one flat tensor of ``n(n-1)/2`` values."""
    n = A.shape[0]
    out = torch.empty(n * (n - 1) // 2, dtype=A.dtype, device=A.device)
    at = 0
    for i in range(1, n):
        out[at:at + i] = A[i, :i]
        at += i
    return out


def _unpack_strict_lower_(A: torch.Tensor, packed: torch.Tensor) -> None:
    """Write ``_pack_strict_lower``'s values back into ``A``'s strict lower triangle."""
    at = 0
    for i in range(1, A.shape[0]):
        A[i, :i] = packed[at:at + i]
        at += i


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float, retries: int, order: torch.Tensor | None = None,
                            dead: torch.Tensor | None = None, consume: bool = False) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(Hp + percdamp·mean(diag Hp)·I)⁻¹`` (``H⁻¹ = UᵀU``) with
    damping retries, where ``Hp = H[order][:, order]`` (``order`` None: ``H`` itself) with the
    diagonal entries of the ``dead`` columns (bool ``[n]``, original order) set to 1. ``H`` is
    never modified, unless ``consume`` (below).

    One factorisation: with ``J`` the order-reversing permutation and ``J·Hd·J = L Lᵀ``,
    ``Hd⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular with a positive
    diagonal, so by uniqueness it is the factor (the reference computes ``Hd⁻¹`` from a
    first Cholesky and factors it again: twice the flops, same matrix up to rounding).

    Memory (docs/METHODS.md §5): one ``n²`` working buffer besides ``H``: the reversed, permuted
    ``Hd`` is gathered into it, factored, inverted and flipped in place; at ``n = 8192`` fp32
    the factorisation's peak is two 256 MiB matrices including ``H`` (it was five, then three
    while torch's Cholesky factored a column-major copy).

    ``consume``: ``H`` (fp32, contiguous) is given up and becomes ``U``: ``H[rev][:, rev]`` is made in
    place (rows permuted cycle by cycle, transposed, again, transposed back: exact), so no second ``n²``
    matrix; torch's Cholesky clears the triangle it does not factor, so for the damping retries the
    strict lower triangle is kept packed beside it (half an ``n²`` matrix). Bit for bit the same ``U``.
    """
    n = H.shape[0]
    rev = torch.arange(n - 1, -1, -1, device=H.device) if order is None else order.flip(0)
    diag = H.diagonal().clone()
    if dead is not None:
        diag[dead] = 1.0
    mean_diag = float(diag.mean())
    kept = None
    if consume:
        _permute_rows_(H, rev)
        _transpose_in_place(H)
        _permute_rows_(H, rev)
        _transpose_in_place(H)                        # H[rev][:, rev], exactly
        kept = _pack_strict_lower(H) if retries else None
    pd = float(percdamp)
    tried: list[float] = []
    for attempt in range(retries + 1):
        tried.append(pd)
        if consume:
            work = H
            if attempt:
                _unpack_strict_lower_(work, kept)
        else:
            work = _gather(H, rev)                    # a fresh contiguous copy, reversed (and permuted)
        work.diagonal().copy_(diag[rev] + pd * mean_diag)
        # L in place: LAPACK works on column-major storage and reads one triangle; with the lower
        # triangle mirrored onto the upper one (an accumulated H is symmetric only up to rounding), the
        # matrix's own memory read column-major holds the very matrix torch used to copy column-major
        # for out=work (one transient n²): the same call on the same data gives the same L, left
        # column-major (Lᵀ row-major) and transposed in place
        _mirror_lower_in_place(work)
        info = torch.empty((), dtype=torch.int32, device=work.device)
        torch.linalg.cholesky_ex(work.mT, out=(work.mT, info))
        d = work.diagonal()                           # L's diagonal; U's is its reversed reciprocal
        if int(info) == 0 and bool(torch.isfinite(d).all()) and bool((d > 0).all()) \
                and bool(torch.isfinite(1.0 / d).all()):
            _transpose_in_place(work)
            work.tril_()
            _lower_triangular_invert_(work)           # L⁻¹
            _reverse_in_place(work)                   # J L⁻¹ J = U
            return work, pd
        del work
        pd = pd * 10.0 if pd > 0 else 0.01
    raise ValueError(
        "gptq_quantize: Cholesky factorization of the damped Hessian failed "
        f"(not positive definite) for percdamp in {tried}; the calibration Hessian is degenerate "
        "(check the activations for NaN/Inf, use more calibration tokens, or raise percdamp)")


@dataclass
class HessianFactor:
    """What GPTQ needs from ``H`` alone, so linears that read the same input (q/k/v, gate/up) share it.

    ``U``: upper Cholesky factor of the damped ``H⁻¹`` in act-order; ``perm``: the
    act-order permutation or None; ``dead``: bool ``[in]`` columns with ``H_jj = 0``
    (original order); ``damp``: the percdamp used; ``percdamp``/``act_order``: what was
    asked (a reuse with other settings is refused).
    """

    U: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float
    percdamp: float
    act_order: bool


def factor_hessian(H: torch.Tensor, *, percdamp: float = 0.01, act_order: bool = True,
                   max_damp_retries: int = 3, consume: bool = False) -> HessianFactor:
    """Dead columns, act-order permutation and one damped inverse Cholesky factor of ``H [in, in]``.

    Example::

        f = factor_hessian(acc.H)
        for W in (q.weight, k.weight, v.weight):
            gptq_quantize(W, acc.H, spec, factor=f)

    ``consume=True``: the caller no longer needs ``H`` (fp32, contiguous): its memory becomes ``U``
    (same result bit for bit, one ``n²`` matrix less at the peak); pass ``H=None`` to
    :func:`gptq_quantize` with the factor afterwards.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"gptq_quantize: H must be square [in, in], got shape {tuple(H.shape)}")
    if percdamp < 0 or max_damp_retries < 0:
        raise ValueError("percdamp and max_damp_retries must be non-negative")
    H = H.detach().to(torch.float32)
    if not _all_finite(H):
        raise ValueError("gptq_quantize: H contains non-finite values (NaN/Inf in calibration statistics)")
    dead = H.diagonal() == 0
    perm = None
    if act_order:
        diag = H.diagonal().clone()
        diag[dead] = 1.0
        perm = torch.argsort(diag, descending=True, stable=True)
    if consume and H.is_contiguous():
        # the caller gives H up (its Hessian accumulator is done): H's memory becomes U, and the factorisation
        # needs no second n² matrix (256 MiB for down_proj at Llama-3.2-1B shapes)
        U, damp_used = _inverse_cholesky_upper(H, percdamp, max_damp_retries, order=perm, dead=dead, consume=True)
    else:
        # the caller's H is never modified: the permuted, damped copy is the factorisation's one working buffer
        U, damp_used = _inverse_cholesky_upper(H, percdamp, max_damp_retries, order=perm, dead=dead)
    return HessianFactor(U=U, perm=perm, dead=dead, damp=damp_used, percdamp=float(percdamp),
                         act_order=bool(act_order))


def _validated(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, block_size: int, percdamp: float,
               max_damp_retries: int) -> torch.Tensor:
    """An fp32 working copy of ``W``; ValueError for any argument :func:`gptq_quantize` cannot take."""
    if W.dim() != 2:
        raise ValueError(f"gptq_quantize: W must be 2-D [out, in], got shape {tuple(W.shape)}")
    out, cols = W.shape
    if H is not None and tuple(H.shape) != (cols, cols):
        raise ValueError(f"gptq_quantize: H must be [{cols}, {cols}] for W of shape {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}")
    if spec.format != "int":
        raise ValueError(f"gptq_quantize supports integer affine formats only, got format={spec.format!r}")
    if spec.zero_float:
        raise ValueError("gptq_quantize needs integer zero points; zero_float specs (HQQ) are not supported")
    problem = spec.check_shape(out, cols)
    if problem:
        raise ValueError(f"gptq_quantize: {problem}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if percdamp < 0 or max_damp_retries < 0:
        raise ValueError("percdamp and max_damp_retries must be non-negative")
    W = W.detach().to(torch.float32).clone()
    if not _all_finite(W):
        raise ValueError("gptq_quantize: W contains non-finite values")
    return W


class _ColumnParams:
    """The ``(scale, zero)`` rows ``[out]`` that quantize each working column, in quantization order.

    Three cases, as in the reference: no groups (one pair per row, or per tensor,
    taken from the original W); static groups (every group's pair taken before
    act-order, looked up through the permutation); dynamic groups (a group's pair
    is taken from the working matrix ``WT`` when its first column comes up, so it
    holds every completed lazy block's update). ``scale``/``zero`` are the
    ``[out, n_groups]`` tables the result reports.
    """

    def __init__(self, spec: QuantSpec, WT: torch.Tensor, *, fixed: tuple[torch.Tensor, torch.Tensor] | None,
                 static: tuple[torch.Tensor, torch.Tensor] | None, perm: torch.Tensor | None) -> None:
        cols, out = WT.shape
        self.WT = WT
        self.G = spec.group_size
        self.col_group: list[int] | None = None
        self.spec_pc: QuantSpec | None = None
        if fixed is not None:
            self.scale, self.zero = fixed
            self.s_col = self.scale[:, 0].contiguous()
            self.z_col = self.zero[:, 0].contiguous()
        elif static is not None:
            self.scale, self.zero = static
            self.sT = self.scale.t().contiguous()
            self.zT = self.zero.t().contiguous()
            src = perm.tolist() if perm is not None else range(cols)
            self.col_group = [j // self.G for j in src]
        else:
            n_groups = spec.n_groups(cols)
            self.scale = torch.zeros(out, n_groups, dtype=torch.float32, device=WT.device)
            self.zero = torch.zeros(out, n_groups, dtype=torch.float32, device=WT.device)
            self.spec_pc = spec.model_copy(update={"group_size": -1})

    def at(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` for working column ``c``; called for c = 0, 1, ... in order."""
        if self.col_group is not None:
            g = self.col_group[c]
            return self.sT[g], self.zT[g]
        if self.spec_pc is not None and c % self.G == 0:
            s, z = compute_params(self.WT[c:c + self.G].t(), self.spec_pc)
            self.s_col = s[:, 0].contiguous()
            self.z_col = z[:, 0].contiguous()
            self.scale[:, c // self.G] = self.s_col
            self.zero[:, c // self.G] = self.z_col
        return self.s_col, self.z_col

    def rows(self, c1: int, c2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[c2 - c1, out]`` scale and zero rows of working columns ``c1..c2-1`` (a lazy batch).

        Dynamic groups take their parameters from ``WT``, which no column of the current
        batch has updated yet, so the whole batch's rows are known at its start.
        """
        pairs = [self.at(c) for c in range(c1, c2)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _columns_torch(W1: torch.Tensor, U1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor,
                   qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch column loop of one sub-block (the reference of ``qflow/kernels/gptq_cpu.py``):
    rank-1 updates column by column; ``W1`` is updated in place."""
    n = W1.shape[0]
    dvals = U1.diagonal().tolist()
    codes = torch.empty(W1.shape, dtype=torch.uint8, device=W1.device)
    Err = torch.empty_like(W1)
    for i in range(n):
        w = W1[i]
        q = torch.round(w / S[i]).add_(Z[i]).clamp_(0.0, qmax)
        codes[i] = q
        err = (w - (q - Z[i]) * S[i]).div_(dvals[i])
        Err[i] = err
        if i + 1 < n:
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)
    return codes, Err


def _quantize_columns(WT: torch.Tensor, U: torch.Tensor, params: _ColumnParams, block_size: int,
                      qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[in, out]`` uint8, loss) for the working columns (rows of ``WT``, updated in place).

    Lazy batches of ``block_size`` columns; inside a batch, sub-blocks of ``_SUB``
    columns run the sequential column loop (the dispatcher's ``gptq_columns``: numba
    on CPU, :func:`_columns_torch` elsewhere) and pass their error feedback on to the
    rest of the batch as one matmul; a finished batch updates every later column at once.
    """
    from ..dispatch import gptq_columns

    cols, out = WT.shape
    codesT = torch.empty(cols, out, dtype=torch.uint8, device=WT.device)
    loss = torch.zeros((), dtype=torch.float64, device=WT.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = WT[i1:i2].clone()
        Err = torch.empty_like(W1)
        S, Z = params.rows(i1, i2)
        for j1 in range(0, i2 - i1, _SUB):
            j2 = min(j1 + _SUB, i2 - i1)
            codes, err = gptq_columns(W1[j1:j2], U[i1 + j1:i1 + j2, i1 + j1:i1 + j2], S[j1:j2], Z[j1:j2], qmax,
                                      reference=_columns_torch)
            codesT[i1 + j1:i1 + j2] = codes.to(WT.device)
            Err[j1:j2] = err.to(WT.device)
            if j2 < i2 - i1:
                W1[j2:].addmm_(U[i1 + j1:i1 + j2, i1 + j2:i2].t(), Err[j1:j2], alpha=-1.0)
        if i2 < cols:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), Err, alpha=-1.0)
        loss += Err.double().pow(2).sum() * 0.5
    return codesT, loss


def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = True, static_groups: bool = True,
                  max_damp_retries: int = 3, factor: HessianFactor | None = None) -> GPTQResult:
    """GPTQ-quantize ``W [out, in]`` given the input Hessian ``H [in, in]`` (docs/METHODS.md §5).

    ``factor``: :func:`factor_hessian` of this ``H`` with the same ``percdamp`` and
    ``act_order``, to share one factorisation between linears that read the same input
    (``H`` may then be None: a factor made with ``consume=True``).
    """
    if H is None and factor is None:
        raise ValueError("gptq_quantize needs H, or a factor of it")
    W = _validated(W, H, spec, block_size, percdamp, max_damp_retries)
    cols = W.shape[1]
    G = spec.group_size
    if factor is None:
        factor = factor_hessian(H.to(W.device), percdamp=percdamp, act_order=act_order,
                                max_damp_retries=max_damp_retries)
    elif factor.act_order != bool(act_order) or factor.percdamp != float(percdamp) or factor.U.shape[0] != cols:
        raise ValueError(f"gptq_quantize: the shared Hessian factor was made for act_order={factor.act_order}, "
                         f"percdamp={factor.percdamp}, {factor.U.shape[0]} columns, not {act_order}, "
                         f"{percdamp}, {cols}")
    fixed = compute_params(W, spec) if G <= 0 else None          # per row (or tensor), from the original W
    dead = factor.dead.to(W.device)
    if bool(dead.any()):
        W[:, dead] = 0.0
    static = compute_params(W, spec) if G > 0 and static_groups else None  # original column order, dead zeroed

    perm = factor.perm
    invperm = None
    if perm is not None:
        invperm = torch.argsort(perm)
        W = W[:, perm]

    U = factor.U
    WT = W.t().contiguous()                          # [in, out]; row c = working column c
    del W
    params = _ColumnParams(spec, WT, fixed=fixed, static=static, perm=perm)
    codesT, loss = _quantize_columns(WT, U, params, block_size, float(spec.qmax))
    del WT
    codes = (codesT[invperm] if perm is not None else codesT).t().contiguous()

    g_idx = None
    if G > 0 and act_order and not static_groups:
        gi = (invperm // G).to(torch.int32)
        default = (torch.arange(cols, device=gi.device) // G).to(torch.int32)
        if not torch.equal(gi, default):
            g_idx = gi
    return GPTQResult(codes=codes, scale=params.scale, zero=params.zero, g_idx=g_idx, loss=float(loss),
                      damp=factor.damp, perm=perm)
