"""Settings, read once from the environment (and an optional `.env`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    data_dir: Path = Path("./data")
    database_url: str = ""
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)

    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: str = ""
    upstream_model: str = ""
    upstream_timeout_s: float = Field(default=30.0, gt=0)

    api_keys: str = ""

    history_max_rounds: int = Field(default=50, ge=0)
    history_max_tokens: int = Field(default=8000, ge=0)
    round_wait_timeout_s: float = Field(default=10.0, ge=0)
    # Tasks whose history window each process keeps in memory (0: read it from the DB every round).
    history_cache_tasks: int = Field(default=10_000, ge=0)

    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @property
    def resolved_database_url(self) -> str:
        """The configured URL, or a SQLite file under the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'trtc.db').as_posix()}"

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
