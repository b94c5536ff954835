"""AWQ, exactly as llm-awq (docs/METHODS.md §4), driven block by block.

Per decoder block (``awq_block``):

1. one pass of the *FP, unmodified* block caches the input of every linear, the
   outputs of the non-linear loss modules (``self_attn``, ``mlp``) and the block
   output, which becomes the next block's input (AWQ does not propagate
   quantization error);
2. scale search at each adapter site on the original weights:
   ``s = clamp(x_mean^a, 1e-4)`` (AutoAWQ ``duo_scaling``: divided by
   ``w_mean^(1-a) + 1e-4``), normalized by ``sqrt(max·min)``, for
   ``a = r/n_grid, r = 0..n_grid-1``; loss = fp32 MSE of the loss module's output
   with the scaled linears temporarily replaced by ``Q(W·s)/s``; first strict
   minimum wins;
3. fold every best ``s`` (norm ``γ/s``, or the previous linear's last ``len(s)``
   rows and bias), scale the linears' columns, divide the cached inputs by ``s``;
4. clip search on every linear but q/k (10 shrink factors 1.00…0.55 on ≈512
   sampled tokens, per (row, group), symmetric clamp) and apply it;
5. quantize: ``then="rtn"`` (the reference: ASYM-A, or SYM-R with
   ``zero_point=False``), or ``then="gptq"``: GPTQ rounding of the scaled and
   clipped weights (see below).

Exact speed-ups (same objective, different arithmetic):

* when the loss module is the scaled linear itself (sites 2 and 4), the loss
  ``mean((x ΔWᵀ)²)`` is computed as ``Σ (ΔW G) ∘ ΔW / (n·out)`` with the input
  Gram matrix ``G = XᵀX`` (accumulated in fp64), once per site instead of one
  forward per ratio; it avoids the cancellation in ``y_ref − y`` too;
* the reference outputs of ``self_attn``/``mlp`` are one forward of the module alone on its
  cached inputs (the same ops as in the block pass, which therefore keeps neither);
* inputs only a linear-loss site or the clip search read (``o_proj``, ``down_proj``) are
  streamed into their statistics instead of kept (:class:`StreamedInput`).

Knob that changes results (off by default): ``n_search_tokens`` evaluates the
loss of the non-linear loss modules (sites 1 and 3) on evenly spaced whole
calibration sequences holding about that many tokens. ``x_mean`` and the linear
sites still use every token. The AWQ paper (§5, data efficiency) reports that 16
calibration sequences of 512 tokens (8192 tokens) already match larger sets,
which makes ``n_search_tokens: 8192`` an acceptable speed/quality trade on CPUs
(the search is ~90% of AWQ's cost); llm-awq itself uses all cached tokens.

``then="gptq"`` (composition, one stage): steps 1-4 run as above, then the block's
linears are GPTQ-quantized (true-sequential sub-steps, Hessians from the scaled
inputs, same ASYM-A/SYM-R quantizer) and the *quantized* block's outputs feed the
next block, as in GPTQ; the AWQ search of each block therefore sees the
quantized prefix's activations (``y_ref`` is the FP block applied to them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...errors import StageError
from .. import dispatch
from ...models.adapters import ArchAdapter, ScaleSite, norm_weight_offset
from ...models.lazy import release_freed_memory
from ..spec import QuantSpec
from .blockwise import Activations, Block, run_blockwise, write_records
from .moe import count_routed_tokens, record_expert_tokens, report_expert_tokens, warn_no_tokens


@dataclass(frozen=True)
class AWQOptions:
    """AWQ settings (llm-awq defaults; ``duo_scaling`` is AutoAWQ's variant)."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    max_shrink: float = 0.5
    n_clip_tokens: int = 512                  # tokens sampled for the clip search (step 4)
    duo_scaling: bool = False
    apply_clip: bool = True
    n_search_tokens: int | None = None        # tokens for the scale search's module loss (step 2; None = all)
    then: str = "rtn"                         # "rtn" | "gptq"
    gptq: dict[str, Any] = field(default_factory=dict)   # GPTQOptions fields for then="gptq"
    scale_dtype: str = "float16"

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size,
                         scheme="asym_a" if self.zero_point else "sym_r", scale_dtype=self.scale_dtype)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def act_mean(x: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """``mean_t |x[t, j]|`` over all leading dims, fp32 (summed in fp64 by chunks).

    A chunk holds about ``chunk_elements`` values (the fp64 sum converts its chunk: at 8192
    rows of width 8192 a fixed row count made a 512 MiB transient; now 32 MiB)."""
    x2 = x.reshape(-1, x.shape[-1])
    acc = torch.zeros(x2.shape[1], dtype=torch.float64)
    chunk_rows = max(1, chunk_elements // max(1, x2.shape[1]))
    for r0 in range(0, x2.shape[0], chunk_rows):
        acc += x2[r0:r0 + chunk_rows].float().abs().sum(0, dtype=torch.float64)
    return (acc / max(x2.shape[0], 1)).float()


def weight_mean(weights: list[torch.Tensor], group_size: int | list[int]) -> torch.Tensor:
    """AutoAWQ ``w_mean``: mean over rows of ``|W| / (max|W| in its group + 1e-6)``.

    ``group_size``: one for all weights, or one per weight (mixed specs: each weight
    normalized by its own groups; the same as one size when they agree).
    """
    sizes = group_size if isinstance(group_size, list) else [group_size] * len(weights)
    rows = []
    for t, gs in zip(weights, sizes):
        w = t.float()
        g = gs if gs > 0 else w.shape[1]
        wg = w.reshape(-1, g).abs()
        rows.append((wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape))
    return torch.cat(rows, dim=0).mean(0)


def gram(x: torch.Tensor, chunk_rows: int = 4096, chunk_cols: int = 512) -> torch.Tensor:
    """``XᵀX`` of ``x [..., in]`` in fp32, each entry accumulated in fp64 over row chunks of fp32 products.

    Built one column block at a time, so the peak is the fp32 result plus one block's fp64
    accumulator and product (at ``in`` = 8192: 256 MiB + 48 MiB, where a whole fp64 matrix
    with its fp32 product and their fp64 sum took 1.25 GiB).
    """
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[1], x2.shape[1], dtype=torch.float32)
    _gram_into(out, x2, chunk_rows, chunk_cols, first=True)
    return out


def _gram_into(out: torch.Tensor, x2: torch.Tensor, chunk_rows: int, chunk_cols: int, *, first: bool) -> None:
    """``out`` (fp32) ``=`` (``first``) or ``+=`` ``x2ᵀx2``, each column block summed in fp64 before rounding."""
    n = x2.shape[1]
    for c0 in range(0, n, chunk_cols):
        c1 = min(n, c0 + chunk_cols)
        acc = torch.zeros(n, c1 - c0, dtype=torch.float64)
        for r0 in range(0, x2.shape[0], chunk_rows):
            xc = x2[r0:r0 + chunk_rows].float()
            acc.add_(xc.t() @ xc[:, c0:c1])
        if first:
            out[:, c0:c1] = acc
        else:
            out[:, c0:c1] = acc.add_(out[:, c0:c1])


class StreamedInput:
    """What the searches need from one linear's input, accumulated per mini-batch instead of kept.

    A linear whose input feeds no forward of the search (its loss module is itself, or it only
    needs a clip search: ``o_proj``, ``down_proj``) does not need ``[N, T, in]``: the scale search
    uses the Gram matrix, the column means of ``|x|`` and the row count, and the clip search the
    rows ``sample_tokens`` would pick. Accumulated as the block pass streams each mini-batch,
    they replace the largest capture (``down_proj``'s input: 256 MiB at 8,192 tokens of width
    8,192) by the Gram matrix alone. With one mini-batch the figures equal ``gram(x)``,
    ``act_mean(x)`` and ``sample_tokens(x, n_clip_tokens)`` exactly; with several, the Gram
    matrix is rounded to fp32 once per mini-batch (each product still summed in fp64).
    """

    def __init__(self, in_features: int, n_rows: int, n_clip_tokens: int, *, want_gram: bool,
                 chunk_rows: int = 4096, chunk_cols: int = 512) -> None:
        self.n_rows = n_rows
        self.step = max(1, n_rows // n_clip_tokens)          # sample_tokens' stride over all rows
        self.in_features = in_features
        self.sample: torch.Tensor | None = None               # in the input's dtype, as a capture would be
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.gram = torch.empty(in_features, in_features, dtype=torch.float32) if want_gram else None
        self.seen = 0
        self._chunks = (chunk_rows, chunk_cols)

    def add(self, x2: torch.Tensor) -> None:
        """Rows ``seen .. seen + len(x2)`` of the input, in order."""
        r0 = self.seen
        first = -(-r0 // self.step) * self.step - r0            # the first row here on the sample's stride
        picked = x2[first::self.step]
        k0 = -(-r0 // self.step)
        if self.sample is None:
            self.sample = torch.empty((-(-self.n_rows // self.step), self.in_features), dtype=x2.dtype)
        self.sample[k0:k0 + picked.shape[0]] = picked
        chunk = max(1, (1 << 22) // max(1, x2.shape[1]))      # act_mean's chunking
        for c0 in range(0, x2.shape[0], chunk):
            self.abs_sum += x2[c0:c0 + chunk].float().abs().sum(0, dtype=torch.float64)
        if self.gram is not None:
            _gram_into(self.gram, x2, *self._chunks, first=r0 == 0)
        self.seen += x2.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n_rows, 1)).float()

    def check_complete(self, where: str) -> None:
        if self.seen != self.n_rows:
            raise StageError(f"streamed {self.seen} input rows, expected {self.n_rows}", where=where)


def candidate_scales(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """One grid point's per-channel scales (llm-awq, or AutoAWQ duo scaling with ``w_mean``)."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


# ---------------------------------------------------------------------------
# scale search (step 2)
# ---------------------------------------------------------------------------

LINEAR_LOSS_CHUNK_ELEMENTS = 1 << 21   # weight rows per step of the Gram-matrix loss: 8 MiB of fp32

@dataclass
class ScaleSearch:
    site: str
    scales: torch.Tensor
    best_ratio: float
    losses: list[float]


def _module_out(module: nn.Module, x: torch.Tensor, kwargs: dict[str, Any] | None) -> torch.Tensor:
    out = module(x, **kwargs) if kwargs is not None else module(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(W·s)/s`` in ``w``'s dtype, built in chunks of rows (groups run along a row, so the result is
    the whole-matrix one): one new weight plus ~8 MiB of temporaries instead of three full copies."""
    out = torch.empty_like(w)
    rows = max(1, LINEAR_LOSS_CHUNK_ELEMENTS // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], rows):
        wr = w[r0:r0 + rows]
        out[r0:r0 + rows] = dispatch.fake_quant(wr * s, spec) / s
    return out


@torch.no_grad()
def search_scale(loss_module: nn.Module, linears: list[nn.Linear], x: torch.Tensor | None,
                 spec: QuantSpec | list[QuantSpec | None], *,
                 n_grid: int = 20, duo_scaling: bool = False, kwargs: dict[str, Any] | None = None,
                 y_ref: torch.Tensor | None = None, x_mean: torch.Tensor | None = None,
                 x_gram: torch.Tensor | None = None, n_rows: int | None = None, batch_size: int = 8,
                 where: str = "awq") -> ScaleSearch:
    """Grid search of the AWQ scale for ``linears`` (all reading ``x``) against ``loss_module``.

    ``x``: ``[n_seq, seq_len, in]`` (sequences are needed when ``kwargs`` is given,
    i.e. for attention). ``y_ref``: the loss module's FP output on ``x`` (computed
    here when omitted). ``x_mean`` defaults to ``act_mean(x)``. When ``loss_module``
    is the single scaled linear, the loss uses the Gram matrix ``x_gram`` (computed
    from ``x`` when omitted) instead of forwards; ``x`` may then be None when
    ``x_gram``, ``x_mean`` and ``n_rows`` (the input's token count) are given (a
    :class:`StreamedInput`). Weights are restored on return.
    ``spec``: one for every linear, or one per linear (mixed precision: each linear is
    fake-quantized with its own spec; None leaves it float, i.e. exact in the loss).
    """
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec] * len(linears)
    if len(specs) != len(linears) or all(s is None for s in specs):
        raise ValueError("search_scale needs one spec per linear, at least one of them quantized")
    linear_loss = len(linears) == 1 and loss_module is linears[0]
    if x is None and not (linear_loss and x_gram is not None and x_mean is not None and n_rows is not None):
        raise ValueError("search_scale without x needs a linear loss module with x_gram, x_mean and n_rows")
    # the search never writes a weight in place (each ratio assigns a new fake-quantized tensor),
    # so the originals are kept by reference, not copied (gate+up: 128 MiB at 1B shapes)
    originals = [lin.weight.data for lin in linears]
    if x_mean is None:
        x_mean = act_mean(x)
    x_mean = x_mean.float()
    quantized = [(w, s) for w, s in zip(originals, specs) if s is not None]
    w_mean = weight_mean([w for w, _ in quantized], [s.group_size for _, s in quantized]) if duo_scaling else None
    if linear_loss:
        if n_rows is None:
            n_rows = x.reshape(-1, x.shape[-1]).shape[0]
        if x_gram is None:
            x_gram = gram(x)
        x_gram = x_gram.float()  # entries accumulated in fp64 (gram); fp32 products per ratio are plenty
        w = originals[0].float()
        # rows are quantized independently (groups run along a row), so the loss is summed over row
        # chunks: each ratio's temporaries (W·s, Q(W·s)/s, ΔW, ΔW·G) stay near 8 MiB, not 5 x [out, in]
        row_chunk = max(1, LINEAR_LOSS_CHUNK_ELEMENTS // max(1, w.shape[1]))
    elif y_ref is None:
        for b in range(0, x.shape[0], batch_size):
            y = _module_out(loss_module, x[b:b + batch_size], kwargs)
            if y_ref is None:
                y_ref = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype)
            y_ref[b:b + batch_size] = y
        del y
    losses: list[float] = []
    best_loss, best_ratio, best_scales = math.inf, -1.0, None
    try:
        for r in range(n_grid):
            ratio = r / n_grid
            s = candidate_scales(x_mean, ratio, w_mean)
            if linear_loss:
                total = torch.zeros((), dtype=torch.float64)
                for r0 in range(0, w.shape[0], row_chunk):
                    wr = w[r0:r0 + row_chunk]
                    dw = dispatch.fake_quant(wr * s, specs[0]) / s - wr
                    total += ((dw @ x_gram) * dw).sum(dtype=torch.float64)
                loss = float(total / (n_rows * w.shape[0]))
            else:
                for lin, w0, lin_spec in zip(linears, originals, specs):
                    if lin_spec is not None:
                        lin.weight.data = _scaled_fake_quant(w0, s, lin_spec)
                total = 0.0
                for b in range(0, x.shape[0], batch_size):
                    y = _module_out(loss_module, x[b:b + batch_size], kwargs)
                    total += float((y_ref[b:b + batch_size].float() - y.float()).pow(2).sum(dtype=torch.float64))
                loss = total / y_ref.numel()
            losses.append(loss)
            if loss < best_loss:  # first strict minimum; NaN never wins
                best_loss, best_ratio, best_scales = loss, ratio, s
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.data = w0
    if best_scales is None:
        raise StageError(f"AWQ scale search found no finite loss (losses {losses})", where=where,
                         fix="check the calibration activations and the float weights for inf/NaN")
    if not bool(torch.isfinite(best_scales).all()):
        raise StageError("AWQ produced non-finite scales", where=where)
    return ScaleSearch(where, best_scales.detach(), best_ratio, losses)


# ---------------------------------------------------------------------------
# folding (step 3)
# ---------------------------------------------------------------------------

@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Apply ``s`` exactly: ``prev`` output ``/ s`` (norm γ, β; or a linear's last rows and bias), linears ``W·s``.

    A norm that scales by ``1 + w`` (Gemma) gets ``w' = (1 + w)/s - 1``.
    """
    s = s.float()
    if isinstance(prev, nn.Linear):
        n = s.numel()
        w = prev.weight.data
        w[-n:] = (w[-n:].float() / s.view(-1, 1)).to(w.dtype)
        if prev.bias is not None:
            prev.bias.data[-n:] = (prev.bias.data[-n:].float() / s).to(prev.bias.dtype)
    else:
        weight = getattr(prev, "weight", None)
        if weight is None or weight.dim() != 1 or weight.numel() != s.numel():
            raise StageError(f"cannot fold AWQ scales into {type(prev).__name__} (no matching 1-D weight)",
                             where="awq fold", fix="add the norm type to the architecture adapter")
        offset = norm_weight_offset(prev)   # Gemma: the norm scales by 1 + w
        weight.data = ((weight.data.float() + offset) / s - offset).to(weight.dtype)
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.data = (bias.data.float() / s).to(bias.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.data.float() * s.view(1, -1)).to(lin.weight.dtype)


# ---------------------------------------------------------------------------
# clip search (step 4)
# ---------------------------------------------------------------------------

@dataclass
class ClipSearch:
    max_val: torch.Tensor          # [out, n_groups] best clamp threshold
    factors: list[float]           # the shrink factors evaluated
    err_unclipped: torch.Tensor    # [out, n_groups] error at factor 1.0
    err_best: torch.Tensor         # [out, n_groups]


def sample_tokens(x: torch.Tensor, n_clip_tokens: int) -> torch.Tensor:
    """``x`` rows ``[::max(1, n_tok // n_clip_tokens)]`` (AutoAWQ's guard on llm-awq's step)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2[0::max(1, x2.shape[0] // n_clip_tokens)]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, *, n_grid: int = 20,
                max_shrink: float = 0.5, n_clip_tokens: int = 512, row_batch: int | None = None,
                max_elements: int = 1 << 24) -> ClipSearch:
    """Per (row, group) clamp threshold minimizing the group's partial-output MSE (llm-awq ``auto_clip_layer``).

    Rows are independent, so how they are batched does not change the result. llm-awq
    uses 256 (64 when ``out % 256``) to bound the ``[rows, T, n_groups, G]`` product it
    materializes; the per-group partial outputs here come from one batched matmul
    (``[n_groups, T, rows]``), so by default rows are batched to keep that under
    ``max_elements`` (``row_batch`` forces a size, e.g. llm-awq's).
    """
    w = w.float()
    out, cols = w.shape
    g = spec.group_size if spec.group_size > 0 else cols
    if cols % g:
        raise StageError(f"clip search needs in_features {cols} divisible by group_size {g}", where="awq clip")
    ng = cols // g
    xs = sample_tokens(x, n_clip_tokens).float()                        # [T, in]
    xg = xs.reshape(xs.shape[0], ng, g).permute(1, 0, 2).contiguous()   # [ng, T, G]
    n_steps = int(max_shrink * n_grid)
    factors = [1 - i / n_grid for i in range(n_steps)]
    rows = row_batch or max(1, min(out, max_elements // max(1, xs.shape[0] * ng)))
    best_all, e0_all, eb_all = [], [], []
    for r0 in range(0, out, rows):
        wb = w[r0:r0 + rows]                                            # [ob, in]
        ob = wb.shape[0]
        wg = wb.reshape(ob, ng, g)
        m0 = wg.abs().amax(dim=-1)                                      # [ob, ng]
        y0 = torch.bmm(xg, wg.permute(1, 2, 0))                         # [ng, T, ob]
        best = m0.clone()
        min_err = torch.full_like(m0, 1e9)
        err0 = None
        for i in range(n_steps):
            m = m0 * (1 - i / n_grid)
            cur = torch.maximum(torch.minimum(wg, m.unsqueeze(-1)), -m.unsqueeze(-1))
            q = dispatch.fake_quant(cur.reshape(ob, cols), spec).reshape(ob, ng, g)
            y = torch.bmm(xg, q.permute(1, 2, 0))
            err = (y - y0).pow(2).mean(dim=1).t()                       # [ob, ng]
            if i == 0:
                err0 = err.clone()
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, m, best)
        best_all.append(best)
        e0_all.append(err0)
        eb_all.append(min_err)
    return ClipSearch(torch.cat(best_all), factors, torch.cat(e0_all), torch.cat(eb_all))


@torch.no_grad()
def apply_clip(lin: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = lin.weight.data
    out, cols = w.shape
    g = group_size if group_size > 0 else cols
    wg = w.float().reshape(out, cols // g, g)
    m = max_val.unsqueeze(-1)
    lin.weight.data = torch.maximum(torch.minimum(wg, m), -m).reshape(out, cols).to(w.dtype)


# ---------------------------------------------------------------------------
# one block, then the model
# ---------------------------------------------------------------------------

def _search_rows(n_seq: int, seq_len: int, n_search_tokens: int | None) -> torch.Tensor | None:
    if n_search_tokens is None or n_search_tokens >= n_seq * seq_len:
        return None
    k = max(1, min(n_seq, math.ceil(n_search_tokens / seq_len)))
    return torch.linspace(0, n_seq - 1, k).round().long().unique()


def _prev_float_params(prev_name: str, prev: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Float tensors changed by a fold that the quantized linears do not carry."""
    if isinstance(prev, nn.Linear):
        return [(f"{prev_name}.bias", prev.bias.data)] if prev.bias is not None else []
    out = [(f"{prev_name}.weight", prev.weight.data)]
    if getattr(prev, "bias", None) is not None:
        out.append((f"{prev_name}.bias", prev.bias.data))
    return out


def search_block_scales(block: Block, opts: AWQOptions, acts: Activations,
                        layer_spec: Callable[[str], QuantSpec | None] | None = None,
                        streamed: dict[str, StreamedInput] | None = None, *,
                        keep_clip_rows_only: bool = False,
                        inputs_shape: tuple[int, ...] | None = None) -> list[tuple[ScaleSite, ScaleSearch]]:
    """Step 2 on every site of ``block`` with the original weights (restored after each site).

    ``acts`` comes from ``block.run(capture=<all linears>)``, optionally with ``module_outputs=<non-linear
    loss modules>`` (each site recomputes a loss module's output it does not find there);
    ``streamed``: the inputs that pass streamed instead of capturing (canonical linear ->
    :class:`StreamedInput`, see :func:`streamable_inputs`). Each loss module's output is
    dropped from ``acts`` once no later site needs it.
    ``layer_spec(rel)``: each linear's spec (mixed precision; None: float); a site whose
    linears are all float is not searched (nothing to protect). ``keep_clip_rows_only``: once no
    later site reads a captured input, keep only the rows the clip search samples from it
    (``sample_tokens``, which keeps its own sample whole), as a streamed input does.
    """
    adapter, mod = block.adapter, block.module
    layer_spec = layer_spec or (lambda rel, spec=opts.spec(): spec)
    streamed = streamed or {}
    n_seq, seq_len = tuple(inputs_shape or block.inputs.shape)[:2]   # inputs_shape: the block dropped its inputs
    rows = _search_rows(n_seq, seq_len, opts.n_search_tokens)
    found: dict[int, tuple[ScaleSite, ScaleSearch]] = {}
    sites = adapter.awq_sites(mod)
    # every site is searched on the original weights, so the order is free: the streamed sites first,
    # each dropping its Gram matrix (256 MiB for down_proj at 1B shapes) before the forward-based
    # searches; the results are returned (and folded) in the adapter's order
    order = sorted(range(len(sites)), key=lambda j: adapter.canonical_input(sites[j].input_of) not in streamed)
    for pos, i in enumerate(order):
        site = sites[i]
        spec = [layer_spec(n) for n in site.linears]
        if all(s is None for s in spec):
            continue
        key = adapter.canonical_input(site.input_of)
        loss_mod = mod.get_submodule(site.loss_module)
        linears = [block.linear(n) for n in site.linears]
        where = f"{block.name}.{site.loss_module} (AWQ site {site.name})"
        if key in streamed:   # a linear loss module (streamable_inputs): Gram matrix, column means, row count
            st = streamed[key]
            res = search_scale(loss_mod, linears, None, spec, n_grid=opts.n_grid, duo_scaling=opts.duo_scaling,
                               x_mean=st.mean(), x_gram=st.gram, n_rows=st.n_rows, where=where)
            st.gram = None   # one site per Gram matrix
            found[i] = (site, res)
            release_freed_memory()
            continue
        x = acts.inputs[key]
        if x.numel() == 0:   # an expert no calibration token reached: no scale (RTN fallback, docs/METHODS.md §4.2)
            continue
        if isinstance(loss_mod, nn.Linear):
            res = search_scale(loss_mod, linears, x, spec, n_grid=opts.n_grid, duo_scaling=opts.duo_scaling,
                               batch_size=block.batch_size, where=where)
        else:
            # the loss module's float output: captured by the block pass, or (awq_block) recomputed
            # here by one forward of the module alone on the same inputs, the same ops
            y_ref = acts.module_outputs.get(site.loss_module)
            xs = x if rows is None else x[rows]
            ys = None if y_ref is None else (y_ref if rows is None else y_ref[rows])
            res = search_scale(loss_mod, linears, xs, spec, n_grid=opts.n_grid, duo_scaling=opts.duo_scaling,
                               kwargs=block.kwargs if site.loss_kwargs else None, y_ref=ys,
                               x_mean=act_mean(x), batch_size=block.batch_size, where=where)
            del xs, ys, y_ref
            if all(sites[j].loss_module != site.loss_module for j in order[pos + 1:]):
                acts.module_outputs.pop(site.loss_module, None)   # its last use
        if keep_clip_rows_only and all(adapter.canonical_input(sites[j].input_of) != key for j in order[pos + 1:]):
            acts.inputs[key] = sample_tokens(x, opts.n_clip_tokens).clone()   # q/k/v's, gate/up's: 64 -> 4 MiB at 1B
        del x
        found[i] = (site, res)
        release_freed_memory()   # each site's temporaries back to the OS before the next (wide) one
    return [found[i] for i in sorted(found)]


def streamable_inputs(block: Block, names: list[str], layer_spec: Callable[[str], QuantSpec | None],
                      n_clip_tokens: int) -> dict[str, StreamedInput]:
    """Inputs ``awq_block`` streams instead of capturing: canonical linear -> :class:`StreamedInput`.

    An input qualifies when no forward of the search reads it (it is not the input of a site
    whose loss module is a sub-module such as ``self_attn`` or ``mlp``) and every linear reading
    it sees every token (not a routed expert); the Gram matrix is kept only for the input of a
    searched linear-loss site. Llama-style blocks: ``o_proj`` and ``down_proj``.
    """
    adapter, mod = block.adapter, block.module
    keys: dict[str, list[str]] = {}
    for n in names:
        keys.setdefault(adapter.canonical_input(n), []).append(n)
    forwarded, gram_keys = set(), set()
    for site in adapter.awq_sites(mod):
        key = adapter.canonical_input(site.input_of)
        loss_mod = mod.get_submodule(site.loss_module)
        if isinstance(loss_mod, nn.Linear) and site.linears == (site.loss_module,):
            if any(layer_spec(n) is not None for n in site.linears):
                gram_keys.add(key)
        else:
            forwarded.add(key)
    n_rows = block.inputs.shape[0] * block.inputs.shape[1]
    out = {}
    for key, readers in keys.items():
        if key in forwarded or any(adapter.routed(n) for n in readers):
            continue
        lin = block.linear(key)
        out[key] = StreamedInput(lin.in_features, n_rows, n_clip_tokens, want_gram=key in gram_keys)
    return out


def fold_block_scales(block: Block, searches: list[tuple[ScaleSite, ScaleSearch]],
                      feats: dict[str, torch.Tensor],
                      folds: list[tuple[str, list[str], torch.Tensor]] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Step 3: fold every site's scales and divide the cached inputs; returns the changed float tensors.

    ``folds`` (when given) receives ``(prev, linears, s)`` per site, full names, for the checkpoint's record.
    """
    adapter, mod = block.adapter, block.module
    changed: dict[str, torch.Tensor] = {}
    for site, res in searches:
        prev = mod.get_submodule(site.prev)
        fold_scale(prev, [block.linear(n) for n in site.linears], res.scales)
        if folds is not None:
            folds.append((block.full_name(site.prev), [block.full_name(n) for n in site.linears],
                          res.scales.detach().float().clone()))
        # every cached input the site's linears read (one for a dense site; the router's and each
        # expert's for a mixture-of-experts mlp_in site) is now divided by s
        keys = dict.fromkeys([adapter.canonical_input(site.input_of)] + [adapter.canonical_input(n) for n in site.linears])
        for key in keys:
            if key in feats:
                feats[key].div_(res.scales.to(feats[key].dtype))   # in place: no second copy of a wide input
        for pname, tensor in _prev_float_params(f"{block.name}.{site.prev}", prev):
            changed[pname] = tensor
    return [(k, v.detach().clone()) for k, v in changed.items()]


def clip_block(block: Block, opts: AWQOptions, feats: dict[str, torch.Tensor],
               layer_spec: Callable[[str], QuantSpec | None] | None = None) -> list[tuple[str, ClipSearch]]:
    """Step 4: clip search and clamp for every quantized linear but q/k (each under its own spec),
    on the scaled weights and inputs."""
    layer_spec = layer_spec or (lambda rel, spec=opts.spec(): spec)
    out = []
    for name in block.adapter.linear_names(block.module):
        spec = layer_spec(name)
        x = feats[block.adapter.canonical_input(name)]
        if block.adapter.clip_skipped(name) or spec is None or x.numel() == 0:
            continue
        lin = block.linear(name)
        clip = search_clip(lin.weight.data, x, spec, n_grid=opts.n_grid,
                           max_shrink=opts.max_shrink, n_clip_tokens=opts.n_clip_tokens)
        apply_clip(lin, clip.max_val, spec.effective_group(lin.in_features))
        out.append((name, clip))
    return out


def awq_block(block: Block, opts: AWQOptions, *, propagate_fp: bool = True,
              spec_for: Callable[[str], QuantSpec | None] | None = None) -> None:
    """Steps 1-5 of docs/METHODS.md §4 on one block; writes its quantized linears and folded floats.

    ``spec_for(full module name)``: each linear's spec, None to leave it float (default:
    ``opts.spec()`` for all). Mixed specs: the scale search fake-quantizes each linear of
    a site with its own spec, the clip search uses the layer's spec; a float linear that a
    fold changed (scaled columns, or divided rows as a site's ``prev``) is stored as a
    float delta.
    """
    from .gptq_model import GPTQOptions, gptq_block

    base = opts.spec()

    def layer_spec(rel: str) -> QuantSpec | None:   # default: every linear but MoE routers
        if spec_for is not None:
            return spec_for(block.full_name(rel))
        return None if block.adapter.is_router(rel) else base

    names = block.adapter.linear_names(block.module)
    for name in names:
        spec = layer_spec(name)
        problem = spec.check_shape(*block.linear(name).weight.shape) if spec is not None else None
        if problem:
            raise StageError(f"{block.full_name(name)}: {problem}", where="quantize.awq.group_size",
                             fix="choose a group size that divides every layer width")
    floats = {n: block.linear(n).weight.data.clone() for n in names if layer_spec(n) is None}
    t0 = time.perf_counter()
    # step 1: one pass of the FP block
    streamed = streamable_inputs(block, names, layer_spec, opts.n_clip_tokens)
    canon = block.adapter.canonical_input
    with count_routed_tokens(block.module) as routed:
        acts = block.run(capture=[n for n in names if canon(n) not in streamed],
                         stream=list(streamed), on_input=lambda rel, x2: streamed[canon(rel)].add(x2),
                         outputs=propagate_fp and not block.is_last,
                         )   # no sub-module outputs: each site recomputes its own (one forward)
    for key, st in streamed.items():
        st.check_complete(f"{block.full_name(key)} (AWQ streamed input)")
    rows = {rel: x.reshape(-1, x.shape[-1]).shape[0] for rel, x in acts.inputs.items()}
    record_expert_tokens(block, routed, lambda rel: rows.get(rel, 0))
    for name in names:   # experts no calibration token reached: RTN fallback (docs/METHODS.md §4.2)
        if block.adapter.routed(name) and layer_spec(name) is not None and \
                acts.inputs[block.adapter.canonical_input(name)].numel() == 0:
            warn_no_tokens(block, name, "AWQ")
    if propagate_fp:
        block.next_inputs = acts.outputs
    inputs_shape = tuple(block.inputs.shape)
    if propagate_fp:   # the block's inputs are not read again (the next block's are captured): 64 MiB at 1B
        block.inputs = None
    searches = search_block_scales(block, opts, acts, layer_spec, streamed, keep_clip_rows_only=True,
                                   inputs_shape=inputs_shape)
    for site, res in searches:
        block.record(layer=f"{block.name}.{site.loss_module}", site=site.name, best_ratio=res.best_ratio,
                     loss_ratio0=res.losses[0], loss_best=min(res.losses))
    t_search = time.perf_counter() - t0
    feats = acts.inputs
    for key, st in streamed.items():   # the clip search reads only these rows (sample_tokens keeps them all)
        if st.sample is not None:
            feats[key] = st.sample
    streamed.clear()
    folds: list[tuple[str, list[str], torch.Tensor]] = []
    for pname, tensor in fold_block_scales(block, searches, feats, folds):
        block.writer.add_float(pname, tensor)
    for prev, linears, scales in folds:  # exact fold factors for the per-layer report
        block.writer.add_fold(prev, linears, scales)
    release_freed_memory()
    if opts.apply_clip:
        for name, clip in clip_block(block, opts, feats, layer_spec):
            block.record(layer=block.full_name(name), clip_err_unclipped=float(clip.err_unclipped.sum()),
                         clip_err=float(clip.err_best.sum()))
    feats.clear()
    del acts
    # step 5: quantize
    if opts.then == "gptq":
        gopts = GPTQOptions(**{**opts.gptq, "bits": opts.bits, "group_size": opts.group_size})
        gptq_block(block, gopts, spec=base, spec_for=spec_for)
    else:
        for name in names:
            spec = layer_spec(name)
            if spec is None:
                continue
            lin = block.linear(name)
            w = lin.weight.data.float()
            scale, zero = dispatch.compute_params(w, spec)
            codes = dispatch.quantize(w, scale, zero, spec)
            block.writer.add_quantized(block.full_name(name), spec, codes, scale, zero)
            if not propagate_fp:  # keep the quantized weight for the next block's inputs
                lin.weight.data = dispatch.dequantize(codes, scale, zero, spec).to(lin.weight.dtype)
    for name, original in floats.items():  # left float: keep what the folds did to it
        weight = block.linear(name).weight.data
        if not torch.equal(weight, original):
            block.writer.add_float(f"{block.full_name(name)}.weight", weight.detach().clone())
    block.record(layer=block.name, search_seconds=t_search, block_seconds=time.perf_counter() - t0)


def quantize_model_awq(ctx: Any, model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor, opts: AWQOptions, *,
                       base_model: str, meta: dict[str, Any] | None = None, batch_size: int = 8,
                       spec_for: Callable[[str], QuantSpec | None] | None = None,
                       layer_specs: dict[str, Any] | None = None):
    """Run AWQ over every block of ``model`` and write the IR (see ``run_blockwise``).

    ``spec_for``: per-layer specs (see ``awq_block``); ``layer_specs``: their JSON form for the resume guard.
    """
    if opts.then not in ("rtn", "gptq"):
        raise StageError(f"then must be 'rtn' or 'gptq', got {opts.then!r}", where="quantize.awq.then")
    propagate_fp = opts.then == "rtn"
    signature = {"options": {**opts.__dict__, "gptq": dict(opts.gptq)}, **({"layers": layer_specs} if layer_specs else {})}
    result = run_blockwise(ctx, model, adapter, ids,
                           lambda b: awq_block(b, opts, propagate_fp=propagate_fp, spec_for=spec_for),
                           method="awq" if opts.then == "rtn" else "awq+gptq", base_model=base_model, meta=meta,
                           signature=signature, propagate="fp" if propagate_fp else "quant",
                           batch_size=batch_size, desc="awq")
    write_records(ctx, result.records, "awq_layers.json")
    report_expert_tokens(ctx, result.records)
    return result
