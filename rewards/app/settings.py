"""Server settings: flags of `blip3o-rl rewards serve`, or `BLIP3O_RL_REWARDS_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from rewards.geneval import GenevalConfig
from rewards.ocr import OcrConfig


class Settings(BaseSettings):
    """Everything the reward server is built from; read once at startup."""

    model_config = SettingsConfigDict(
        env_prefix="BLIP3O_RL_REWARDS_", env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface to bind; loopback unless told otherwise."""
    port: int = 8000
    """TCP port (0 = any free port)."""
    scorers: list[Literal["ocr", "geneval"]] = ["ocr", "geneval"]
    """Scorers to load at startup; a request for another one answers 404 `scorer_not_loaded`."""
    token: SecretStr | None = None
    """Bearer token required on /v1 endpoints (none = open)."""
    max_items: int = Field(64, ge=1)
    """Most items in one request."""
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest request body accepted."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Largest decoded image (width * height); bigger ones are refused before decoding."""
    batch_size: int = Field(16, ge=1)
    """Most items per model call; concurrent requests are grouped up to this."""
    batch_wait_ms: float = Field(5.0, ge=0)
    """How long the first queued item waits for others to join its batch."""
    ocr: OcrConfig = OcrConfig()
    """OCR scorer."""
    geneval: GenevalConfig = GenevalConfig()
    """GenEval scorer."""
