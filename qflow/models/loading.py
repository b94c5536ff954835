"""Load a resolved model folder into a transformers model and tokenizer.

    model, tokenizer = load_model(resolve_model("zoo:smollm2-135m", cache).path)

Attention runs through ``eager`` by default. ``sdpa`` was measured against it on
the bundled model (fp32, CPU, three 512-token lee-news windows): logits differ
by up to 7.8e-5 absolute (2e-6 relative), log-probs by 6.9e-5, per-window mean
NLL by 2e-7. That misses the 1e-5 bar for "the same outputs", and sdpa was not
faster on 2 CPU cores, so eager it is: it is also what the reference
implementations of AWQ/GPTQ run. Pass ``attn_implementation="sdpa"`` for speed
on a GPU.
"""

from __future__ import annotations

from pathlib import Path

from qflow.errors import SourceError

DEFAULT_ATTN_IMPLEMENTATION = "eager"

_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise SourceError(f"unknown model dtype '{dtype}'", fix=f"use one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def _auto_class(path: Path):
    """AutoModelForCausalLM, or for a BERT-family encoder its MLM / bare class (qflow/models/encoders.py)."""
    import json

    from qflow.models.encoders import auto_model_class

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}   # transformers reports the unreadable config itself
    return auto_model_class(config)


def load_model(
    path: str | Path,
    dtype="float32",
    device: str = "cpu",
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
):
    """``(model, tokenizer)`` from a local HF folder, local files only, model in eval mode.

    ``dtype`` is a torch.dtype or its name ("float32", "bfloat16", ...).

    >>> model, tokenizer = load_model("runs/cache/models/gguf-...", dtype=torch.float32)
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # qflow draws its own progress; keep stderr readable

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SourceError(
            f"{path} is not a resolved model folder (no config.json)",
            fix="pass the .path of resolve_model(source, cache_dir)",
        )
    from qflow.models.integrity import check_model_folder

    check_model_folder(path)  # a cut-short safetensors file: say so, not a Rust deserializing error
    from qflow.recipe.safety import remote_code_allowed

    remote = remote_code_allowed()   # only the command line's --trust-remote-code, never a recipe
    auto_class = _auto_class(path)
    try:
        model = auto_class.from_pretrained(
            path,
            dtype=_torch_dtype(dtype),
            attn_implementation=attn_implementation,
            local_files_only=True,
            trust_remote_code=remote,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
    except (OSError, ValueError) as err:
        raise SourceError(
            f"transformers cannot load the model in {path}: {err}".replace("\n", " "),
            fix="check that the folder holds config.json, *.safetensors weights and tokenizer files "
            "for a causal language model (delete a damaged converted folder under the cache to rebuild it)",
        ) from err
    from qflow.models.moe import unfuse_experts

    unfuse_experts(model)   # mixture-of-experts: one nn.Linear per expert, as qflow names them
    model.to(device)
    model.eval()
    return model, tokenizer
