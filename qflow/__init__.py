"""qflow: declarative, reproducible, trackable model quantization pipelines.

The Python API (``qflow/api.py``, docs/API.md)::

    import qflow
    result = qflow.run("recipes/llama-awq.yaml", overrides=["params.bits=3"], runs_dir="runs")
    model, tokenizer = qflow.load_quantized(result)

``import qflow`` stays light: the API module is imported on first use of one
of its names (PEP 562), and it imports torch, mlflow and Hydra only inside
the calls that need them.
"""

__version__ = "0.1.0"

_API = ("run", "sweep", "explain", "lock", "load_quantized", "RunSummary", "StageSummary", "GateResult", "SweepSummary",
        "SweepPoint", "BestPoint", "StageExplanation", "QuantizedModel")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api   # the facade: the package root re-exports the top layer, lazily

        return getattr(api, name)
    raise AttributeError(f"module 'qflow' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
