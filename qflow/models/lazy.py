"""A float model whose decoder blocks stay on disk until the block-wise driver needs them.

    net, adapter = load_model_lazy(model_dir, dtype="float32", attn_implementation="sdpa")
    loader = block_loader(net)          # None for a model loaded whole
    loader.load(3)                      # block 3's weights from the safetensors files
    ...                                 # quantize block 3
    loader.release(3)                   # back to the meta device
    release_freed_memory()              # and its pages back to the OS

Everything outside the blocks (embeddings, final norm, rotary tables, head) is
built on the CPU and loaded from the checkpoint; the blocks are built on the
meta device (no storage). Peak memory is then the non-block weights plus one
block, not the whole model: for a Llama-3-8B in fp32 about 2.3 GB instead of
32 GB. Used by every calibration-based quantize stage (``qflow.quant.algos.calibrated``).

A model family whose blocks hold buffers the checkpoint does not store (tables
computed in ``__init__``) cannot be rebuilt from the files block by block;
``load_model_lazy`` then loads the model whole and says so in the log.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import SourceError, StageError

if TYPE_CHECKING:
    from ..quant.expert_names import TensorRef

log = logging.getLogger(__name__)

_LOADER_ATTR = "qflow_block_loader"


class BlockLoader:
    """Loads block ``i``'s tensors into the meta-built ``blocks[i]`` and frees them again."""

    def __init__(self, model_dir: Path, blocks: nn.ModuleList, prefix: str, files: dict[str, "TensorRef"],
                 mapped: list | None = None):
        self.model_dir = Path(model_dir)
        self.blocks = blocks
        self.prefix = prefix
        self.files = files
        self.mapped = list(mapped or [])   # the memory-mapped non-block tensors' arrays (embedding, head)
        self.loaded: set[int] = set()

    def page_out_mapped(self) -> int:
        """Hand the mapped tensors' resident pages back (see :func:`page_out`); they stay readable."""
        return page_out(self.mapped)

    def load(self, index: int) -> None:
        if index in self.loaded:
            return
        block = self.blocks[index]
        block.to_empty(device="cpu")
        state = block.state_dict(keep_vars=True)
        names = {}
        for rel, target in state.items():
            name = f"{self.prefix}.{index}.{rel}"
            if name not in self.files:
                raise StageError(f"{name} is not in the checkpoint of {self.model_dir}",
                                 where=f"{self.prefix}.{index}",
                                 fix="the folder's weights do not match its config.json; rebuild the model folder")
            names[name] = target
        copy_from_checkpoint(names, self.files, self.model_dir, StageError)
        self.loaded.add(index)

    def release(self, index: int) -> None:
        if index in self.loaded:
            self.blocks[index].to_empty(device="meta")
            self.loaded.discard(index)
            release_freed_memory()   # else the freed heap stays resident: +60 MB a block at 1B shapes


def copy_from_checkpoint(targets: dict[str, torch.Tensor], files: dict[str, "TensorRef"], model_dir: Path,
                         error: type[Exception]) -> None:
    """Fill ``targets`` (tensor name -> tensor) from the safetensors tensors ``files`` names
    (qflow/quant/expert_names.py: an expert's projection may be a slice of a fused tensor), one open per file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(files[name].path, []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    tensor, target = files[name].read(handle), targets[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise error(f"{name} has shape {tuple(tensor.shape)} in {model_dir}, the model expects "
                                    f"{tuple(target.shape)}", where=str(model_dir), fix="rebuild the model folder")
                    target.copy_(tensor.to(target.dtype))


MAP_MIN_BYTES = 64 * 2**20   # non-block tensors this large (embeddings, untied heads) are memory-mapped
_NUMPY_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64"}


def mapped_tensor(path: Path, name: str, target: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
    """``(tensor, its np.memmap)``: ``name`` from the safetensors file ``path`` as a copy-on-write
    memory map shaped and typed like ``target``, or None when it cannot be mapped as is (another
    dtype or shape, bf16).

    A model's embedding is its largest tensor (a 128k vocabulary x 2048 is 1 GiB in fp32) and
    a block-wise pass reads only the rows of the calibration tokens: mapped, only those pages
    become resident, instead of the whole table. Writes (there are none) would stay private."""
    import numpy as np

    from .integrity import check_safetensors

    header, _, data_start = check_safetensors(path)
    info = header.get(name)
    np_dtype = _NUMPY_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
    if np_dtype is None or getattr(torch, np_dtype) != target.dtype or tuple(info["shape"]) != tuple(target.shape):
        return None
    begin, _ = info["data_offsets"]
    array = np.memmap(path, dtype=np_dtype, mode="c", offset=data_start + begin, shape=tuple(info["shape"]))
    return torch.from_numpy(array), array


MADV_PAGEOUT = 21               # linux/mman.h (Linux 5.4+); Python's mmap module may not name it


def page_out(arrays: list) -> int:
    """Ask the kernel to reclaim the resident pages of memory-mapped ``arrays``; the bytes it mapped before.

    The pages a block-wise pass touched in a mapped embedding (the calibration tokens' rows, plus
    the kernel's read-ahead around them: 286 MiB of a 1 GiB table at Llama-3.2-1B shapes) count in
    the process's RSS until unmapped, although the quantize stage never reads the table again.
    ``MADV_PAGEOUT`` reclaims clean pages and never discards data (unlike ``MADV_DONTNEED`` on a
    private mapping, which would drop a written page); a later read faults the rows back from the
    file. A no-op where the kernel or platform does not offer it."""
    import mmap

    before = 0
    for array in arrays:
        handle = getattr(array, "_mmap", None)
        if handle is None:
            continue
        before += len(handle)
        try:
            handle.madvise(getattr(mmap, "MADV_PAGEOUT", MADV_PAGEOUT))
        except (OSError, ValueError, AttributeError):   # older kernel, not Linux: keep the pages
            pass
    return before


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back
        return None


M_MMAP_THRESHOLD = -3          # malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``nbytes`` or more from its own memory map (glibc ``mallopt``), once
    per process; False where the C library has no ``mallopt`` (macOS, musl).

    glibc raises its mmap threshold each time a mapped chunk is freed (up to 32 MiB on 64-bit), so a
    block-wise pass's 1-32 MiB temporaries (mini-batch activations, row chunks of a wide layer) soon
    come from the heap, where freed chunks stay resident between trims and the next block's tensors
    of other sizes do not fit the holes: the peak grew from block to block (docs/RELIABILITY.md,
    "Memory"). A fixed threshold returns each large tensor to the OS when it is freed and also ends
    the dynamic raising."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after large frees, so a
    process that loads and frees block after block would otherwise grow as if it kept them)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def block_loader(model: nn.Module) -> BlockLoader | None:
    """The model's BlockLoader when it was built by ``load_model_lazy`` with blocks on disk."""
    return getattr(model, _LOADER_ATTR, None)


def _non_persistent_buffers(module: nn.Module) -> list[str]:
    persistent = set(module.state_dict().keys())
    return [name for name, _ in module.named_buffers() if name not in persistent]


def _outside_blocks_differ(model: nn.Module, shell: nn.Module, block_prefix: str) -> list[str]:
    """Names of the tensors outside the blocks (non-persistent buffers included) that ``model``
    and ``shell`` do not both hold with the same shape: a model whose non-block modules depend on
    its layer count cannot be assembled from a block-less shell."""
    def outside(module: nn.Module) -> dict[str, tuple[int, ...]]:
        tensors = [*module.named_parameters(), *module.named_buffers()]
        return {n: tuple(t.shape) for n, t in tensors if not n.startswith(block_prefix)}

    full, bare = outside(model), outside(shell)
    return sorted(n for n in full.keys() | bare.keys() if full.get(n) != bare.get(n))


def load_model_lazy(path: str | Path, dtype="float32", attn_implementation: str = "sdpa"):
    """``(model, adapter)``: non-block weights loaded, blocks on the meta device (see the module doc)."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.initialization import no_init_weights

    from ..quant.weights import tensor_index
    from .adapters import get_adapter
    from .encoders import auto_model_class
    from .loading import _torch_dtype, load_model
    from .moe import unfuse_experts

    path = Path(path)
    torch_dtype = _torch_dtype(dtype)
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is not a resolved model folder (no config.json)",
                          fix="pass the .path of resolve_model(source, cache_dir)")
    from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

    remote = remote_code_allowed()   # only the command line's --trust-remote-code, never a recipe
    with remote_code_refusal(str(path)):
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
    auto_class = auto_model_class(config)   # AutoModelForCausalLM; an encoder's MLM / bare class
    with torch.device("meta"):
        try:
            skeleton = auto_class.from_config(config, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation,
                                                        trust_remote_code=remote)
        except ValueError:
            if attn_implementation != "sdpa":
                raise
            # Gemma 2 has no sdpa path (logit softcapping): run it eager, as the reference does
            log.info("%s (%s) has no sdpa attention; using eager", path, config.model_type)
            attn_implementation = "eager"
            skeleton = auto_class.from_config(config, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation,
                                                        trust_remote_code=remote)
    unfuse_experts(skeleton)   # mixture-of-experts: one linear per expert (qflow/models/moe.py)
    adapter = get_adapter(skeleton)
    blocks = adapter.blocks()
    if _non_persistent_buffers(blocks[0]):
        log.info("%s: blocks hold buffers the checkpoint does not store; loading the model whole", path)
        net, _ = load_model(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        return net, get_adapter(net)

    # the shell keeps config.layer_types: modules outside the blocks are built from it (Gemma 3's
    # rotary tables per layer type, Qwen2/3's sliding-window mask flag)
    shell_config = copy.deepcopy(config)
    shell_config.num_hidden_layers = 0
    # no weight initialisation: every parameter is filled from the checkpoint (or mapped) below, and a
    # 128k-vocabulary shell otherwise draws random embedding and head tables (2 GiB resident in fp32 at
    # Llama-3.2-1B shapes) only to drop them; tying, which the skipped init also skips, is redone
    with no_init_weights():
        net = auto_class.from_config(shell_config, dtype=torch_dtype, attn_implementation=attn_implementation,
                                               trust_remote_code=remote)
    net.tie_weights()
    differs = _outside_blocks_differ(skeleton, net, adapter.block_prefix + ".")
    if differs:
        log.info("%s: the model without its blocks is built differently (%s); loading the model whole",
                 path, ", ".join(differs[:3]))
        net, _ = load_model(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        return net, get_adapter(net)
    parent_name, _, attr = adapter.block_prefix.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, blocks)
    for module in net.modules():  # the shell's modules read num_hidden_layers etc. from their config
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config = skeleton.config

    files = tensor_index(path)   # qflow's tensor names -> where each is stored
    prefix = adapter.block_prefix + "."
    wanted = {k: v for k, v in net.state_dict(keep_vars=True).items() if not k.startswith(prefix)}
    # tied weights (lm_head = embed_tokens) are one tensor: filled once, under the name the file has
    unique: dict[int, str] = {}
    for name, target in wanted.items():
        if name in files and id(target) not in unique:
            unique[id(target)] = name
    to_copy = {name: wanted[name] for name in unique.values()}
    mapped_arrays: list = []
    for name in [n for n, t in to_copy.items() if t.numel() * t.element_size() >= MAP_MIN_BYTES]:
        ref = files[name]
        mapped = mapped_tensor(ref.path, ref.key, to_copy[name]) if ref.expert is None else None
        if mapped is not None:   # the embedding: pages come from the file as rows are used
            to_copy.pop(name).data = mapped[0]
            mapped_arrays.append(mapped[1])
    copy_from_checkpoint(to_copy, files, path, SourceError)
    loaded = set(unique)
    buffers = {name for name, _ in net.named_buffers()}
    missing = [n for n, t in wanted.items() if id(t) not in loaded and n not in buffers]
    if missing:
        raise SourceError(f"{path} lacks {', '.join(missing[:5])}", fix="rebuild the model folder")
    net.eval()
    setattr(net, _LOADER_ATTR, BlockLoader(path, blocks, adapter.block_prefix, files, mapped=mapped_arrays))
    return net, get_adapter(net)

