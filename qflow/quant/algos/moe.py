"""Mixture-of-experts bookkeeping shared by the calibration-based methods (docs/METHODS.md §4.2).

Per MoE block, each method records two token counts per expert:

* ``routed``: token slots the router assigned to the expert during the calibration pass
  (top-k routing as the model does it; summed over experts this is k x tokens);
* ``calibration``: rows of the expert's gate/up input that its statistics (AWQ scales
  and clip, GPTQ Hessian) were computed from: equal to ``routed`` by default, every
  token with ``moe_calibrate_all_experts``.

An expert whose calibration count is 0 is quantized by RTN with the stage's spec
(no AWQ scale or clip, no GPTQ error feedback) and named in a warning.
:func:`report_expert_tokens` writes ``moe_tokens.json`` and the ``moe_*`` metrics.

Example::

    with count_routed_tokens(block.module) as routed:
        acts = block.run(...)
    record_expert_tokens(block, routed, lambda name: rows_of(name))
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from ...models.moe import count_routed_tokens, moe_blocks  # noqa: F401  (re-exported for the methods)

log = logging.getLogger(__name__)

TOKENS_FILE = "moe_tokens.json"
METRICS = ("moe_expert_tokens_min", "moe_experts_without_tokens", "moe_routed_share_min")


def warn_no_tokens(block: Any, name: str, method: str) -> None:
    """Say that ``name`` saw no calibration token and was rounded to nearest; record it."""
    log.warning("%s: %s saw no calibration token (no token was routed to this expert); it is quantized by RTN "
                "with the stage's spec. Calibrate with more text or set moe_calibrate_all_experts: true",
                method, block.full_name(name))
    block.record(layer=block.full_name(name), moe_fallback="rtn")


def record_expert_tokens(block: Any, routed: dict[str, list[int]], calibration_rows: Callable[[str], int]) -> None:
    """One record per MoE block: ``routed`` (from :func:`count_routed_tokens`) and each expert's
    calibration rows (``calibration_rows(relative name of its gate_proj)``)."""
    adapter = block.adapter
    for rel, counts in routed.items():
        if not counts:
            continue
        calib = [int(calibration_rows(adapter.canonical_input(f"{rel}.experts.{e}.gate_proj")))
                 for e in range(len(counts))]
        block.record(layer=block.full_name(rel), moe_routed_tokens=list(counts), moe_calibration_tokens=calib)


def report_expert_tokens(ctx: Any, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``moe_tokens.json`` (per block: routed and calibration tokens per expert) and the ``moe_*``
    metrics from a method's records; None (nothing logged) for a dense model."""
    rows = [r for r in records if "moe_routed_tokens" in r]
    if not rows:
        return None
    blocks = {r["layer"]: {"routed": r["moe_routed_tokens"], "calibration": r["moe_calibration_tokens"]}
              for r in rows}
    fallbacks = sorted({r["layer"] for r in records if r.get("moe_fallback")})
    shares = [c / max(1, sum(r["moe_routed_tokens"])) for r in rows for c in r["moe_routed_tokens"]]
    report = {
        "definition": "per MoE block and expert: 'routed' = token slots the router assigned to the expert "
                      "during calibration (top-k, as the model routes); 'calibration' = tokens the expert's "
                      "statistics were computed from (routed, or all tokens with moe_calibrate_all_experts)",
        "blocks": blocks,
        "rtn_fallback": fallbacks,
    }
    metrics = {
        # fewest calibration tokens any expert of any block was calibrated on
        "moe_expert_tokens_min": min(min(b["calibration"]) for b in blocks.values()),
        # (block, expert) pairs with no calibration token: quantized by RTN instead
        "moe_experts_without_tokens": sum(c == 0 for b in blocks.values() for c in b["calibration"]),
        # smallest share of a block's routed token slots that went to one expert (1/E when balanced)
        "moe_routed_share_min": min(shares),
    }
    report["metrics"] = metrics
    for name, value in metrics.items():
        ctx.log_metric(name, float(value))
    path = Path(ctx.scratch) / TOKENS_FILE
    path.write_text(json.dumps(report, indent=1))
    try:
        ctx.log_artifact(path, TOKENS_FILE)
    except Exception as exc:  # a report copy must not fail the stage; say so
        ctx.log.warning("could not record %s: %s", TOKENS_FILE, exc)
    return report
