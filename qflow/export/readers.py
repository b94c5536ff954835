"""qflow's own readers of the layouts it exports: decode a folder back to float weights.

    weights = read_float_state_dict("export/")           # {param: fp32 tensor}
    model, tok = load_exported_model("export/")          # a plain float transformers model

Layouts (selected by ``quantization_config.quant_method`` in config.json):

* ``compressed-tensors`` -- ``pack-quantized`` (``weight_packed``, ``weight_scale``,
  ``weight_zero_point`` packed along dim 0, ``weight_shape``, optional
  ``weight_g_idx``) and ``int-quantized`` (int8 ``weight``); layers with dynamic
  activation quantization get a forward pre-hook with qflow's SYM-R activation
  fake-quant (``amax/127`` per token, as vLLM's int8 kernels do).
* ``awq`` -- AutoAWQ GEMM (``qweight [in, out/8]`` interleaved, ``qzeros``, ``scales``).
* ``gptq`` -- GPTQ v1 (``qzeros`` store ``z-1``) or ``gptq_v2`` (true zeros), with ``g_idx``.
* no quantization_config -- a float folder.

Decoding is done in fp32 as ``(float(q) - float(z)) * s``, the formula of the IR,
so an exactly-mapped layer decodes to the IR's dequantized weight bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import layouts

_QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                   "qweight", "qzeros", "scales", "g_idx", "input_scale", "input_zero_point")


# ---------------------------------------------------------------- per-layout decoders


def decode_compressed_tensors(t: dict[str, np.ndarray], weights: dict[str, Any], fmt: str) -> np.ndarray:
    """fp32 ``[out, in]`` from one module's compressed-tensors tensors."""
    bits = int(weights["num_bits"])
    half = 1 << (bits - 1)
    strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "channel")
    scale = np.asarray(t["weight_scale"], np.float32)
    if fmt == "int-quantized" or "weight" in t:
        q = np.asarray(t["weight"]).astype(np.float32)  # signed
        out, cols = q.shape
        q_u = q + half
    else:
        out, cols = (int(x) for x in np.asarray(t["weight_shape"]).reshape(-1)[:2])
        q_u = layouts.unpack_stream(t["weight_packed"], bits, cols).astype(np.float32)  # signed + 2^(b-1)
    scale2 = scale.reshape(1, 1) if strategy == "tensor" else scale.reshape(out, -1)
    n_groups = scale2.shape[1]
    if weights.get("symmetric", True) or "weight_zero_point" not in t:
        z_u = np.full(scale2.shape, float(half), np.float32)
    elif strategy == "tensor" or fmt == "int-quantized":
        z_u = np.asarray(t["weight_zero_point"]).astype(np.float32).reshape(scale2.shape) + half
    else:
        z_u = layouts.unpack_stream(t["weight_zero_point"], bits, out, axis=0).astype(np.float32).reshape(out, n_groups)
    if strategy == "tensor":
        return (q_u - z_u[0, 0]) * scale2[0, 0]
    if "weight_g_idx" in t:
        g = np.asarray(t["weight_g_idx"]).astype(np.int64)
    elif strategy == "group":
        g = np.arange(cols) // int(weights["group_size"])
    else:
        g = np.zeros(cols, np.int64)
    return (q_u - z_u[:, g]) * scale2[:, g]


def decode_awq_gemm(t: dict[str, np.ndarray], group_size: int) -> np.ndarray:
    """fp32 ``[out, in]`` from AutoAWQ GEMM ``qweight/qzeros/scales``."""
    scales = np.asarray(t["scales"]).astype(np.float32)          # [in/G, out]
    out = scales.shape[1]
    codes = layouts.unpack_awq(t["qweight"], out).T.astype(np.float32)    # [out, in]
    zeros = layouts.unpack_awq(t["qzeros"], out).T.astype(np.float32)     # [out, in/G]
    g = np.arange(codes.shape[1]) // group_size
    return (codes - zeros[:, g]) * scales.T[:, g]


def decode_gptq(t: dict[str, np.ndarray], bits: int, v1: bool = True) -> np.ndarray:
    """fp32 ``[out, in]`` from GPTQ ``qweight/qzeros/scales/g_idx`` (v1 adds 1 to stored zeros)."""
    scales = np.asarray(t["scales"]).astype(np.float32)          # [n_groups, out]
    n_groups, out = scales.shape
    g = np.asarray(t["g_idx"]).astype(np.int64)
    cols = g.shape[0]
    codes = layouts.unpack_stream(t["qweight"], bits, cols, axis=0).T.astype(np.float32)   # [out, in]
    stored = layouts.unpack_stream(t["qzeros"], bits, out).astype(np.float32)               # [n_groups, out]
    zeros = (stored + 1 if v1 else stored).T                                                # v1 quirk: z = stored + 1
    return (codes - zeros[:, g]) * scales.T[:, g]


# ---------------------------------------------------------------- folder reading


def quantization_config(folder: Path) -> dict[str, Any] | None:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return cfg.get("quantization_config")


def _safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files, each checked to be whole (a cut-short file is a clean error, not a Rust one)."""
    from qflow.errors import SourceError
    from qflow.models.integrity import check_safetensors, safetensors_files

    files = safetensors_files(Path(folder))
    if not files:
        raise SourceError(f"{folder} holds no *.safetensors", fix="point at an exported model folder")
    for f in files:
        check_safetensors(f)
    return files


def _iter_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                if t.dtype.is_floating_point:
                    t = t.float()
                yield k, t.numpy()


def _split(key: str) -> tuple[str, str]:
    for suffix in _QUANT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, ""


def ct_scheme_for(module: str, qcfg: dict[str, Any]) -> tuple[dict[str, Any], str, dict | None] | None:
    """(weights args, format, input_activations) of the config group targeting ``module``."""
    for ig in qcfg.get("ignore") or []:
        if _target_matches(ig, module):
            return None
    for group in qcfg.get("config_groups", {}).values():
        if any(_target_matches(tg, module) for tg in group.get("targets", [])):
            fmt = group.get("format") or qcfg.get("format") or "pack-quantized"
            return group["weights"], fmt, group.get("input_activations")
    return None


def _target_matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == "Linear"


def decoded_layers(folder: Path) -> Iterator[tuple[str, np.ndarray | None, np.ndarray]]:
    """Yield ``(name, decoded_or_None, raw)``: quantized modules as ``(module + ".weight", fp32, None)``,
    other tensors as ``(name, None, array)``."""
    folder = Path(folder)
    qcfg = quantization_config(folder) or {}
    method = qcfg.get("quant_method")
    pending: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in _iter_tensors(folder):
        module, suffix = _split(key)
        if suffix or (method == "compressed-tensors" and key.endswith(".weight") and arr.dtype == np.int8):
            if not suffix:
                module, suffix = key[: -len(".weight")], "weight"
            pending.setdefault(module, {})[suffix] = arr
            continue
        yield key, None, arr
    for module, t in pending.items():
        if method == "compressed-tensors":
            found = ct_scheme_for(module, qcfg)
            if found is None:
                raise ValueError(f"{folder}: {module} holds compressed tensors but no config group targets it")
            weights, fmt, _ = found
            w = decode_compressed_tensors(t, weights, fmt)
        elif method == "awq":
            w = decode_awq_gemm(t, int(qcfg["group_size"]))
        elif method == "gptq":
            w = decode_gptq(t, int(qcfg["bits"]), v1=qcfg.get("checkpoint_format", "gptq") != "gptq_v2")
        else:
            raise ValueError(f"{folder}: quantized tensors of {module} but quant_method is {method!r}")
        yield module + ".weight", w.astype(np.float32, copy=False), None


def read_float_state_dict(folder: str | Path) -> dict[str, "Any"]:
    """Every parameter of an exported folder as fp32 torch tensors (quantized layers decoded)."""
    import torch

    out = {}
    for name, decoded, raw in decoded_layers(Path(folder)):
        arr = decoded if decoded is not None else raw
        out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def activation_quantized_modules(folder: Path) -> dict[str, dict[str, Any]]:
    """module -> input_activations args, for compressed-tensors groups with dynamic activation quant."""
    qcfg = quantization_config(folder) or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        return {}
    from safetensors import safe_open

    out = {}
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                module, suffix = _split(k)
                if suffix != "weight_scale":
                    continue
                found = ct_scheme_for(module, qcfg)
                if found and found[2]:
                    out[module] = found[2]
    return out


def load_exported_model(folder: str | Path, dtype: str = "float32"):
    """``(model, tokenizer)``: a float transformers model with the weights of ``folder`` decoded by qflow.

    Activation quantization declared by compressed-tensors groups is applied with
    forward pre-hooks (qflow's SYM-R dynamic rule).
    """
    from transformers import AutoTokenizer

    from qflow.models.loading import _torch_dtype
    from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

    folder = Path(folder)
    torch_dtype = _torch_dtype(dtype)
    model = _float_model(folder, torch_dtype)
    _load_decoded(model, read_float_state_dict(folder), folder, torch_dtype)
    act = activation_quantized_modules(folder)
    if act:
        _hook_activations(model, act)
    model.eval()
    with remote_code_refusal(str(folder)):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=remote_code_allowed())
    return model, tokenizer


# ---------------------------------------------------------------- the compressed-tensors library as reader


def compressed_tensors_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("compressed_tensors") is not None


def ct_library_state_dict(folder: str | Path) -> dict[str, "Any"]:
    """Float state dict decoded by the compressed-tensors library's own compressors.

    Each module's tensors go through ``BaseCompressor.get_value_from_registry(format)
    .decompress(state_dict, scheme)`` -- the library's decoder, independent of qflow's.
    """
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = Path(folder)
    qcfg = quantization_config(folder) or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{folder} is not a compressed-tensors export")
    modules: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    from safetensors import safe_open

    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                module, suffix = _split(k)
                t = h.get_tensor(k)
                if not suffix and k.endswith(".weight") and t.dtype == torch.int8:
                    module, suffix = k[: -len(".weight")], "weight"
                if suffix:
                    modules.setdefault(module, {})[suffix] = t
                else:
                    out[k] = t.float() if t.is_floating_point() else t
    for module, tensors in modules.items():
        found = ct_scheme_for(module, qcfg)
        if found is None:
            raise ValueError(f"{folder}: no config group targets {module}")
        weights, fmt, act = found
        scheme = QuantizationScheme(targets=[module], weights=weights, input_activations=act)
        compressor = BaseCompressor.get_value_from_registry(fmt)
        dec = compressor.decompress(dict(tensors), scheme)
        out[module + ".weight"] = dec["weight"].float()
    return out


def load_with_compressed_tensors(folder: str | Path, dtype: str = "float32"):
    """``(model, tokenizer, how)`` of a compressed-tensors export loaded by the reference libraries.

    First ``transformers.AutoModelForCausalLM.from_pretrained`` (transformers'
    compressed-tensors integration, which decompresses on load); when that fails
    (compressed-tensors 0.20 sizes asymmetric zero points unpacked on the meta
    device and rejects the packed ``[out*b/32, n_groups]`` tensors vLLM and its own
    compressor use), the library's compressors decode each module
    (:func:`ct_library_state_dict`) into a float model. ``how`` says which.
    """
    from transformers import AutoTokenizer

    from qflow.models.encoders import auto_model_class
    from qflow.models.loading import DEFAULT_ATTN_IMPLEMENTATION, _torch_dtype
    from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

    folder = Path(folder)
    torch_dtype = _torch_dtype(dtype)
    remote = remote_code_allowed()   # only the command line's --trust-remote-code, never a recipe
    import contextlib
    import io

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            hf_logging.set_verbosity(hf_logging.CRITICAL)
            auto_class = auto_model_class(json.loads((folder / "config.json").read_text()))
            model = auto_class.from_pretrained(folder, dtype=torch_dtype, local_files_only=True,
                                               attn_implementation=DEFAULT_ATTN_IMPLEMENTATION,
                                               trust_remote_code=remote)
        how = "transformers+compressed-tensors"
    except (RuntimeError, ValueError, OSError) as err:
        model = _float_model(folder, torch_dtype)
        state = ct_library_state_dict(folder)
        _load_decoded(model, state, folder, torch_dtype)
        qcfg = quantization_config(folder) or {}
        asym = any(not (g.get("weights") or {}).get("symmetric", True) for g in qcfg.get("config_groups", {}).values())
        if asym and "mismatch" in str(err):
            why = ("transformers with compressed-tensors " + _ct_version() + " sizes asymmetric zero points "
                   "unpacked and rejects the packed [out*b/32, n_groups] tensors its own compressor writes")
        else:
            why = f"transformers could not load it: {str(err).splitlines()[0][:160]}"
        how = f"compressed-tensors compressors ({why})"
    finally:
        hf_logging.set_verbosity(verbosity)
    act = activation_quantized_modules(folder)
    if act and not how.startswith("transformers"):
        _hook_activations(model, act)
    model.eval()
    with remote_code_refusal(str(folder)):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=remote)
    return model, tokenizer, how


def _ct_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compressed-tensors")
    except PackageNotFoundError:
        return "?"


def _float_model(folder: Path, torch_dtype):
    from transformers import AutoConfig

    from qflow.models.encoders import auto_model_class
    from qflow.models.loading import DEFAULT_ATTN_IMPLEMENTATION
    from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

    remote = remote_code_allowed()   # only the command line's --trust-remote-code, never a recipe
    raw = json.loads((folder / "config.json").read_text())
    dropped = ("quantization_config", "qflow")   # the float model qflow fills with its own decoded weights
    if "auto_map" in raw:   # the checkpoint's own configuration class
        with remote_code_refusal(str(folder)):
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=remote)
        for key in dropped:
            if hasattr(config, key):
                delattr(config, key)
    else:
        config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in dropped})
    with remote_code_refusal(str(folder)):
        return auto_model_class(raw).from_config(config, dtype=torch_dtype, trust_remote_code=remote,
                                                attn_implementation=DEFAULT_ATTN_IMPLEMENTATION)


def _tied_names(model) -> set[str]:
    """Parameter names that alias an earlier one (a tied head: ``lm_head.weight``, BERT's
    ``cls.predictions.decoder.weight``); an export stores the tensor once, under the first name."""
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def _load_decoded(model, state: dict, folder: Path, torch_dtype) -> None:
    from qflow.models.moe import unfuse_experts
    from qflow.quant.expert_names import logical_name

    if unfuse_experts(model):   # a mixture of experts: per-expert tensors (qflow/export/moe_names.py)
        state = {logical_name(k, model.config.model_type): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=False)
    tied = _tied_names(model)
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder}: decoded weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()


def _hook_activations(model, act: dict[str, dict[str, Any]]) -> None:
    from qflow.quant.qlinear import fake_quant_activation

    for module_name, args in act.items():
        bits, gran = int(args["num_bits"]), "token" if args.get("strategy") == "token" else "tensor"
        model.get_submodule(module_name).register_forward_pre_hook(
            lambda mod, inputs, b=bits, g=gran: (fake_quant_activation(inputs[0], b, g), *inputs[1:]))
