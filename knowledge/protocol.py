"""The knowledge admin API's request bodies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from knowledge.retrieval import MAX_QUERY_CHARS, MAX_TOP_K


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    min_score: float = Field(default=0.0, ge=0, le=1)
