"""What ``qflow lint`` checks against the model itself, without loading its weights.

The model's linears and their shapes come from its configuration only: the
``config.json`` of a folder or a Hub repository (the one file fetched, or read
from the local Hub cache when offline), or the metadata of a GGUF file (the
zoo's bundled model); the architecture is then built on PyTorch's ``meta``
device, which allocates no memory. Against those names and shapes:

* every ``layers:`` / ``ignore:`` pattern of a quantize stage must match one of
  the linears the stage quantizes (its ``targets`` minus ``exclude``);
* each linear's group size (the stage's, changed by ``layers:`` overrides in
  order, the last match wins; ``-1`` and ``0`` mean per channel) must divide the
  linear's input width (groups run along the input dimension).

Example::

    shapes = meta_linear_shapes("zoo:smollm2-135m")       # {"model.layers.0.mlp.down_proj": (576, 1536), ...}
    layer_findings("quantize", quantize_config, shapes)   # [] or [{"code": "group-size", ...}]
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from ..errors import SourceError


def model_config(source: str):
    """The transformers config of ``source`` (no weights read)."""
    from .sources import _gguf_file, _local_folder, _split_hf, _zoo_gguf_path, hub_offline, parse_model_source

    kind, value = parse_model_source(source)
    if kind in ("zoo", "gguf"):
        import gguf

        from .gguf_import import gguf_llama_config

        path = _zoo_gguf_path(value) if kind == "zoo" else _gguf_file(value, source)
        return gguf_llama_config(gguf.GGUFReader(str(path)), source)
    if kind == "hf":
        import huggingface_hub

        repo_id, revision = _split_hf(value)
        try:
            config_file = huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision,
                                                          local_files_only=hub_offline())
        except Exception as exc:  # offline and not cached, or unreachable
            raise SourceError(f"the model's config.json is not available ({type(exc).__name__})", where=source,
                              fix="download the model once (HF_HUB_OFFLINE=0) or lint against a local folder") from None
        return _config(Path(config_file).parent, source)
    return _config(_local_folder(value, source), source)


def _config(folder: Path, source: str):
    from transformers import AutoConfig

    from ..recipe.safety import remote_code_allowed

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=remote_code_allowed())
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise SourceError("the model's configuration needs its own Python code (auto_map), which qflow runs only "
                          "when you allow it", where=source,
                          fix="pass --trust-remote-code on the command line if you trust the model's code") from None


def meta_linear_shapes(source: str, targets: str | None = None, exclude: list[str] | None = None) \
        -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of the decoder linears a quantize stage would see, from a meta-device build."""
    return dict(_meta_linear_shapes(source, targets, tuple(exclude or ())))


@functools.lru_cache(maxsize=8)
def _meta_linear_shapes(source: str, targets: str | None, exclude: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from ..quant.weights import DEFAULT_TARGETS

    config = model_config(source)
    from ..recipe.safety import remote_code_allowed

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote_code_allowed())
    pattern = re.compile(targets or DEFAULT_TARGETS)
    excl = [re.compile(e) for e in exclude or []]
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.search(f"{name}.weight") \
                and not any(e.search(name) for e in excl):
            out[name] = (int(module.out_features), int(module.in_features))
    return out


def layer_findings(stage_id: str, cfg: Any, shapes: dict[str, tuple[int, int]]) -> list[dict[str, str]]:
    """Patterns that match no linear, and group sizes that do not divide a linear's input width."""
    from ..quant.layerspec import closest_names, matches

    where = f"stages.{stage_id}.with"
    names = list(shapes)
    findings = []
    layers = dict(getattr(cfg, "layers", {}) or {})
    ignore = list(getattr(cfg, "ignore", []) or [])
    for kind, patterns in (("layers", list(layers)), ("ignore", ignore)):
        for pattern in patterns:
            if not any(matches(pattern, n) for n in names):
                findings.append({"code": "pattern-matches-nothing", "where": f"{where}.{kind}",
                                 "message": f"pattern {pattern!r} matches none of the {len(names)} linears the stage "
                                            f"quantizes (closest: {', '.join(closest_names(pattern, names))})",
                                 "fix": "use an exact module name or re:REGEX (matched from the start of the name)"})
    base = getattr(cfg, "group_size", None)
    if base is None:
        return findings
    bad: dict[int, list[str]] = {}
    for name, (_, width) in shapes.items():
        if any(matches(p, name) for p in ignore):
            continue
        group = base
        for pattern, override in layers.items():
            value = getattr(override, "group_size", None)
            if value is not None and matches(pattern, name):
                group = value
        if group and group > 0 and width % group:
            bad.setdefault(group, []).append(f"{name} (in {width})")
    for group, layers_bad in sorted(bad.items()):
        findings.append({"code": "group-size", "where": f"{where}.group_size",
                         "message": f"group size {group} does not divide the input width of {len(layers_bad)} "
                                    f"linear(s), e.g. {', '.join(layers_bad[:3])}",
                         "fix": "pick a group size that divides every width (a divisor of their gcd), -1 for per "
                                "channel, or override those layers with layers: {PATTERN: {group_size: N}}"})
    return findings


def model_findings(model_source: str | None, stages: list[tuple[str, Any]]) -> list[dict[str, str]]:
    """:func:`layer_findings` for each (stage id, config) of a per-layer quantize stage, or why it cannot run."""
    if not model_source or not stages:
        return []
    out = []
    for sid, cfg in stages:
        try:
            shapes = meta_linear_shapes(model_source, getattr(cfg, "targets", None), getattr(cfg, "exclude", None))
        except SourceError as exc:
            return [{"code": "model-unavailable", "where": "model.source", "message": str(exc),
                     "fix": "lint needs the model's configuration (not its weights)"}]
        out += layer_findings(sid, cfg, shapes)
    return out
