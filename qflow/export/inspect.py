"""``qflow inspect PATH``: identify a quantized model from its headers, never its weights.

    info = inspect_path("export/")        # dict; `qflow inspect PATH --json` prints it

What is read:

* safetensors: the 8-byte length + JSON header of every file (names, dtypes,
  shapes); at most a few bytes of one tiny tensor when the header alone cannot
  tell (``weight_shape``, one ``qzeros``), read by offset;
* GGUF: ``gguf.GGUFReader`` (memory-mapped): metadata and tensor types/sizes;
* ONNX: ``onnx.load(path, load_external_data=False)``: node types and attributes;
* ``config.json``'s ``quantization_config`` and ``qflow`` sections; ``ir.json`` of a
  qflow IR folder.

Method fingerprints (tensor-name suffixes per module):

==========================  ===============================================================
GPTQ                        ``qweight`` + ``qzeros`` + ``scales`` + ``g_idx``; qweight
                            ``[in*b/32, out]`` (packed along the input dim)
AutoAWQ GEMM                ``qweight [in, out/8]`` + ``qzeros`` + ``scales [in/G, out]``
bitsandbytes                ``weight`` + ``weight.absmax`` / ``quant_map`` / ``nested_*`` /
                            ``quant_state.bitsandbytes__nf4|fp4``; int8: ``SCB``
compressed-tensors          ``weight_packed`` + ``weight_scale`` + ``weight_shape``
                            (``int-quantized``: int8 ``weight`` + ``weight_scale``)
FP8                         float8 ``weight`` (F8_E4M3 / F8_E5M2) + ``weight_scale``
GGUF                        tensor types (Q4_0, Q4_K, ...)
ONNX MatMulNBits            ``com.microsoft.MatMulNBits`` attributes bits / block_size
==========================  ===============================================================
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from qflow.errors import QflowError

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_GGUF_FLOAT = {"F32", "F16", "BF16", "F64"}
_GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q8_1": 8, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4,
              "Q5_K": 5, "Q6_K": 6, "Q8_K": 8, "IQ4_NL": 4, "IQ4_XS": 4, "TQ1_0": 1.69, "TQ2_0": 2, "MXFP4": 4}
_GGUF_SYM = {"Q4_0": True, "Q5_0": True, "Q8_0": True, "Q4_1": False, "Q5_1": False, "Q2_K": False,
             "Q3_K": True, "Q4_K": False, "Q5_K": False, "Q6_K": True}


class InspectError(QflowError):
    """The path is missing or holds nothing qflow can identify."""


# ---------------------------------------------------------------- safetensors headers


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensors {name: {dtype, shape, data_offsets}}, metadata, data start offset) from the header only.

    The file's length is checked against the header (a cut-short file is an InspectError).
    """
    from qflow.models.integrity import CorruptFileError, check_safetensors

    try:
        return check_safetensors(Path(path))
    except CorruptFileError as err:
        raise InspectError(err.what, fix=err.fix) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise InspectError(f"{path} is not valid JSON ({err})", fix="repair or restore the file") from None


def _read_small(path: Path, start: int, info: dict[str, Any], limit: int = 1 << 16):
    """The values of one small tensor, read by offset (None when it is larger than ``limit`` bytes)."""
    import numpy as np

    a, b = info["data_offsets"]
    if b - a > limit:
        return None
    dtype = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "F32": "<f4",
             "F16": "<f2"}.get(info["dtype"])
    if dtype is None:
        return None
    with open(path, "rb") as fh:
        fh.seek(start + a)
        return np.frombuffer(fh.read(b - a), dtype=dtype).reshape(info["shape"])


def _nbytes(info: dict[str, Any]) -> int:
    a, b = info["data_offsets"]
    return b - a


_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
             "weight_global_scale", "input_scale", "input_global_scale",
             "qweight", "qzeros", "scales", "g_idx", "SCB", "weight_format",
             "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
             "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "weight", "bias")


def _split(name: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, ""


def _fingerprint_module(t: dict[str, dict[str, Any]]) -> str | None:
    """Method of one module from its tensors' suffixes/dtypes/shapes (None: a float or non-linear tensor)."""
    keys = set(t)
    if "qweight" in keys and "scales" in keys:
        qw, sc = t["qweight"]["shape"], t["scales"]["shape"]
        if len(qw) == 2 and len(sc) == 2:
            if qw[1] == sc[1]:
                return "gptq"                     # packed along the input rows
            if qw[1] * 8 == sc[1]:
                return "awq-gemm"                 # packed along the output columns
        return "gptq-like"
    if "weight_packed" in keys:
        return "compressed-tensors"
    if any(k.startswith("weight.quant_state.bitsandbytes__") for k in keys) or "weight.absmax" in keys:
        return "bitsandbytes-4bit"
    if "SCB" in keys or "weight_format" in keys:
        return "bitsandbytes-int8"
    w = t.get("weight")
    if w is not None and w["dtype"] in ("F8_E4M3", "F8_E5M2"):
        return "fp8"
    if w is not None and w["dtype"] == "I8" and "weight_scale" in keys:
        return "compressed-tensors-int"
    if w is not None and w["dtype"] in ("I8", "U8", "I32"):
        return "integer"
    return None


def _group_info(method: str, t: dict[str, dict[str, Any]], qcfg: dict[str, Any], read) -> dict[str, Any]:
    """bits / group size / symmetric / [out, in] of one quantized module (None where unknown)."""
    out: dict[str, Any] = {"bits": None, "group_size": None, "symmetric": None, "shape": None}
    if method == "gptq":
        qw, sc = t["qweight"]["shape"], t["scales"]["shape"]
        cols = t["g_idx"]["shape"][0] if "g_idx" in t else qcfg.get("_in")
        bits = qcfg.get("bits") or (round(qw[0] * 32 / cols) if cols else None)
        cols = cols or (qw[0] * 32 // bits if bits else None)
        out.update(bits=bits, shape=[qw[1], cols])
        if qcfg.get("group_size"):
            out["group_size"] = qcfg["group_size"]
        elif cols:
            out["group_size"] = -1 if sc[0] == 1 else cols // sc[0]
        if "sym" in qcfg:
            out["symmetric"] = bool(qcfg["sym"])
        elif bits:
            z = read("qzeros")
            if z is not None:
                import numpy as np

                half = (1 << (bits - 1)) - 1      # v1 stores z-1
                per = 32 // bits if 32 % bits == 0 else None
                if per:
                    word = sum(half << (bits * i) for i in range(per)) & 0xFFFFFFFF
                    out["symmetric"] = bool(np.all((z.astype(np.int64) & 0xFFFFFFFF) == word))
    elif method == "awq-gemm":
        qw, sc = t["qweight"]["shape"], t["scales"]["shape"]
        out.update(bits=4, shape=[sc[1], qw[0]], group_size=qw[0] // sc[0])
        out["symmetric"] = False if qcfg.get("zero_point", True) else True
    elif method == "compressed-tensors":
        sc = t["weight_scale"]["shape"]
        shape = read("weight_shape")
        shape = [int(x) for x in shape.reshape(-1)[:2]] if shape is not None else None
        packed = t["weight_packed"]["shape"]
        bits = None
        weights = qcfg.get("_weights")
        if weights:
            bits = weights.get("num_bits")
        if bits is None and shape:
            bits = round(packed[1] * 32 / shape[1])
        out.update(bits=bits, shape=shape or [packed[0], None])
        if weights and weights.get("group_size"):
            out["group_size"] = weights["group_size"]
        elif shape and len(sc) == 2:
            out["group_size"] = -1 if sc[1] == 1 else shape[1] // sc[1]
        elif len(sc) <= 1:
            out["group_size"] = 0
        out["symmetric"] = "weight_zero_point" not in t
    elif method == "compressed-tensors-int":
        w = t["weight"]["shape"]
        out.update(bits=(qcfg.get("_weights") or {}).get("num_bits", 8), shape=w,
                   symmetric="weight_zero_point" not in t)
        sc = t["weight_scale"]["shape"]
        out["group_size"] = 0 if len(sc) <= 1 or sc[0] == 1 else (-1 if sc[-1] == 1 else w[1] // sc[-1])
    elif method == "fp8":
        w = t["weight"]["shape"]
        sc = t.get("weight_scale", {}).get("shape")
        out.update(bits=8, shape=w, symmetric=True)
        if sc is not None:
            n = math.prod(sc) if sc else 1
            out["group_size"] = 0 if n == 1 else (-1 if n == w[0] else None)
            if n not in (1, w[0]) and len(sc) == 2:
                out["block"] = [w[0] // sc[0], w[1] // sc[1]]
    elif method == "bitsandbytes-4bit":
        kind = next((k.rsplit("__", 1)[1] for k in t if k.startswith("weight.quant_state.bitsandbytes__")), None)
        out.update(bits=4, symmetric=True, format=kind)
        state = next((k for k in t if k.startswith("weight.quant_state.")), None)
        qs = read(state) if state else None
        if qs is not None:
            try:
                st = json.loads(bytes(qs.astype("u1")).decode())
                out["group_size"] = st.get("blocksize")
                out["shape"] = st.get("shape")
                out["format"] = st.get("quant_type", kind)
                out["double_quant"] = "nested_blocksize" in st
            except ValueError:
                pass
    elif method == "bitsandbytes-int8":
        out.update(bits=8, symmetric=True, group_size=-1, shape=t["weight"]["shape"] if "weight" in t else None)
    return out


def _ct_weights_for(module: str, qcfg: dict[str, Any]) -> dict[str, Any] | None:
    from .readers import ct_scheme_for

    found = ct_scheme_for(module, qcfg)
    return found[0] if found else None


def inspect_safetensors(files: list[Path], config: dict[str, Any] | None) -> dict[str, Any]:
    qcfg = (config or {}).get("quantization_config") or {}
    tensors: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    metadata: dict[str, str] = {}
    for f in files:
        header, meta, start = read_safetensors_header(f)
        metadata.update(meta)
        for name, info in header.items():
            tensors[name] = (f, start, info)
    modules: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (_, _, info) in tensors.items():
        module, suffix = _split(name)
        if suffix:
            modules.setdefault(module, {})[suffix] = info
        else:
            modules.setdefault(name, {})[""] = info
    per_method: Counter = Counter()
    layers: dict[str, dict[str, Any]] = {}
    unquantized: list[str] = []
    total_bits = 0.0
    total_weights = 0
    dtypes: Counter = Counter()
    for module, t in modules.items():
        for info in t.values():
            dtypes[info["dtype"]] += 1
        method = _fingerprint_module(t)
        if method is None:
            w = t.get("weight")
            if w is not None and len(w["shape"]) == 2 and w["dtype"] in _FLOAT_DTYPES:
                unquantized.append(module)
            continue

        def read(suffix, module=module):
            if suffix is None:
                return None
            f, start, info = tensors[f"{module}.{suffix}"]
            return _read_small(f, start, info)

        cfg_here = dict(qcfg)
        if method.startswith("compressed-tensors") and qcfg.get("quant_method") == "compressed-tensors":
            cfg_here["_weights"] = _ct_weights_for(module, qcfg)
        info = _group_info(method, t, cfg_here, read)
        per_method[method] += 1
        nbytes = sum(_nbytes(i) for k, i in t.items() if k not in ("bias",))
        shape = info.get("shape")
        if shape and all(isinstance(x, int) and x for x in shape[:2]):
            n = shape[0] * shape[1]
            total_weights += n
            total_bits += 8 * nbytes
            info["bpw"] = 8 * nbytes / n
        info["method"] = method
        layers[module] = info
    result = _summarize(layers, per_method)
    result.update({"format": "safetensors", "n_tensors": len(tensors), "files": [str(f) for f in files],
                   "unquantized": sorted(unquantized), "n_unquantized": len(unquantized),
                   "bpw": total_bits / total_weights if total_weights else None,
                   "dtypes": dict(dtypes)})
    if not layers:
        result["method"] = "float" if not qcfg else qcfg.get("quant_method")
    if qcfg:
        result["quantization_config"] = qcfg
        if qcfg.get("quant_method") == "compressed-tensors":
            result["ct_format"] = qcfg.get("format")
    qflow = (config or {}).get("qflow")
    if not qflow and any(k.startswith("qflow_") for k in metadata):
        qflow = {k[len("qflow_"):]: v for k, v in metadata.items() if k.startswith("qflow_") and k != "qflow_layers"}
    if qflow:
        result["qflow"] = {k: v for k, v in qflow.items() if k != "layers"}
    if metadata:
        result["metadata"] = {k: (v if len(v) < 200 else v[:200] + "...") for k, v in metadata.items()}
    return result


def _summarize(layers: dict[str, dict[str, Any]], per_method: Counter) -> dict[str, Any]:
    def one(key):
        vals = sorted({json.dumps(v.get(key)) for v in layers.values()})
        vals = [json.loads(v) for v in vals]
        return vals[0] if len(vals) == 1 else (vals or None)

    methods = list(per_method)
    return {"method": methods[0] if len(methods) == 1 else (methods or None),
            "bits": one("bits"), "group_size": one("group_size"), "symmetric": one("symmetric"),
            "n_quantized": len(layers),
            "layers": {n: {k: v for k, v in info.items()} for n, info in layers.items()}}


# ---------------------------------------------------------------- GGUF


def inspect_gguf(path: Path) -> dict[str, Any]:
    import gguf

    from qflow.models.integrity import CorruptFileError, check_gguf
    from qflow.quant.spec import GGUF_TYPES

    try:
        check_gguf(path)
    except CorruptFileError as err:
        raise InspectError(err.what, fix=err.fix) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise InspectError(f"{path} cannot be read as a GGUF file ({err})",
                           fix="check that the file is a complete GGUF (v2 or v3)") from None
    meta = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = f"[{len(f.data)} items]"
        elif key.startswith("GGUF."):
            continue
        else:
            v = f.contents()
            meta[key] = v if not isinstance(v, str) or len(v) < 300 else v[:300] + "..."
    types: Counter = Counter()
    unquantized, quant_bytes, quant_elems = [], 0, 0
    layers = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        types[name] += 1
        if name in _GGUF_FLOAT:
            if len(t.shape) == 2:
                unquantized.append(t.name)
            continue
        quant_bytes += int(t.n_bytes)
        quant_elems += int(t.n_elements)
        block = GGUF_TYPES.get(name, (None, None))[0]
        layers[t.name] = {"type": name, "bits": _GGUF_BITS.get(name), "group_size": block,
                          "symmetric": _GGUF_SYM.get(name), "bpw": 8 * int(t.n_bytes) / int(t.n_elements)}
    qtypes = [k for k in types if k not in _GGUF_FLOAT]
    result = _summarize(layers, Counter({"gguf": len(layers)}) if layers else Counter())
    result.update({"format": "gguf", "method": "gguf" if layers else "float", "tensor_types": dict(types),
                   "quant_types": qtypes, "bpw": 8 * quant_bytes / quant_elems if quant_elems else None,
                   "unquantized": sorted(unquantized), "n_unquantized": len(unquantized),
                   "architecture": meta.get("general.architecture"), "file_type": meta.get("general.file_type"),
                   "n_tensors": len(reader.tensors),
                   "metadata": {k: v for k, v in meta.items() if not k.startswith("qflow.")}})
    qflow = {k[len("qflow."):]: v for k, v in meta.items() if k.startswith("qflow.") and k != "qflow.layers"}
    if qflow:
        result["qflow"] = qflow
    return result


# ---------------------------------------------------------------- ONNX


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: a damaged or cut-short file
        raise InspectError(f"{path} cannot be read as an ONNX model ({type(err).__name__}: {err})",
                           fix="check that the file is a complete .onnx export") from None
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    ops: Counter = Counter(n.op_type for n in graph.node)
    layers, unquantized = {}, []
    total_bits, total_w = 0.0, 0
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            bits, block = int(attrs.get("bits", 4)), int(attrs.get("block_size", 0))
            k, n = int(attrs.get("K", 0)), int(attrs.get("N", 0))
            has_zp = len(node.input) > 3 and bool(node.input[3])
            scale = inits.get(node.input[2]) if len(node.input) > 2 else None
            scale_bits = 32 if scale is not None and scale.data_type == onnx.TensorProto.FLOAT else 16
            zp_bits = bits if has_zp else 0
            bpw = bits + (scale_bits + zp_bits) / block if block else None
            layers[node.name or node.output[0]] = {"bits": bits, "group_size": block, "symmetric": not has_zp,
                                                   "shape": [n, k], "bpw": bpw,
                                                   "accuracy_level": attrs.get("accuracy_level")}
            if bpw and k and n:
                total_bits += bpw * k * n
                total_w += k * n
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            unquantized.append(node.name or node.output[0])
    method = "matmulnbits" if layers else ("qdq" if ops.get("DequantizeLinear") else "float")
    result = _summarize(layers, Counter({method: len(layers)}) if layers else Counter())
    result.update({"format": "onnx", "method": method, "op_types": dict(ops),
                   "bpw": total_bits / total_w if total_w else None, "unquantized": sorted(unquantized),
                   "n_unquantized": len(unquantized), "opset": [f"{o.domain or 'ai.onnx'}:{o.version}"
                                                                for o in model.opset_import]})
    props = {p.key: p.value for p in model.metadata_props}
    if props:
        result["metadata"] = props
        q = {k[len("qflow."):]: v for k, v in props.items() if k.startswith("qflow.")}
        if q:
            result["qflow"] = q
    return result


# ---------------------------------------------------------------- qflow IR


def inspect_ir(path: Path) -> dict[str, Any]:
    index = _read_json(path / "ir.json")
    layers = {}
    from qflow.quant.spec import QuantSpec

    total_bits, total_w = 0.0, 0
    for name, d in index.get("layers", {}).items():
        spec = QuantSpec(**d["spec"])
        out_f, in_f = d["out_features"], d["in_features"]
        bpw = spec.bpw(out_f, in_f, g_idx=d.get("g_idx", False))
        layers[name] = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                        "format": spec.format, "scheme": spec.scheme, "shape": [out_f, in_f], "bpw": bpw,
                        "g_idx": d.get("g_idx", False)}
        total_bits += bpw * out_f * in_f
        total_w += out_f * in_f
    result = _summarize(layers, Counter({"qflow-ir": len(layers)}) if layers else Counter())
    result.update({"format": "qflow-ir", "method": "qflow-ir", "bpw": total_bits / total_w if total_w else None,
                   "qflow": {"ir_version": index.get("version"), "method": index.get("method"),
                             "base_model": index.get("base_model"), "meta": index.get("meta"),
                             "float_deltas": sorted(index.get("floats", {}))},
                   "unquantized": [], "n_unquantized": None,
                   "schemes": sorted({str(v["scheme"]) for v in layers.values()})})
    return result


# ---------------------------------------------------------------- entry points


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Identify what ``path`` holds (a folder or one file); headers only."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InspectError(f"{p} does not exist", fix="give a model folder, a .safetensors, .gguf or .onnx file")
    if p.is_dir():
        if (p / "ir.json").is_file():
            result = inspect_ir(p)
        else:
            config = _read_json(p / "config.json") if (p / "config.json").is_file() else None
            st = sorted(p.glob("*.safetensors"))
            ggufs, onnxs = sorted(p.glob("*.gguf")), sorted(p.glob("*.onnx"))
            if st:
                result = inspect_safetensors(st, config)
                result["format"] = "hf-folder" if config else "safetensors"
            elif len(ggufs) == 1 and not onnxs:
                result = inspect_gguf(ggufs[0])
            elif len(onnxs) == 1 and not ggufs:
                result = inspect_onnx(onnxs[0])
            elif ggufs or onnxs:
                raise InspectError(f"{p} holds several model files ({', '.join(x.name for x in ggufs + onnxs)})",
                                   fix="inspect one file")
            else:
                raise InspectError(f"{p} holds no ir.json, *.safetensors, *.gguf or *.onnx",
                                   fix="point at a model folder or file")
    else:
        with open(p, "rb") as fh:
            magic = fh.read(8)
        if magic[:4] == b"GGUF":
            result = inspect_gguf(p)
        elif p.suffix == ".onnx":
            result = inspect_onnx(p)
        elif p.suffix == ".safetensors" or (len(magic) == 8 and struct.unpack("<Q", magic)[0] < 100 * 2**20):
            cfg_file = p.parent / "config.json"
            config = _read_json(cfg_file) if cfg_file.is_file() else None
            result = inspect_safetensors([p], config)
        elif p.name == "config.json":
            return inspect_path(p.parent)
        else:
            raise InspectError(f"{p} is not a safetensors, GGUF or ONNX file", fix="check the path")
    result["path"] = str(p)
    return result


def _fmt(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def render(info: dict[str, Any]) -> str:
    method = info.get("method")
    if info.get("ct_format"):
        method = f"{_fmt(method)} ({info['ct_format']})"
    lines = [f"path:       {info['path']}",
             f"format:     {info.get('format')}",
             f"method:     {_fmt(method)}"]
    if info.get("n_quantized"):
        lines.append(f"bits:       {_fmt(info.get('bits'))}    group size: {_fmt(info.get('group_size'))}    "
                     f"symmetric: {_fmt(info.get('symmetric'))}")
        if info.get("bpw") is not None:
            lines.append(f"bpw:        {info['bpw']:.4f} (quantized layers, scales/zeros included)")
        lines.append(f"quantized:  {info['n_quantized']} layers")
    if info.get("quant_types"):
        lines.append(f"types:      {', '.join(f'{k} x{v}' for k, v in info['tensor_types'].items())}")
    if info.get("schemes"):
        lines.append(f"schemes:    {', '.join(info['schemes'])}")
    unq = info.get("unquantized") or []
    if unq:
        shown = ", ".join(unq[:6]) + (f", ... ({len(unq)} in all)" if len(unq) > 6 else "")
        lines.append(f"float:      {shown}")
    elif info.get("n_quantized"):
        lines.append("float:      none (every linear/embedding matrix is quantized)" if info.get("format") != "qflow-ir"
                     else "float:      everything outside the IR's layers (the base model)")
    q = info.get("quantization_config")
    if q:
        keys = {k: v for k, v in q.items() if k in ("quant_method", "format", "bits", "group_size", "sym", "desc_act",
                                                     "checkpoint_format", "version", "zero_point")}
        lines.append(f"config:     {json.dumps(keys, sort_keys=True)}")
    if info.get("qflow"):
        qf = info["qflow"]
        parts = [f"{k}={_fmt(v)}" for k, v in qf.items() if k in ("version", "method", "layout", "recipe_key",
                                                                  "ir_version", "base_model", "mapping")]
        lines.append(f"qflow:      {' '.join(parts)}")
    return "\n".join(lines)


def cli_inspect(args) -> int:
    info = inspect_path(args.path)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=1, default=str))
    else:
        print(render(info))
    return 0
