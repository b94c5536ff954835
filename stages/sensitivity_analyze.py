"""``sensitivity-analyze``: estimated damage of every (quantizable linear, bits x group option) (docs/METHODS.md §8)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qflow.artifacts import CalibSet, ModelRef, SensitivityTable
from qflow.registry import Stage, StageConfig, register
from qflow.specs import Regex

COLUMNS = ("layer", "bits", "group_size", "bytes", "damage", "estimator", "out_features", "in_features")


class SensitivityConfig(StageConfig):
    """Which options, which estimator.

        sensitivity:
          uses: sensitivity-analyze
          needs: [calibrate]
          with: {estimator: proxy, method: awq, bits: [2, 3, 4, 8], group_sizes: [32, 64, 128]}

    ``method`` fixes the integer grid each option is priced and rounded with (awq:
    ASYM-A, gptq: SYM-F, rtn: ASYM-Z, hqq: ASYM-H with fp16 zeros): it must be the
    quantize stage that consumes the plan, or the predicted bytes will not be what
    that stage stores. ``n_windows`` calibration windows feed ``kl``, ``hessian``
    and the check (``n_check`` random single-layer quantizations whose measured KL
    is compared with the estimate: a rank correlation; 0 skips it).
    """

    estimator: Literal["proxy", "fisher", "kl", "hessian"] = Field(
        "fisher", description="proxy (no forward), fisher (one forward+backward), kl or hessian")
    method: Literal["awq", "gptq", "rtn", "hqq"] = Field("awq", description="the quantize stage the plan feeds")
    bits: list[int] = Field([2, 3, 4, 8], min_length=1, description="candidate bit widths")
    group_sizes: list[int] = Field([32, 64, 128], min_length=1, description="candidate group sizes (-1: per channel)")
    scale_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    targets: Regex = r"\.layers\.\d+\."
    exclude: list[Regex] = []
    n_windows: int | None = Field(8, ge=1, description="calibration windows for kl / hessian / the check (None: all)")
    batch_size: int = Field(4, ge=1)
    n_check: int = Field(8, ge=0, description="single-layer quantizations measured by KL to check the estimator")
    fisher_samples: int = Field(1, ge=1, description="fisher: label draws y ~ p_fp per position")
    fisher_form: Literal["kfac", "token"] = Field(
        "kfac", description="fisher: kfac (E[g^2] x E[xx^T], output-diagonal) or token (per-position "
                            "quadratic form, no factorisation; one product per option and label draw)")
    bits_correction: int = Field(
        0, ge=0, description="layers per bit width whose measured single-layer KL rescales that width's "
                             "estimates (geometric mean of measured/estimated; 0: off)")
    hessian_max_iter: int = Field(100, ge=1)
    hessian_tol: float = Field(1e-3, gt=0)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _options_ok(self):
        from qflow.quant.spec import QuantSpec
        from qflow.evaluation.sensitivity import METHOD_SPECS

        for name, values in (("bits", self.bits), ("group_sizes", self.group_sizes)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        for b in self.bits:
            for g in self.group_sizes:
                if g == 0:
                    raise ValueError("group_sizes: 0 (per tensor) is not an option; use -1 (per channel) or > 0")
                QuantSpec(bits=b, group_size=g, scale_dtype=self.scale_dtype, **METHOD_SPECS[self.method])
        return self

    def base_spec(self) -> dict:
        from qflow.evaluation.sensitivity import METHOD_SPECS

        return {"scale_dtype": self.scale_dtype, **METHOD_SPECS[self.method]}


@register("sensitivity-analyze")
class SensitivityAnalyze(Stage):
    """Damage of every (linear, option) by ``proxy`` / ``kl`` / ``hessian``, with the bytes the IR stores for it.

        sensitivity:
          uses: sensitivity-analyze
          needs: [calibrate]
          with: {estimator: proxy, method: awq}

    Writes ``table.csv`` (and ``table.parquet`` when pyarrow is installed) with
    columns layer, bits, group_size, bytes, damage, estimator, out_features,
    in_features, and ``meta.json``; logs a layers x options heatmap and the
    estimate-vs-measured-KL plot with its Spearman correlation (``check_spearman``).
    """

    version = 1
    # table size and time; with n_check the Spearman of predicted vs measured damage; hessian: Hutchinson's loop
    metrics = ("n_layers", "n_options", "seconds", "check_spearman", "hutchinson_iterations", "hutchinson_converged")
    Config = SensitivityConfig
    inputs = {"model": ModelRef, "calib": CalibSet}
    outputs = {"table": SensitivityTable}

    def run(self, ctx, cfg, model, calib):
        import json
        import time

        from qflow.evaluation.sensitivity import option_grid

        t0 = time.perf_counter()
        folder = model.base_model_dir
        shapes = _shapes(ctx, cfg, folder)
        grid = option_grid(shapes, cfg.bits, cfg.group_sizes, cfg.base_spec())
        _check_grid(ctx, cfg, grid, shapes)
        estimate = {"proxy": _proxy, "fisher": _fisher, "kl": _kl, "hessian": _hessian}[cfg.estimator]
        state = {}  # the loaded float model and windows, shared with the check
        damages, extra = estimate(ctx, cfg, model, calib, grid, state)
        if cfg.bits_correction and cfg.estimator != "kl":
            extra["bits_correction"] = _correct_per_bits(ctx, cfg, model, calib, grid, damages, state)
        rows = [{"layer": name, "bits": o.spec.bits, "group_size": o.spec.group_size, "bytes": o.nbytes,
                 "damage": damages[name][k], "estimator": cfg.estimator, "out_features": shapes[name][0],
                 "in_features": shapes[name][1]} for name, opts in grid.items() for k, o in enumerate(opts)]
        out = ctx.output("table")
        parquet = _write_table(rows, out)
        check = _check(ctx, cfg, model, calib, grid, damages, state, out) if cfg.n_check else {}
        _heatmap(ctx, cfg, grid, damages, out)
        meta = {"estimator": cfg.estimator, "method": cfg.method, "spec": cfg.base_spec(), "bits": cfg.bits,
                "group_sizes": cfg.group_sizes, "n_layers": len(grid), "n_blocks": _n_blocks(folder, shapes),
                "n_weights": sum(o * i for o, i in shapes.values()),
                "fixed_bytes": _fixed_bytes(folder, set(shapes)), "parquet": parquet, "check": check, **extra}
        (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        ctx.log_artifact(out / "table.csv", "sensitivity.csv")
        ctx.log_metrics({"n_layers": len(grid), "n_options": len(rows), "seconds": time.perf_counter() - t0})
        if "spearman" in check and check["spearman"] == check["spearman"]:
            ctx.log_metric("check_spearman", check["spearman"])
        return {"table": SensitivityTable(out, estimator=cfg.estimator, method=cfg.method, n_layers=len(grid))}


def _shapes(ctx, cfg, folder) -> dict[str, tuple[int, int]]:
    from qflow.errors import StageError
    from qflow.quant.weights import linear_names, tensor_index

    names = linear_names(folder, cfg.targets, cfg.exclude)
    if not names:
        raise StageError(f"no linear weights match targets {cfg.targets!r} in {folder}",
                         where=f"stages.{ctx.stage_id}.with.targets", fix="adjust the targets regex")
    index = tensor_index(folder)   # qflow's names (mixture-of-experts: one entry per expert projection)
    shapes = {}
    for name in names:
        out_features, in_features = index[name + ".weight"].shape
        shapes[name] = (int(out_features), int(in_features))
    return shapes


def _check_grid(ctx, cfg, grid, shapes) -> None:
    from qflow.errors import StageError

    empty = [n for n, opts in grid.items() if not opts]
    if empty:
        widths = sorted({shapes[n][1] for n in empty})
        raise StageError(f"no option of bits {cfg.bits} x group_sizes {cfg.group_sizes} fits {empty[0]} "
                         f"(in_features {shapes[empty[0]][1]}; {len(empty)} layers, widths {widths})",
                         where=f"stages.{ctx.stage_id}.with.group_sizes",
                         fix="add a group size that divides those widths, or -1 (per channel)")


def _windows(ctx, cfg, calib, state):
    from qflow.quant.algos.calibrated import calibration_ids

    if "ids" not in state:
        ids = calibration_ids(ctx, calib, uses="sensitivity-analyze")
        state["ids"] = ids[:cfg.n_windows] if cfg.n_windows else ids
    return state["ids"]


def _float_model(cfg, model, state, attn: str | None = None):
    from qflow.models.loading import load_model

    attn = attn or cfg.attn_implementation
    if state.get("attn") != attn:
        state["net"], _ = load_model(model.base_model_dir, dtype="float32", attn_implementation=attn)
        state["attn"] = attn
    return state["net"]


def _reference(cfg, model, calib, ctx, state):
    from qflow.evaluation.sensitivity import float_logits

    if "reference" not in state:
        net = _float_model(cfg, model, state)
        state["reference"] = float_logits(net, _windows(ctx, cfg, calib, state), cfg.batch_size)
    return state["reference"]


def _proxy(ctx, cfg, model, calib, grid, state):
    """No forward pass: the weights and calibrate's statistics only."""
    from safetensors import safe_open

    from qflow.errors import StageError
    from qflow.evaluation.sensitivity import proxy_damage
    from qflow.quant.weights import iter_linear_weights

    stats_file = calib.path / "stats.safetensors"
    if not stats_file.is_file():
        raise StageError(f"{stats_file} is missing: estimator proxy needs calibrate's statistics",
                         where=f"stages.{ctx.stage_id}.with.estimator",
                         fix="run calibrate with stats: true, or choose estimator: kl or hessian")
    damages, uses_xtx = {}, 0
    with safe_open(str(stats_file), framework="pt") as stats, ctx.progress(len(grid), "proxy") as bar:
        keys = set(stats.keys())
        for name, w in iter_linear_weights(model.base_model_dir, list(grid)):
            if f"{name}.xtx" in keys:
                kw = {"xtx": stats.get_tensor(f"{name}.xtx")}
                uses_xtx += 1
            elif f"{name}.mean_abs" in keys:
                kw = {"mean_abs": stats.get_tensor(f"{name}.mean_abs")}
            else:
                raise StageError(f"{stats_file} has no statistics for {name}",
                                 where=f"stages.{ctx.stage_id}.with.targets",
                                 fix="use the same targets as the calibrate stage (or widen calibrate's targets)")
            damages[name] = [proxy_damage(w, o.spec, **kw) for o in grid[name]]
            bar.update()
    form = "exact tr(dW C dW^T) (xtx)" if uses_xtx == len(grid) else (
        "diagonal mean_abs^2" if not uses_xtx else f"xtx for {uses_xtx} layers, mean_abs^2 for the rest")
    return damages, {"proxy_form": form}


def _fisher(ctx, cfg, model, calib, grid, state):
    """One forward + backward per window batch (and label draw), then weight algebra per option."""
    from qflow.evaluation.sensitivity import fisher_damage, fisher_factors, fisher_token_damages

    net = _float_model(cfg, model, state)
    ids = _windows(ctx, cfg, calib, state)
    extra = {"n_windows": int(ids.shape[0]), "fisher_samples": cfg.fisher_samples, "fisher_form": cfg.fisher_form}
    generator = ctx.torch_generator("fisher-labels")
    if cfg.fisher_form == "token":
        specs = {name: [o.spec for o in opts] for name, opts in grid.items()}
        damages, n_positions = fisher_token_damages(net, specs, ids, generator, batch_size=cfg.batch_size,
                                                    n_samples=cfg.fisher_samples)
        return damages, {**extra, "fisher_tokens": n_positions}
    factors = fisher_factors(net, list(grid), ids, generator, batch_size=cfg.batch_size,
                             n_samples=cfg.fisher_samples)
    damages = {}
    with ctx.progress(len(grid), "fisher") as bar:
        for name, opts in grid.items():
            w = net.get_submodule(name).weight.detach()
            damages[name] = [fisher_damage(w, o.spec, factors.xtx[name], factors.g2[name]) for o in opts]
            bar.update()
    return damages, {**extra, "fisher_tokens": factors.n_tokens}


def _kl(ctx, cfg, model, calib, grid, state):
    from qflow.evaluation.sensitivity import single_layer_kl

    reference = _reference(cfg, model, calib, ctx, state)
    net, ids = state["net"], state["ids"]
    damages = {}
    with ctx.progress(sum(len(o) for o in grid.values()), "kl (one forward per layer and option)") as bar:
        for name, opts in grid.items():
            damages[name] = []
            for o in opts:
                damages[name].append(single_layer_kl(net, name, o.spec, ids, reference, cfg.batch_size))
                bar.update()
    return damages, {"n_windows": int(ids.shape[0])}


def _hessian(ctx, cfg, model, calib, grid, state):
    from qflow.evaluation.sensitivity import hessian_damage, hessian_traces

    net = _float_model(cfg, model, state, attn="eager")  # double back-prop through attention
    ids = _windows(ctx, cfg, calib, state)
    est = hessian_traces(net, list(grid), ids, ctx.torch_generator("hutchinson"), max_iter=cfg.hessian_max_iter,
                         tol=cfg.hessian_tol)
    traces = dict(zip(grid, est.traces))
    negative = [n for n, t in traces.items() if t < 0]
    if negative:
        ctx.log.warning("negative Hutchinson trace for %d layers (e.g. %s): clipped at 0", len(negative), negative[0])
    damages = {}
    for name, opts in grid.items():
        w = net.get_submodule(name).weight.detach()
        damages[name] = [hessian_damage(traces[name], w, o.spec) for o in opts]
    ctx.log_metrics({"hutchinson_iterations": est.n_iter, "hutchinson_converged": float(est.converged)})
    return damages, {"traces": traces, "hutchinson_iterations": est.n_iter, "hutchinson_converged": est.converged,
                     "n_windows": int(ids.shape[0])}


def _correct_per_bits(ctx, cfg, model, calib, grid, damages, state) -> dict:
    """Rescale each bit width's estimates by the measured single-layer KL of a few random layers (in place).

    A second-order estimate is exact only for small perturbations: at 2 bits it
    underestimates the measured KL (1.5-2x on the bundled model) while at 8 bits it is
    within a few per cent, so the allocator would buy 2-bit layers too cheaply. For each
    bit width, ``bits_correction`` layers drawn at random are quantized alone with that
    width (the first group size the layer allows) and the geometric mean of
    measured / estimated becomes that width's factor (each ratio clipped to [0.1, 10]).
    """
    import math

    from qflow.evaluation.sensitivity import single_layer_kl

    reference = _reference(cfg, model, calib, ctx, state)
    net = _float_model(cfg, model, state)
    rng = ctx.rng("bits-correction")
    widths = sorted({o.spec.bits for opts in grid.values() for o in opts})
    factors, samples = {}, []
    with ctx.progress(len(widths) * cfg.bits_correction, "bits correction: measured KL") as bar:
        for b in widths:
            names = [n for n, opts in grid.items() if any(o.spec.bits == b for o in opts)]
            picked = rng.choice(len(names), size=min(cfg.bits_correction, len(names)), replace=False).tolist()
            logs = []
            for i in sorted(picked):
                name = names[i]
                k = next(k for k, o in enumerate(grid[name]) if o.spec.bits == b)
                kl = single_layer_kl(net, name, grid[name][k].spec, state["ids"], reference, cfg.batch_size)
                est = damages[name][k]
                if est > 0 and kl > 0:
                    logs.append(math.log(min(max(kl / est, 0.1), 10.0)))
                samples.append({"layer": name, "bits": b, "estimate": est, "measured_kl": kl})
                bar.update()
            factors[b] = math.exp(sum(logs) / len(logs)) if logs else 1.0
    for name, opts in grid.items():
        damages[name] = [d * factors[o.spec.bits] for d, o in zip(damages[name], opts)]
    return {"factors": {str(b): f for b, f in factors.items()}, "samples": samples}


def _check(ctx, cfg, model, calib, grid, damages, state, out) -> dict:
    """Measured single-layer KL on a random sample of (layer, option): how far to trust the estimator."""
    import csv
    import sys

    from qflow.evaluation.allocation_plots import estimator_vs_kl
    from qflow.evaluation.sensitivity import single_layer_kl, spearman

    if cfg.estimator == "kl":
        return {"note": "estimator kl is the measured single-layer KL itself; no check needed"}
    pairs = [(name, k) for name, opts in grid.items() for k in range(len(opts))]
    rng = ctx.rng("check")
    picked = sorted(rng.choice(len(pairs), size=min(cfg.n_check, len(pairs)), replace=False).tolist())
    reference = _reference(cfg, model, calib, ctx, state)
    net = _float_model(cfg, model, state)
    rows = []
    with ctx.progress(len(picked), "check: measured KL") as bar:
        for i in picked:
            name, k = pairs[i]
            spec = grid[name][k].spec
            kl = single_layer_kl(net, name, spec, state["ids"], reference, cfg.batch_size)
            rows.append({"layer": name, "bits": spec.bits, "group_size": spec.group_size,
                         "damage": damages[name][k], "measured_kl": kl})
            bar.update()
    rho = spearman([r["damage"] for r in rows], [r["measured_kl"] for r in rows])
    with open(out / "check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = estimator_vs_kl([r["damage"] for r in rows], [r["measured_kl"] for r in rows], rho,
                          out / "estimator_vs_kl.png", cfg.estimator)
    ctx.log_artifact(png)
    print(f"[{ctx.stage_id}] {cfg.estimator} vs measured single-layer KL: Spearman rank correlation "
          f"{rho:.3f} over {len(rows)} samples", file=sys.stderr)
    return {"spearman": rho, "n": len(rows)}


def _heatmap(ctx, cfg, grid, damages, out) -> None:
    import numpy as np

    from qflow.evaluation.allocation_plots import damage_heatmap

    labels = [(b, g) for b in cfg.bits for g in cfg.group_sizes]
    matrix = np.full((len(grid), len(labels)), np.nan)
    for i, (name, opts) in enumerate(grid.items()):
        for k, o in enumerate(opts):
            matrix[i, labels.index((o.spec.bits, o.spec.group_size))] = damages[name][k]
    png = damage_heatmap(list(grid), [f"{b}b g{g}" for b, g in labels], matrix, out / "damage_heatmap.png",
                         cfg.estimator)
    ctx.log_artifact(png)


def _write_table(rows, out) -> bool:
    """table.csv always; table.parquet when pyarrow is importable (returns whether it was written)."""
    import csv
    import importlib.util

    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    if importlib.util.find_spec("pyarrow") is None:
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), out / "table.parquet")
    return True


def _n_blocks(folder, shapes) -> int:
    import json

    from qflow.quant.weights import block_index

    config = folder / "config.json"
    if config.is_file():
        n = json.loads(config.read_text()).get("num_hidden_layers")
        if isinstance(n, int):
            return n
    return max((block_index(n) or 0) for n in shapes) + 1


def _fixed_bytes(folder, quantized: set[str]) -> dict[str, int]:
    """Bytes of every tensor the plan does not quantize, per deployment dtype (qflow.evaluation.size convention)."""
    from qflow.evaluation.size import DEPLOY_BYTES, _FLOAT_DTYPES, safetensors_index

    index = safetensors_index(folder)
    weights = {f"{n}.weight" for n in quantized}
    return {dtype: sum(t["numel"] * width if t["dtype"] in _FLOAT_DTYPES else t["nbytes"]
                       for name, t in index.items() if name not in weights)
            for dtype, width in DEPLOY_BYTES.items()}
