"""Per-layer quantization algorithms (pure torch, fp32; docs/METHODS.md §4-§7).

Each module works on one weight matrix ``[out, in]`` and its statistics; the
block-by-block model driver lives elsewhere.
"""
