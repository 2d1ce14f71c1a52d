"""Host worker configuration (the YAML a host operator writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llooma.subjects import checked_token
from pydantic import BaseModel, ConfigDict, Field


class Latency(BaseModel):
    """A latency distribution in milliseconds (synthetic backend)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fixed", "lognormal", "pareto"] = "fixed"
    ms: float = Field(default=0.0, ge=0)
    median_ms: float = Field(default=0.0, ge=0)
    sigma: float = Field(default=0.0, ge=0)
    x_m_ms: float = Field(default=0.0, ge=0)
    alpha: float = Field(default=1.5, gt=0)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    backend: Literal["synthetic", "echo"] = "synthetic"
    capacity: int = Field(default=16, ge=1)
    max_tokens: int = Field(default=64, ge=1)
    first_token: Latency = Latency()
    inter_token: Latency = Latency()


class HostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    nats_url: str = "nats://127.0.0.1:4222"
    # The host's nkey seed file, from `llooma hosts add NAME`.
    credentials: Path | None = None
    stake: float = Field(default=1.0, ge=0)
    seed: int = 0
    heartbeat_interval_s: float = Field(default=0.5, gt=0)
    models: list[ModelConfig] = Field(min_length=1)

    def model_post_init(self, _context: object) -> None:
        checked_token(self.name)
