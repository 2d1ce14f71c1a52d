"""Host worker configuration: the YAML a host operator writes (in the spirit of WWW.Serve's)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import nkeys
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llooma.bus import NatsAccess, access_for
from llooma.credentials import public_key
from llooma.heartbeats import MAX_NEXT_BEAT_MS
from llooma.subjects import checked_token


class Latency(BaseModel):
    """A latency distribution in milliseconds (synthetic backend)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fixed", "lognormal", "pareto"] = "fixed"
    ms: float = Field(default=0.0, ge=0)
    median_ms: float = Field(default=0.0, ge=0)
    sigma: float = Field(default=0.0, ge=0)
    x_m_ms: float = Field(default=0.0, ge=0)
    alpha: float = Field(default=1.5, gt=0)


class Policy(BaseModel):
    """What the host offers the network for one model."""

    model_config = ConfigDict(extra="forbid")

    # Weight in the dispatcher's stake-weighted pick.
    stake: float = Field(default=1.0, ge=0)
    # Share of offered tasks the host takes; the rest get an explicit busy reply.
    accept_frequency: float = Field(default=1.0, gt=0, le=1)


class Generation(BaseModel):
    """Defaults for what a request leaves unset; max_tokens is also the host's ceiling."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=256, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)


class Features(BaseModel):
    """What a model can do beyond plain chat (ModelFeatures in the heartbeat). Unset fields take
    the engine's default (llooma.host.engines.DEFAULT_FEATURES)."""

    model_config = ConfigDict(extra="forbid")

    tools: bool | None = None
    json_mode: bool | None = None
    json_schema: bool | None = None
    logprobs: bool | None = None
    # The engine continues a trailing assistant message (llama.cpp; vLLM with
    # continue_final_message): continuation by prefill.
    assistant_prefill: bool | None = None
    reasoning: bool | None = None
    embeddings: bool | None = None
    multiple_choices: bool | None = None


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    backend: Literal["synthetic", "echo", "openai"] = "synthetic"
    # Most tasks in flight at once; above it the host answers busy.
    capacity: int = Field(default=16, ge=1)
    policy: Policy = Policy()
    generation: Generation = Generation()
    # openai backend: any OpenAI-compatible server (vLLM, SGLang, Ollama, llama.cpp).
    base_url: str | None = None
    api_key: str | None = None
    upstream_model: str | None = None
    metrics_url: str | None = None
    # openai backend: which engine serves it, for its load and health probe and its defaults
    # (llama.cpp, vllm, sglang, ollama; openai for any other OpenAI-compatible server).
    engine: Literal["llama.cpp", "vllm", "sglang", "ollama", "openai"] = "openai"
    # openai backend: most upstream connections at once (default: capacity).
    max_connections: int | None = Field(default=None, ge=1)
    features: Features = Features()
    # synthetic and echo backends.
    first_token: Latency = Latency()
    inter_token: Latency = Latency()
    stall_probability: float = Field(default=0.0, ge=0, le=1)
    failure_probability: float = Field(default=0.0, ge=0, le=1)
    # synthetic: the share of words that are real (the rest are noise), so duels have a
    # better and a worse answer to tell apart.
    quality: float = Field(default=1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _backend_fields(self) -> ModelConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("base_url is required for the openai backend")
        return self


class HostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # One NATS server or several, comma-separated (any one of them up is enough).
    nats_url: str = "nats://127.0.0.1:4222"
    # The host's nkey seed file, from `llooma hosts add NAME`, or a `.creds` file (user JWT
    # and seed) on a server run with JWT accounts.
    credentials: Path | None = None
    # TLS: the CA of the servers' certificates; a client certificate and key for mutual TLS.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    seed: int = 0
    # A beat this often while tasks are in flight (their load steers the scheduler), and every
    # idle_heartbeat_interval_s at rest; each beat announces the wait, and readers keep the
    # host that long plus a grace (a death at rest is noticed within about 6.5 s by default).
    heartbeat_interval_s: float = Field(default=0.5, gt=0)
    idle_heartbeat_interval_s: float = Field(default=5.0, gt=0, le=MAX_NEXT_BEAT_MS / 1000)
    # How often each openai upstream engine is probed for health and load, and how long a probe
    # may take before the engine counts as unreachable (the two bound the time to notice).
    engine_probe_interval_s: float = Field(default=0.5, gt=0)
    engine_probe_timeout_s: float = Field(default=1.0, gt=0)
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _checks(self) -> HostConfig:
        checked_token(self.name)
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("each model may appear only once")
        return self

    def public_nkey(self) -> str:
        """The public key of the nkey seed file this host connects with ("" for none, or for
        a `.creds` file): what the server's advisories name its connection by."""
        if self.credentials is None or not self.nats_access().nkey_seed_file:
            return ""
        try:
            return public_key(self.credentials.read_bytes().strip())
        except (OSError, nkeys.NkeysError):
            return ""

    def nats_access(self) -> NatsAccess:
        def text(path: Path | None) -> str:
            return str(path) if path is not None else ""

        return access_for(
            text(self.credentials),
            tls_ca_file=text(self.tls_ca_file),
            tls_cert_file=text(self.tls_cert_file),
            tls_key_file=text(self.tls_key_file),
        )


class HostConfigError(ValueError):
    """A host config that cannot be used; the message names the file and the field."""


def load_host_config(path: Path) -> HostConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise HostConfigError(f"cannot read {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise HostConfigError(f"{path} is not valid YAML: {error}") from error
    try:
        return HostConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in error.errors(include_url=False)
        )
        raise HostConfigError(f"{path}: {problems}") from error
