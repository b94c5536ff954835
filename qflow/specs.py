"""Small shared config pieces used by several stages (pydantic, no heavy imports)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
