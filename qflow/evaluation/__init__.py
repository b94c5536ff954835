"""Evaluation: perplexity, distribution metrics vs float, per-layer error, size, speed."""
