"""A client of any OpenAI-compatible `/v1/embeddings` (OpenAI, DashScope, TEI, Ollama,
Xinference): texts in, float32 vectors out.

At ingestion a batch that fails is tried again (twice, with a short pause) and then fails the
whole document, so no document is ever stored half embedded. At query time there is one try
within the base's `timeout_ms`; the caller falls back to lexical search when it fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger("trtc.knowledge")

# Texts per request at ingestion.
BATCH = 64
_RETRIES = 2


class EmbeddingsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str
    api_key: str = ""
    model: str = Field(min_length=1, max_length=256)
    # A query's embedding must come within this, or the round searches lexically.
    timeout_ms: int = Field(default=300, ge=10, le=60_000)

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.lower().startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL (got {value[:80]!r})")
        return value.rstrip("/")


class EmbeddingError(Exception):
    """The embedder failed; the message says how (never with the key)."""


class Embedder:
    def __init__(self, config: EmbeddingsConfig) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.AsyncClient(base_url=config.base_url, headers=headers, timeout=30.0)

    @property
    def model(self) -> str:
        return self.config.model

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, texts: Sequence[str], timeout: float) -> np.ndarray:
        try:
            response = await self._client.post(
                "/embeddings", json={"model": self.config.model, "input": list(texts)}, timeout=timeout
            )
        except httpx.TimeoutException:
            raise EmbeddingError(f"no answer within {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise EmbeddingError(f"cannot reach it ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise EmbeddingError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            data: list[dict[str, Any]] = sorted(response.json()["data"], key=lambda item: item.get("index", 0))
            vectors = np.asarray([item["embedding"] for item in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(f"an answer that is not OpenAI's embeddings shape ({type(exc).__name__})") from None
        if vectors.ndim != 2 or len(vectors) != len(texts) or not vectors.shape[1] or not np.isfinite(vectors).all():
            raise EmbeddingError(f"{len(vectors)} vectors for {len(texts)} texts, or vectors that are no numbers")
        return vectors

    async def embed_documents(self, texts: Sequence[str]) -> list[bytes]:
        """Every text's vector as float32 bytes, in batches, each batch retried."""
        out: list[bytes] = []
        for start in range(0, len(texts), BATCH):
            batch = texts[start : start + BATCH]
            for attempt in range(_RETRIES + 1):
                try:
                    vectors = await self._request(batch, 60.0)
                    break
                except EmbeddingError as exc:
                    if attempt == _RETRIES:
                        raise
                    log.warning("embeddings %s: %s; trying again", self.config.base_url, exc)
                    await asyncio.sleep(0.5 * (attempt + 1))
            if out and len(vectors[0]) * 4 != len(out[0]):
                raise EmbeddingError("vectors of another size than the batch before: is the model the same?")
            out += [vector.astype("<f4").tobytes() for vector in vectors]
        return out

    async def embed_query(self, text: str) -> np.ndarray:
        """One try within `timeout_ms`."""
        return (await self._request([text], self.config.timeout_ms / 1000))[0]


class KnowledgeBaseConfig(BaseModel):
    """A base's options in the profiles file (`knowledge_bases:`); a base needs no entry to exist."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
    embeddings: EmbeddingsConfig | None = None


class Embedders:
    """One client per embeddings upstream, made when a profiles file first names it and kept
    (across reloads) until shutdown."""

    def __init__(self) -> None:
        self._clients: dict[str, Embedder] = {}

    def for_bases(self, bases: Sequence[KnowledgeBaseConfig]) -> dict[str, Embedder]:
        """Base name -> its embedder, for the bases that have one."""
        out = {}
        for base in bases:
            if base.embeddings is None:
                continue
            key = base.embeddings.model_dump_json()
            if key not in self._clients:
                self._clients[key] = Embedder(base.embeddings)
            out[base.name] = self._clients[key]
        return out

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
