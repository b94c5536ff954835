"""Per-layer, per-option damage estimates for mixed precision (docs/METHODS.md §8).

Three estimators of the damage ``err[l, o]`` of quantizing linear ``l`` with
option ``o`` (bits x group size under one method's scheme), all additive across
layers by assumption:

* ``proxy`` (imatrix-style, no forward pass): ``sum_j a_j sum_i (W_ij - Q_o(W)_ij)^2``
  with ``a_j`` the calibration statistic of input channel ``j``; exactly
  ``tr(dW C dW^T)``, ``C = X^T X / N``, when calibrate ran with ``xtx: true``,
  else the diagonal with ``a_j = mean|x_j|^2`` (calibrate's ``mean_abs``: a lower
  bound of ``mean x_j^2``).
* ``kl``: quantize only ``l`` (all others float) and measure the mean exact KL
  (``qflow.evaluation.lm.exact_kl``) to the float logits on the calibration
  windows; the float logits are computed once, then one forward over the windows
  per (layer, option).
* ``fisher`` (K-FAC, output-diagonal): ``1/2 sum_i G_i (dW A dW^T)_ii`` with
  ``A = E[x x^T]`` the layer's input second moments and ``G_i = E[(d log p(y)/d s_i)^2]``
  the squared gradient of the float model's log-likelihood w.r.t. the layer's output
  channel ``i``, ``y`` sampled from the float model itself: the Kronecker-factored
  second-order term of ``KL(p_fp || p_q)`` in nats per token (the Fisher weighting of
  BRECQ's block reconstruction at the layer level). One forward and backward over the
  windows collects ``A`` and ``G`` for every layer at once.
* ``hessian`` (HAWQ-V2): ``Tr(H_l) / n_l * ||Q_o(W_l) - W_l||^2`` with the
  Hutchinson trace (one Rademacher ``v`` for all layers per iteration, PyHessian's
  stop rule) of the Hessian of the cross-entropy to the float model's own
  distribution (the Fisher matrix: positive semi-definite at the float weights),
  or HAWQ-V2's cross-entropy on the next tokens (``loss="ce"``; a negative trace
  is clipped at 0).

``Q_o`` is round-to-nearest under the option's spec (``dispatch.fake_quant``).

Example::

    grid = option_grid({"model.layers.0.mlp.up_proj": (128, 64)}, bits=[2, 4], group_sizes=[32, 64],
                       base={"scheme": "asym_a"})
    proxy_damage(w, grid[name][0].spec, mean_abs=stats[name + ".mean_abs"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from qflow.quant import dispatch
from qflow.quant.ir import layer_nbytes
from qflow.quant.spec import QuantSpec

# the spec fields each quantize method uses for its integer grid (its stage's defaults)
METHOD_SPECS: dict[str, dict[str, Any]] = {
    "awq": {"scheme": "asym_a"},
    "gptq": {"scheme": "sym_f"},
    "rtn": {"scheme": "asym_z"},
    "hqq": {"scheme": "asym_h", "zero_float": True},
}


@dataclass(frozen=True)
class GridOption:
    spec: QuantSpec
    nbytes: int


def option_grid(shapes: dict[str, tuple[int, int]], bits: Iterable[int], group_sizes: Iterable[int],
                base: dict[str, Any]) -> dict[str, list[GridOption]]:
    """Per layer (``[out, in]`` shape) the options ``bits x group_sizes`` its width allows, with stored bytes."""
    grid = {}
    for name, (out_features, in_features) in shapes.items():
        opts = []
        for b in bits:
            for g in group_sizes:
                spec = QuantSpec(bits=b, group_size=g, **base)
                if (g > in_features) or spec.check_shape(out_features, in_features):
                    continue
                opts.append(GridOption(spec, layer_nbytes(spec, out_features, in_features)))
        grid[name] = opts
    return grid


def weight_error(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(W) - W`` in fp32 for round-to-nearest under ``spec``."""
    return dispatch.fake_quant(w.float(), spec).float() - w.float()


def proxy_damage(w: torch.Tensor, spec: QuantSpec, *, mean_abs: torch.Tensor | None = None,
                 xtx: torch.Tensor | None = None) -> float:
    """Activation-weighted weight error: exact ``tr(dW C dW^T)`` with ``xtx``, else the ``mean_abs^2`` diagonal."""
    dw = weight_error(w, spec).double()
    if xtx is not None:
        return float(((dw @ xtx.double()) * dw).sum())
    if mean_abs is None:
        raise ValueError("proxy_damage needs mean_abs or xtx")
    return float((dw.pow(2).sum(0) * mean_abs.double().pow(2)).sum())


# ---- KL, one layer at a time ---------------------------------------------------------------

def float_logits(model, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The float model's next-token logits ``[n, L-1, V]`` (fp32), once for every (layer, option)."""
    from .lm import _next_token_logits

    with torch.no_grad():
        return torch.cat([_next_token_logits(model, ids[i:i + batch_size]).float().cpu()
                          for i in range(0, ids.shape[0], batch_size)])


def mean_kl_to(model, ids: torch.Tensor, reference: torch.Tensor, batch_size: int) -> float:
    """Mean exact ``KL(p_ref || p_model)`` per scored token over ``ids`` (one forward over the windows)."""
    from .lm import _next_token_logits, exact_kl

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            logits = _next_token_logits(model, ids[i:i + batch_size]).float().cpu()
            for b in range(logits.shape[0]):  # one window at a time: fp64 [L-1, V] stays small
                kl = exact_kl(reference[i + b], logits[b])
                total += float(kl.sum())
                count += kl.numel()
    return total / max(count, 1)


def single_layer_kl(model, layer: str, spec: QuantSpec, ids: torch.Tensor, reference: torch.Tensor,
                    batch_size: int) -> float:
    """KL to ``reference`` with only ``layer`` quantized (round to nearest under ``spec``); weights restored."""
    module = model.get_submodule(layer)
    original = module.weight.detach().clone()
    try:
        with torch.no_grad():
            module.weight.copy_(dispatch.fake_quant(original.float(), spec).to(original.dtype))
        return mean_kl_to(model, ids, reference, batch_size)
    finally:
        with torch.no_grad():
            module.weight.copy_(original)


# ---- Hutchinson trace (HAWQ-V2) ------------------------------------------------------------

@dataclass
class TraceEstimate:
    traces: list[float]       # per parameter block, the running mean of v^T H v
    n_iter: int
    converged: bool


def hutchinson(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], shapes: list[torch.Size],
               generator: torch.Generator, *, max_iter: int = 100, tol: float = 1e-3,
               dtype: torch.dtype = torch.float32) -> TraceEstimate:
    """Per-block ``Tr(H_b)`` from Rademacher samples; one ``v`` over all blocks per iteration.

    Stops after ``max_iter`` samples or when the total trace's relative change
    ``|new - old| / (|old| + 1e-6)`` drops below ``tol`` (PyHessian ``trace``).
    """
    sums = [0.0] * len(shapes)
    old_total = None
    for it in range(1, max_iter + 1):
        vs = [torch.randint(0, 2, s, generator=generator).to(dtype) * 2 - 1 for s in shapes]
        hv = hvp(vs)
        for k, (v, h) in enumerate(zip(vs, hv)):
            sums[k] += float((v.double() * h.double()).sum())
        total = sum(sums) / it
        if old_total is not None and abs(total - old_total) / (abs(old_total) + 1e-6) < tol:
            return TraceEstimate([s / it for s in sums], it, True)
        old_total = total
    return TraceEstimate([s / max_iter for s in sums], max_iter, False)


def hessian_traces(model, layers: list[str], ids: torch.Tensor, generator: torch.Generator, *,
                   max_iter: int = 100, tol: float = 1e-3, loss: str = "kl") -> TraceEstimate:
    """Hutchinson traces of the calibration loss's Hessian w.r.t. each layer's weight.

    ``loss="kl"``: cross-entropy against the float model's own (detached)
    next-token distribution, i.e. ``KL(p_fp || p_W)`` up to a constant. At the float
    weights its gradient is 0 and its Hessian is the Fisher matrix (positive
    semi-definite): the second-order term of the very KL the ``kl`` estimator
    measures. ``loss="ce"``: HAWQ-V2's cross-entropy on the next tokens, whose
    Hessian is indefinite away from a minimum (negative traces are clipped).
    """
    params = [model.get_submodule(name).weight for name in layers]
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        if loss == "ce":
            objective = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            objective = -(logp.detach().exp() * logp).sum(-1).mean()
        grads = torch.autograd.grad(objective, params, create_graph=True)

        def hvp(vs):
            return [h.detach() for h in torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)]

        return hutchinson(hvp, [p.shape for p in params], generator, max_iter=max_iter, tol=tol,
                          dtype=params[0].dtype)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@dataclass
class FisherFactors:
    xtx: dict[str, torch.Tensor]     # per layer E[x x^T] over tokens, [in, in] fp32
    g2: dict[str, torch.Tensor]      # per layer E[(dlog p(y)/ds_i)^2] over tokens, [out] fp32
    n_tokens: int


def _label_gradients(model, modules: dict[str, torch.nn.Module], ids: torch.Tensor, generator: torch.Generator, *,
                     batch_size: int, n_samples: int, on_input: Callable[[str, torch.Tensor, int], None],
                     on_grad: Callable[[str, torch.Tensor], None]) -> None:
    """Per window batch and label draw ``y ~ p_fp``: one forward and a backward of ``sum_t log p(y_t)``.

    ``on_input(name, x, k)`` sees each layer's input in draw ``k``'s forward, ``on_grad(name, g)``
    the gradient of that layer's output. Parameters get no gradient (their flags are restored).
    """
    def make_hook(name):
        def hook(module, args, out):
            on_input(name, args[0].detach(), draw[0])
            if out.requires_grad:
                out.register_hook(lambda g: on_grad(name, g.detach()))   # None: the gradient flows on unchanged
        return hook

    def grad_on(module, args, out):   # activations need gradients; the weights do not
        return out.detach().requires_grad_(True)

    draw = [0]
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [model.get_input_embeddings().register_forward_hook(grad_on)]
    handles += [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i:i + batch_size]
            for k in range(n_samples):
                draw[0] = k
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                with torch.no_grad():
                    y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1,
                                          generator=generator).reshape(logp.shape[:-1])
                logp.gather(-1, y[..., None]).sum().backward()
                del logits, logp
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)


def fisher_factors(model, layers: list[str], ids: torch.Tensor, generator: torch.Generator, *,
                   batch_size: int = 2, n_samples: int = 1) -> FisherFactors:
    """Input second moments and output-gradient second moments of every layer in ``layers``.

    ``n_samples`` label draws ``y ~ p_fp`` per position (each a backward pass over the
    windows): the gradient of ``sum_t log p(y_t)`` w.r.t. a layer's output at position
    ``t`` is an unbiased sample of that position's Fisher factor (cross terms between
    independently drawn labels vanish in expectation). Parameters get no gradient.
    """
    modules = {name: model.get_submodule(name) for name in layers}
    xtx = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
    g2 = {n: torch.zeros(m.out_features) for n, m in modules.items()}

    def on_input(name, x, k):
        if k == 0:   # the inputs do not depend on the labels: once per batch
            x = x.reshape(-1, x.shape[-1]).float()
            xtx[name].addmm_(x.T, x)

    def on_grad(name, g):
        g2[name].add_(g.reshape(-1, g.shape[-1]).float().pow(2).sum(0))

    _label_gradients(model, modules, ids, generator, batch_size=batch_size, n_samples=n_samples,
                     on_input=on_input, on_grad=on_grad)
    n_tokens = ids.shape[0] * ids.shape[1]
    # inputs were seen at every position (L per window); gradients flow from the L-1 scored positions
    return FisherFactors({n: t / n_tokens for n, t in xtx.items()},
                         {n: t / (n_tokens * n_samples) for n, t in g2.items()}, n_tokens)


def fisher_token_damages(model, options: dict[str, list[QuantSpec]], ids: torch.Tensor,
                         generator: torch.Generator, *, batch_size: int = 2,
                         n_samples: int = 1) -> tuple[dict[str, list[float]], int]:
    """Per-position Fisher damage ``1/2 E_t E_y[(g_t^T dW x_t)^2]`` of every (layer, option), nats per token.

    The same second-order KL as :func:`fisher_factors` + :func:`fisher_damage` without
    K-FAC's two simplifications: the output gradient ``g_t`` and the input ``x_t`` of a
    position stay paired (no ``E[g^2] E[x x^T]`` factorisation) and the cross terms
    between output channels are kept (the full quadratic form of one position, not its
    diagonal). Only the cross terms between positions are dropped, as in the K-FAC form.
    ``y`` is drawn from the float model (``n_samples`` draws per position). Cost: for
    every label draw, one ``[tokens, in] x [in, out]`` product per (layer, option) on
    top of the backward pass and one rounding of the layer per option; memory: one
    batch's layer inputs (the ``dW`` of one layer at a time). Returns the damages and
    the number of positions scored.
    """
    modules = {name: model.get_submodule(name) for name in options}
    sums = {name: [0.0] * len(specs) for name, specs in options.items()}
    inputs: dict[str, torch.Tensor] = {}

    def on_input(name, x, k):
        inputs[name] = x

    def on_grad(name, g):
        # the last position's output feeds no scored token (zero gradient): left out
        x = inputs[name][:, :-1].reshape(-1, inputs[name].shape[-1]).float()
        gg = g[:, :-1].reshape(-1, g.shape[-1]).float()
        w = modules[name].weight.detach()
        for k, spec in enumerate(options[name]):   # dW again per batch: one layer's options in memory
            sums[name][k] += float(((x @ weight_error(w, spec).T) * gg).sum(1).double().pow(2).sum())

    _label_gradients(model, modules, ids, generator, batch_size=batch_size, n_samples=n_samples,
                     on_input=on_input, on_grad=on_grad)
    n_positions = ids.shape[0] * (ids.shape[1] - 1)
    return ({n: [0.5 * v / (n_positions * n_samples) for v in vals] for n, vals in sums.items()}, n_positions)


def fisher_damage(w: torch.Tensor, spec: QuantSpec, xtx: torch.Tensor, g2: torch.Tensor) -> float:
    """``1/2 sum_i g2_i (dW xtx dW^T)_ii``: the estimated single-layer KL in nats per token."""
    dw = weight_error(w, spec)
    return 0.5 * float((((dw @ xtx) * dw).sum(1).double() * g2.double()).sum())


def hessian_damage(trace: float, w: torch.Tensor, spec: QuantSpec) -> float:
    """HAWQ-V2 ``max(Tr, 0) / n * ||Q(W) - W||^2``."""
    return max(trace, 0.0) / w.numel() * float(weight_error(w, spec).double().pow(2).sum())


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation of two samples (NaN when fewer than 3 points or one is constant)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)
