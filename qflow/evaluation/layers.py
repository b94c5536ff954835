"""Per-layer error of a quantized model (docs/METHODS.md §11 "Per-layer error").

For every quantized linear: weight SQNR (dB), and output SQNR plus cosine
similarity (flattened, and mean per token) in two modes:

* **isolated**: the quantized layer fed the float model's input at that site;
* **accumulated**: the quantized model's own output at the site (its input
  comes from the quantized model so far), against the float model's output.

Both models run the same windows (``[n, L]`` ids, one window at a time) in
lock-step, decoder block by decoder block: the float model's forward runs with
hooks, and right after its block ``i`` the quantized model's block ``i`` runs on
the quantized model's own hidden state with the same block arguments (mask,
positions). Cost per window: at most two forward passes (one per model, both
stopped before the final norm and head) plus each quantized linear applied once
more to the float input (isolated mode); memory holds one block's float
outputs. SQNR of identical layers is ``inf`` (written ``"inf"``).

Folded scales: methods that fold per-channel scales into neighbouring tensors
(AWQ, SmoothQuant: the checkpoint then carries float deltas) quantize
``diag(r)·W·diag(c)`` rather than ``W``. Their checkpoints record the scales
they folded (``Checkpoint.folds``; ``fold_factors`` gives ``r`` and ``c``
exactly), which map the quantized layer back to the float layer's coordinates:
weight SQNR uses ``Ŵ / (r cᵀ)``, isolated mode feeds ``x / c`` and divides the
output by ``r``, accumulated mode divides by ``r``. Checkpoints written before
folds were recorded (float deltas, no ``folds``) fall back to a diagonal
least-squares fit ``Ŵ ≈ diag(r)·W·diag(c)`` (:func:`fit_fold`, geometric mean of
r pinned to 1), which absorbs part of the rounding error into ``r, c`` (it reads
about 0.7 dB optimistic at 3 bits). The ``fold`` column says which:
``recorded``, ``fitted`` or ``none``; ``fold_corrected`` is true for the first two.

Example::

    rows = layer_report(fp_model, q_model, ckpt, ids[:2, :256])      # rows[i]["fold"]: "recorded"
    write_tables(rows, out_dir)      # layers.csv, layers.json
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qflow.quant.expert_names import expert_of
from qflow.quant.sqnr import sqnr_from_sums

from .stats import fmt_db

WORST_N = 10


@dataclass
class _Sums:
    """Running sums for SQNR and cosine of ŷ against y."""

    yy: float = 0.0
    ee: float = 0.0
    yh: float = 0.0
    hh: float = 0.0
    cos_token_sum: float = 0.0
    n_tokens: int = 0

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        y = y.detach().double().reshape(-1, y.shape[-1])
        h = y_hat.detach().double().reshape(-1, y_hat.shape[-1])
        self.yy += float(y.pow(2).sum())
        self.ee += float((y - h).pow(2).sum())
        self.yh += float((y * h).sum())
        self.hh += float(h.pow(2).sum())
        ny, nh = y.norm(dim=-1), h.norm(dim=-1)
        both_zero = (ny == 0) & (nh == 0)
        cos = torch.where(both_zero, torch.ones_like(ny), (y * h).sum(-1) / (ny * nh).clamp(min=1e-300))
        self.cos_token_sum += float(cos.sum())
        self.n_tokens += y.shape[0]

    def sqnr(self) -> float:
        return sqnr_from_sums(self.yy, self.ee)

    def cos(self) -> float:
        if self.yy == 0 and self.hh == 0:
            return 1.0
        return self.yh / math.sqrt(max(self.yy * self.hh, 1e-300))

    def cos_token(self) -> float:
        return self.cos_token_sum / self.n_tokens if self.n_tokens else math.nan


@dataclass
class _Site:
    name: str
    order: int
    record: Any
    row_scale: torch.Tensor | None = None     # r (None: 1)
    col_scale: torch.Tensor | None = None     # c (None: 1)
    weight_sqnr: float = math.nan
    iso: _Sums = field(default_factory=_Sums)
    acc: _Sums = field(default_factory=_Sums)


def fit_fold(w: torch.Tensor, w_hat: torch.Tensor, iters: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal scales ``(r, c)`` with ``w_hat ≈ diag(r) · w · diag(c)`` (alternating least squares)."""
    w, w_hat = w.double(), w_hat.double()
    r = torch.ones(w.shape[0], dtype=torch.float64)
    c = torch.ones(w.shape[1], dtype=torch.float64)
    for _ in range(iters):
        rw = r[:, None] * w
        c = (w_hat * rw).sum(0) / rw.pow(2).sum(0).clamp(min=1e-30)
        wc = w * c[None, :]
        r = (w_hat * wc).sum(1) / wc.pow(2).sum(1).clamp(min=1e-30)
    # (r·a, c/a) fits equally well: pin the geometric mean of |r| to 1
    a = torch.exp(torch.log(r.abs().clamp(min=1e-30)).mean())
    return (r / a).float(), (c * a).float()


def _ordered_sites(fp_model: nn.Module, ckpt) -> list[_Site]:
    order = {name: i for i, (name, _) in enumerate(fp_model.named_modules())}
    missing = [n for n in ckpt.layers if n not in order]
    if missing:
        raise KeyError(f"checkpoint layers not in the float model: {missing[:3]}")
    return sorted((_Site(n, order[n], rec) for n, rec in ckpt.layers.items()), key=lambda s: s.order)


def _decoder_blocks(model: nn.Module, sites: list[_Site]) -> tuple[str, list[nn.Module]]:
    """The ``nn.ModuleList`` of decoder blocks that holds every site: (its name, its blocks)."""
    stacks = set()
    for s in sites:
        parts = s.name.split(".")
        for k in range(1, len(parts)):   # the outermost numbered list (not a block's experts)
            parent = ".".join(parts[:k - 1])
            if parts[k - 1].isdigit() and isinstance(model.get_submodule(parent), nn.ModuleList):
                stacks.add(parent)
                break
        else:
            raise ValueError(f"per-layer report: {s.name} is not inside a stack of decoder blocks")
    if len(stacks) != 1:
        raise ValueError(f"per-layer report: quantized layers span several block stacks {sorted(stacks)}")
    name = stacks.pop()
    return name, list(model.get_submodule(name))


class _Stop(Exception):
    """Raised by a hook once the rest of a forward is not needed."""


def _fold_factors(ckpt, w: torch.Tensor, w_hat: torch.Tensor, name: str, source: str):
    if source == "recorded":
        return ckpt.fold_factors(name)
    if source == "fitted":
        return fit_fold(w, w_hat)
    return None, None


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_report(fp_model: nn.Module, q_model: nn.Module, ckpt, ids: torch.Tensor, *,
                 progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Rows (network order) of per-layer errors of ``q_model`` (``ckpt`` applied) against ``fp_model``.

    The two models run in lock-step block by block (see the module doc): two forward
    passes per window, one block's float outputs in memory.
    """
    sites = _ordered_sites(fp_model, ckpt)
    source = "recorded" if getattr(ckpt, "folds", None) else "fitted" if ckpt.floats else "none"
    with torch.no_grad():
        for s in sites:
            w = fp_model.get_submodule(s.name).weight.detach().float().cpu()
            w_hat = ckpt.dequantized(s.name).float()
            s.row_scale, s.col_scale = _fold_factors(ckpt, w, w_hat, s.name, source)
            if s.row_scale is not None:
                w_hat = w_hat / s.row_scale[:, None]
            if s.col_scale is not None:
                w_hat = w_hat / s.col_scale[None, :]
            s.weight_sqnr = sqnr_from_sums(float(w.double().pow(2).sum()),
                                           float((w.double() - w_hat.double()).pow(2).sum()))

    stack, fp_blocks = _decoder_blocks(fp_model, sites)
    q_blocks = list(q_model.get_submodule(stack))
    last_block = max(int(s.name[len(stack) + 1:].split(".", 1)[0]) for s in sites)
    fp_out: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def fp_site_hook(site: _Site):
        q_mod = q_model.get_submodule(site.name)

        def hook(mod, args, out):
            x = args[0]
            fp_out[site.name] = out.detach()
            if site.col_scale is not None:
                x = x / site.col_scale.to(x.device, x.dtype)
            y_iso = q_mod.forward(x)    # .forward: the quantized model's own hooks must not fire
            if site.row_scale is not None:
                y_iso = y_iso / site.row_scale.to(y_iso.device, y_iso.dtype)
            site.iso.add(out, y_iso)
        return hook

    def q_site_hook(site: _Site):
        routed = expert_of(site.name) is not None

        def hook(mod, args, out):
            y = fp_out.pop(site.name, None)
            if routed or y is None:
                # an expert (docs/METHODS.md §4.2): the float and quantized models route tokens on
                # different hidden states, so its rows do not pair up; only the isolated error is defined
                return
            y_hat = out.detach()
            if site.row_scale is not None:
                y_hat = y_hat / site.row_scale.to(y_hat.device, y_hat.dtype)
            site.acc.add(y, y_hat)
        return hook

    def capture_args(i: int):
        def hook(mod, args, kwargs):
            state["args"], state["kwargs"] = args, kwargs
        return hook

    def step_quantized(i: int):
        """After float block ``i``: quantized block ``i`` on the quantized hidden state, same arguments."""
        def hook(mod, args, out):
            a, kw = state.pop("args"), dict(state.pop("kwargs"))
            if a:
                a = (state["h_q"], *a[1:])
            else:
                kw["hidden_states"] = state["h_q"]
            state["h_q"] = _hidden(q_blocks[i](*a, **kw))
            fp_out.clear()
            if i == last_block:
                raise _Stop
        return hook

    def q_block0_input(mod, args, kwargs):
        state["h_q"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    device = next(fp_model.parameters()).device
    handles = []
    try:
        for s in sites:
            handles.append(fp_model.get_submodule(s.name).register_forward_hook(fp_site_hook(s)))
            handles.append(q_model.get_submodule(s.name).register_forward_hook(q_site_hook(s)))
        for i in range(last_block + 1):
            handles.append(fp_blocks[i].register_forward_pre_hook(capture_args(i), with_kwargs=True))
            handles.append(fp_blocks[i].register_forward_hook(step_quantized(i)))
        with torch.no_grad():
            for window in ids:
                batch = window[None].to(device)
                h0 = q_blocks[0].register_forward_pre_hook(q_block0_input, with_kwargs=True)
                try:
                    q_model(input_ids=batch, use_cache=False)    # embeddings only: stops at block 0
                except _Stop:
                    pass
                finally:
                    h0.remove()
                try:
                    fp_model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
                state.clear()
                fp_out.clear()
                if progress:
                    progress(1)
    finally:
        for h in handles:
            h.remove()
    return _rows(sites, source)


def _rows(sites: list[_Site], fold: str) -> list[dict[str, Any]]:
    rows = []
    nan = math.nan
    for i, s in enumerate(sites):
        spec = s.record.spec
        iso, acc = s.iso, s.acc   # no token measured (an expert nothing was routed to): NaN, not a perfect score
        rows.append({
            "index": i, "layer": s.name, "format": spec.format, "bits": spec.bits, "group_size": spec.group_size,
            "scheme": spec.scheme or "", "act_bits": spec.act_bits or 0,
            "bpw": s.record.bpw(),   # this layer's own spec (mixed checkpoints differ per row)
            "shape": [s.record.out_features, s.record.in_features],
            "weight_sqnr_db": s.weight_sqnr,
            "isolated_sqnr_db": iso.sqnr() if iso.n_tokens else nan, "isolated_cos": iso.cos() if iso.n_tokens else nan,
            "isolated_cos_token": iso.cos_token(),
            "accumulated_sqnr_db": acc.sqnr() if acc.n_tokens else nan, "accumulated_cos": acc.cos() if acc.n_tokens else nan,
            "accumulated_cos_token": acc.cos_token(),
            "n_tokens": s.iso.n_tokens, "fold_corrected": fold != "none", "fold": fold,
        })
    ranked = sorted(rows, key=lambda r: (r["isolated_sqnr_db"], r["index"]))
    worst = {r["index"]: k + 1 for k, r in enumerate(ranked[:WORST_N])}
    for r in rows:
        r["worst_rank"] = worst.get(r["index"], 0)
    return rows


def worst_layers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``WORST_N`` rows with the lowest isolated output SQNR, worst first."""
    return sorted((r for r in rows if r["worst_rank"]), key=lambda r: r["worst_rank"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return fmt_db(v) if math.isinf(v) else "nan"
    return v


COLUMNS = ("index", "layer", "format", "bits", "group_size", "scheme", "act_bits", "bpw", "weight_sqnr_db", "isolated_sqnr_db",
           "isolated_cos", "isolated_cos_token", "accumulated_sqnr_db", "accumulated_cos", "accumulated_cos_token",
           "n_tokens", "fold_corrected", "fold", "worst_rank")


def write_tables(rows: list[dict[str, Any]], folder: Path, *, source: str = "") -> tuple[Path, Path]:
    """``layers.csv`` and ``layers.json`` (SQNR of identical layers written as ``"inf"``)."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / "layers.csv", folder / "layers.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt_cell(r[c]) for c in COLUMNS])
    doc = {"inputs": source, "modes": {"isolated": "quantized layer fed the float model's input",
                                       "accumulated": "quantized model's own activations vs the float model"},
           "worst": [r["layer"] for r in worst_layers(rows)],
           "layers": [{k: _jsonable(v) for k, v in r.items()} for r in rows]}
    json_path.write_text(json.dumps(doc, indent=1))
    return csv_path, json_path


def _fmt_cell(v: Any) -> Any:
    if isinstance(v, float):
        if math.isinf(v):
            return fmt_db(v)
        return f"{v:.6g}"
    return v


def summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Scalar roll-ups for tracking: the minimum over layers (left out when infinite: exact layers)."""
    if not rows:
        return {}
    out = {f"layer_{mode}_sqnr_min_db": min(r[f"{mode}_sqnr_db"] for r in rows)
           for mode in ("weight", "isolated", "accumulated")}
    return {k: v for k, v in out.items() if math.isfinite(v)}
