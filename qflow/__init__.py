"""qflow: declarative, reproducible, trackable model quantization pipelines."""

__version__ = "0.1.0"
