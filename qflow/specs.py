"""Small shared config pieces used by several stages (pydantic, no heavy imports)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


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

