"""Model sources (zoo, gguf, hf, folders) and loading; nothing heavy is imported here."""

from qflow.models.loading import load_model
from qflow.models.sources import (
    DEFAULT_MODEL_SOURCE,
    ResolvedModel,
    fingerprint_model_source,
    resolve_model,
)

__all__ = ["DEFAULT_MODEL_SOURCE", "ResolvedModel", "fingerprint_model_source", "load_model", "resolve_model"]
