"""Cache keys of a plan, and what changed against the closest cached entry.

    keys = compute_keys(plan, store, environment(resolve_device(plan.recipe.device)))
    key, ingredients = keys["quantize"]
    entry, differences = closest_entry(store, ingredients)   # for `qflow explain`
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from .. import __version__
from ..errors import PlanError
from ..recipe.safety import redact
from .cache import CacheStore, Entry, diff_ingredients, make_key
from .plan import Plan

Keys = dict[str, tuple[str, dict[str, Any]]]   # stage id -> (key, ingredients as written to the manifest)


def resolve_device(wanted: str) -> str:
    """The device a recipe's ``device:`` (cpu | cuda | auto) runs on here."""
    if wanted == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise PlanError("the recipe asks for device: cuda but no CUDA GPU is available", where="device",
                        fix="set device: cpu (or auto) or run on a machine with a GPU")
    return "cpu"


def environment(device: str) -> dict[str, str]:
    """Facts that change numbers (part of every key)."""
    try:
        tv = metadata.version("torch")
        torch_mm = ".".join(tv.split("+")[0].split(".")[:2])
    except metadata.PackageNotFoundError:
        torch_mm = "none"
    backend = os.environ.get("QFLOW_KERNEL_BACKEND", "auto")
    return {"torch": torch_mm, "device": device, "kernel_backend": backend}


def compute_keys(plan: Plan, store: CacheStore, env: dict[str, str]) -> Keys:
    """Each stage's key, in plan order, and the ingredients it hashes:

    ``stage`` (registered name), ``version`` (the stage class's), ``qflow`` (qflow's
    version), ``config`` (the resolved Config with defaults, JSON), ``inputs``
    (``{slot: "<upstream key>:<output>"}``: keys chain, tensors are never hashed),
    ``external`` (``Stage.fingerprint_sources``: content fingerprints of outside
    files and hub revisions), ``env`` (:func:`environment`). The key hashes the real
    values; the returned ingredients (stored in the manifest) have environment
    values redacted.
    """
    keys: Keys = {}
    for sid, st in plan.stages.items():
        ingredients = {
            "stage": st.uses,
            "version": st.cls.version,
            "qflow": __version__,
            "config": st.config.model_dump(mode="json"),
            "inputs": {slot: f"{keys[src][0]}:{out}" for slot, (src, out) in sorted(st.bindings.items())},
            "external": st.cls.fingerprint_sources(st.config, store.root),
            "env": env,
        }
        keys[sid] = (make_key(ingredients), redact(ingredients))
    return keys


def closest_entry(store: CacheStore, ingredients: dict[str, Any]) -> tuple[Entry | None, list[str]]:
    """The cached entry of the same stage whose ingredients differ least, and the differences."""
    best: tuple[int, Entry | None, list[str]] = (10**9, None, [])
    for entry in store.entries():
        old = entry.manifest.get("ingredients")
        if not old or old.get("stage") != ingredients["stage"]:
            continue
        lines = diff_ingredients(old, ingredients)
        if len(lines) < best[0]:
            best = (len(lines), entry, lines)
    return best[1], best[2]
