"""Small shared config pieces used by several stages and commands (pydantic, no heavy imports)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .errors import RecipeError


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return pattern


Regex = Annotated[str, AfterValidator(_compiles)]
"""A regular expression, compiled when the recipe is validated (so a typo fails before any work)."""


class DataSpec(BaseModel):
    """A text source cut into token windows.

        data: {source: "zoo:wiki-pages", seq_len: 512}
        data: {source: "./my_corpus.jsonl", field: text, seq_len: 2048}
        data: {source: "hf:wikitext:wikitext-2-raw-v1@test"}
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: str
    seq_len: int = Field(512, ge=8)
    field: str = "text"
    add_special_tokens: bool = False



_NUMBER = r"[-+]?(?:inf|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_CONSTRAINT = re.compile(rf"^\s*([\w./-]+)\s*(<=|>=|<|>|==)\s*({_NUMBER})\s*$")


def parse_constraint(text: str, where: str = "constraints") -> tuple[str, str, float]:
    """``METRIC OP BOUND`` as (metric, op, bound); the bound is a number, ``inf`` or ``-inf``.

        parse_constraint("evaluate/bpw_quantized<=4.5")  # ("evaluate/bpw_quantized", "<=", 4.5)
        parse_constraint("kl_mean < inf")                # ("kl_mean", "<", inf)
    """
    m = _CONSTRAINT.match(text)
    if not m:
        raise RecipeError(f"cannot parse constraint {text!r}", where=where,
                          fix="write METRIC<=VALUE, e.g. evaluate/bpw_quantized<=4.5 (also >=, <, >, ==; "
                              "VALUE a number, inf or -inf)")
    return m.group(1), m.group(2), float(m.group(3))
