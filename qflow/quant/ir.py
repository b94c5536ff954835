"""The quantized-checkpoint IR: a delta over a float base model.

A checkpoint is a folder::

    ir.json                    # version, base model, method, per-layer specs, shard index
    shard-00000.safetensors    # tensors, written block by block (one shard per flush)

For each quantized linear ``NAME`` (a module path such as
``model.layers.0.self_attn.q_proj``) the shards hold

* ``NAME.qweight``  int32 ``[out, ceil(in / (32 // bits))]`` (qflow.quant.packing)
* ``NAME.scales``   ``[out, n_groups]`` in the spec's scale dtype (nf4/fp4: fp32 absmax)
* ``NAME.zeros``    ``[out, n_groups]`` uint8 (integer zero) or fp16 (``zero_float``);
  absent for symmetric and lookup formats (zero is implied)
* ``NAME.g_idx``    int32 ``[in]`` only when act-order reorders groups
* ``NAME.absmax_codes/absmax2/absmax_offset`` for nf4/fp4 with double quantization

and ``float:PARAM`` entries for float tensors the method changed (AWQ folds
scales into norms). Tensors are read lazily, one at a time, so a large
checkpoint never sits in memory twice.

Methods that fold per-channel scales (AWQ, SmoothQuant) record each fold as
``fold:PREV`` (fp32 ``[n]``, the scales ``s``) with ``ir.json`` ``folds[PREV] =
{"shard", "linears"}``: the output of module ``PREV`` (a norm, or the last ``n``
output rows of a linear) was divided by ``s`` and the input columns of every
linear in ``linears`` multiplied by ``s``. So a quantized linear holds
``Q(diag(r)·W·diag(c))`` with ``c`` the product of the folds it reads and ``r``
one over the fold it feeds (:meth:`Checkpoint.fold_factors`), which maps it
back to the float model's coordinates exactly. Checkpoints written before
folds were recorded have none (``folds == {}``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import dispatch
from . import affine
from .spec import QuantSpec

IR_VERSION = 1
IR_FILE = "ir.json"


@dataclass(frozen=True)
class LayerRecord:
    name: str
    spec: QuantSpec
    out_features: int
    in_features: int
    shard: str
    g_idx: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(mode="json"), "out_features": self.out_features,
                "in_features": self.in_features, "shard": self.shard, "g_idx": self.g_idx}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> "LayerRecord":
        return cls(name=name, spec=QuantSpec(**data["spec"]), out_features=data["out_features"],
                   in_features=data["in_features"], shard=data["shard"], g_idx=data.get("g_idx", False))

    def bpw(self) -> float:
        return self.spec.bpw(self.out_features, self.in_features, g_idx=self.g_idx)


_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def encode_layer(spec: QuantSpec, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors (suffix -> tensor) of one quantized linear."""
    tensors = {"qweight": dispatch.pack(codes.to(torch.uint8).contiguous(), spec.bits)}
    if spec.format in ("nf4", "fp4"):
        if spec.double_quant:
            dq = affine.double_quantize(scale)
            tensors |= {"absmax_codes": dq["codes"], "absmax2": dq["absmax2"], "absmax_offset": dq["offset"]}
        else:
            tensors["scales"] = scale.float().contiguous()
    else:
        tensors["scales"] = scale.to(_SCALE_DTYPES[spec.scale_dtype]).contiguous()
        if spec.has_zero:
            tensors["zeros"] = (zero.to(torch.float16) if spec.zero_float else zero.round().to(torch.uint8)).contiguous()
    if g_idx is not None:
        tensors["g_idx"] = g_idx.to(torch.int32).contiguous()
    return tensors


def layer_nbytes(spec: QuantSpec, out_features: int, in_features: int, *, g_idx: bool = False) -> int:
    """Bytes :func:`encode_layer` stores for one ``[out, in]`` linear (codes, scales, zeros, g_idx, DQ tensors).

    Computed from shapes alone, so a bit allocation can price an option without
    quantizing; ``tests/test_allocate.py`` checks it against ``encode_layer``.

        layer_nbytes(QuantSpec(bits=4, group_size=64, scheme="asym_a"), 64, 128) == 64 * (16*4 + 2*2 + 2)
    """
    from ..kernels.params import packed_words

    total = out_features * packed_words(in_features, spec.bits) * 4
    n_params = (1 if spec.group_size == 0 else out_features) * spec.n_groups(in_features)
    if spec.format in ("nf4", "fp4"):
        if spec.double_quant:
            total += n_params + 4 * -(-n_params // 256) + 4   # uint8 codes, fp32 absmax2 per 256, fp32 offset
        else:
            total += 4 * n_params
    else:
        total += n_params * _SCALE_DTYPES[spec.scale_dtype].itemsize
        if spec.has_zero:
            total += n_params * (2 if spec.zero_float else 1)
    if g_idx:
        total += 4 * in_features
    return total


def decode_params(spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) fp32 from a layer's stored tensors."""
    if spec.format in ("nf4", "fp4") and spec.double_quant:
        dq = {"codes": tensors["absmax_codes"], "absmax2": tensors["absmax2"],
              "offset": tensors["absmax_offset"], "map": affine.dynamic_map_signed()}
        scale = affine.double_dequantize(dq)
    else:
        scale = tensors["scales"].float()
    if "zeros" in tensors:
        zero = tensors["zeros"].float()
    elif spec.format == "int":
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        zero = torch.zeros_like(scale)
    return scale, zero


class CheckpointWriter:
    """Streams a checkpoint to disk: ``add_*`` then ``flush()`` per block, ``close()`` at the end."""

    def __init__(self, path: str | os.PathLike, *, base_model: str, method: str,
                 meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.base_model = base_model
        self.method = method
        self.meta = dict(meta or {})
        self.layers: dict[str, LayerRecord] = {}
        self.floats: dict[str, str] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_layers: list[tuple[str, QuantSpec, int, int, bool]] = []
        self._pending_floats: list[str] = []
        self.folds: dict[str, dict[str, Any]] = {}
        self._pending_folds: list[tuple[str, list[str]]] = []
        self._shards = sorted(p.name for p in self.path.glob("shard-*.safetensors"))

    def add_quantized(self, name: str, spec: QuantSpec, codes: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor, g_idx: torch.Tensor | None = None) -> None:
        out, cols = codes.shape
        for suffix, t in encode_layer(spec, codes, scale, zero, g_idx).items():
            self._pending[f"{name}.{suffix}"] = t.detach().cpu()
        self._pending_layers.append((name, spec, out, cols, g_idx is not None))

    def add_float(self, param: str, tensor: torch.Tensor) -> None:
        self._pending[f"float:{param}"] = tensor.detach().cpu().contiguous()
        self._pending_floats.append(param)

    def add_fold(self, prev: str, linears: list[str], scales: torch.Tensor) -> None:
        """Record that ``prev``'s output was divided by ``scales`` and ``linears``' input columns multiplied by them."""
        if prev in self.folds or any(p == prev for p, _ in self._pending_folds):
            raise ValueError(f"a fold into {prev} is already recorded")
        self._pending[f"fold:{prev}"] = scales.detach().float().cpu().contiguous()
        self._pending_folds.append((prev, list(linears)))

    def flush(self) -> str | None:
        """Write pending tensors to a new shard; returns its file name (None if nothing pending)."""
        if not self._pending:
            return None
        from safetensors.torch import save_file

        shard = f"shard-{len(self._shards):05d}.safetensors"
        tmp = self.path / (shard + ".tmp")
        save_file(self._pending, str(tmp))
        os.replace(tmp, self.path / shard)
        self._shards.append(shard)
        for name, spec, out, cols, has_g in self._pending_layers:
            self.layers[name] = LayerRecord(name, spec, out, cols, shard, has_g)
        for p in self._pending_floats:
            self.floats[p] = shard
        for prev, linears in self._pending_folds:
            self.folds[prev] = {"shard": shard, "linears": linears}
        self._pending, self._pending_layers, self._pending_floats, self._pending_folds = {}, [], [], []
        return shard

    def state(self) -> dict[str, Any]:
        """JSON-able index of what has been flushed (used to resume a stage)."""
        return {"layers": {n: r.to_json() for n, r in self.layers.items()}, "floats": dict(self.floats),
                "folds": {p: dict(f) for p, f in self.folds.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.layers = {n: LayerRecord.from_json(n, d) for n, d in state["layers"].items()}
        self.floats = dict(state["floats"])
        self.folds = {p: dict(f) for p, f in state.get("folds", {}).items()}
        keep = (set(r.shard for r in self.layers.values()) | set(self.floats.values())
                | {f["shard"] for f in self.folds.values()})
        for p in self.path.glob("shard-*.safetensors"):
            if p.name not in keep:
                p.unlink()
        self._shards = sorted(keep)

    def close(self) -> "Checkpoint":
        self.flush()
        index = {"version": IR_VERSION, "base_model": self.base_model, "method": self.method,
                 "meta": self.meta, **self.state()}
        tmp = self.path / (IR_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, self.path / IR_FILE)
        return Checkpoint(self.path)


class Checkpoint:
    """Read side of the IR; every tensor is loaded lazily on request."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / IR_FILE
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} is missing: not a qflow quantized checkpoint")
        index = json.loads(index_file.read_text())
        if index.get("version") != IR_VERSION:
            raise ValueError(f"{index_file}: IR version {index.get('version')} != {IR_VERSION}")
        self.base_model: str = index["base_model"]
        self.method: str = index["method"]
        self.meta: dict[str, Any] = index.get("meta", {})
        self.layers = {n: LayerRecord.from_json(n, d) for n, d in index["layers"].items()}
        self.floats: dict[str, str] = index["floats"]
        self.folds: dict[str, dict[str, Any]] = index.get("folds", {})

    def _read(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / shard), framework="pt") as f:
            return f.get_tensor(key)

    def layer_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        rec = self.layers[name]
        prefix = name + "."
        with safe_open(str(self.path / rec.shard), framework="pt") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and not k.startswith("float:")}

    def float_tensor(self, param: str) -> torch.Tensor:
        return self._read(self.floats[param], f"float:{param}")

    def iter_floats(self) -> Iterator[tuple[str, torch.Tensor]]:
        for p in self.floats:
            yield p, self.float_tensor(p)

    def fold_scale(self, prev: str) -> torch.Tensor:
        """fp32 scales ``s`` of the fold recorded into ``prev`` (see the module doc)."""
        return self._read(self.folds[prev]["shard"], f"fold:{prev}")

    def fold_factors(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(r [out], c [in])`` with the stored layer ``≈ Q(diag(r)·W·diag(c))`` from the recorded folds
        (``None`` for a side no fold touched)."""
        rec = self.layers[name]
        col = None
        for prev, fold in self.folds.items():
            if name in fold["linears"]:
                s = self.fold_scale(prev)
                col = s if col is None else col * s
        row = None
        if name in self.folds:
            s = self.fold_scale(name)
            row = torch.ones(rec.out_features)
            row[rec.out_features - s.numel():] = 1.0 / s
        return row, col

    def params(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [out, in], scale fp32, zero fp32) of one layer."""
        rec = self.layers[name]
        t = self.layer_tensors(name)
        codes = dispatch.unpack(t["qweight"], rec.spec.bits, rec.in_features)
        scale, zero = decode_params(rec.spec, t)
        return codes, scale, zero

    def dequantized(self, name: str) -> torch.Tensor:
        """fp32 ``[out, in]`` weight of one quantized layer (g_idx layouts keep column order)."""
        rec = self.layers[name]
        t = self.layer_tensors(name)
        scale, zero = decode_params(rec.spec, t)
        if "g_idx" in t:
            codes = dispatch.unpack(t["qweight"], rec.spec.bits, rec.in_features)
            g = t["g_idx"].long()
            s = scale[:, g]
            if rec.spec.format == "int":
                return (codes.float() - zero[:, g]) * s
            return affine.lut(rec.spec)[codes.long()] * s
        return dispatch.dequantize_packed(t["qweight"], scale, zero, rec.spec, rec.in_features)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def layer_bytes(self, name: str) -> int:
        """Stored bytes of one quantized layer: packed codes + scales + zeros (+ g_idx, DQ tables)."""
        return sum(t.numel() * t.element_size() for t in self.layer_tensors(name).values())

    def quantized_bytes(self) -> int:
        """Bytes of codes, scales, zeros and g_idx of quantized layers (float deltas excluded)."""
        return sum(self.layer_bytes(name) for name in self.layers)

    def distinct_specs(self) -> dict[str, list[str]]:
        """``{spec JSON: [layers]}``: one entry for a uniform checkpoint, several for a mixed one."""
        out: dict[str, list[str]] = {}
        for name, rec in self.layers.items():
            out.setdefault(json.dumps(rec.spec.model_dump(mode="json"), sort_keys=True), []).append(name)
        return out

    def n_quantized_weights(self) -> int:
        return sum(r.out_features * r.in_features for r in self.layers.values())

    def bpw_quantized(self) -> float:
        """Nominal bits per weight over quantized layers (spec accounting, docs/METHODS.md §1)."""
        n = self.n_quantized_weights()
        return sum(r.bpw() * r.out_features * r.in_features for r in self.layers.values()) / max(n, 1)
