"""Configuration shared by every process, read from the environment."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_API_KEY = "sk-llooma-dev"
ORCHESTRATED_MODEL = "llooma"
VERSION = "0.1.0"


# Used only when no secret is configured (a process outside a stack, a unit test): the
# stack and every deployment set LLOOMA_KEY_HASH_SECRET_FILE (or LLOOMA_KEY_HASH_SECRET).
_PUBLIC_DEV_SECRET = b"llooma-development-key-hash-secret"
KEY_HASH_SECRET_ENV = "LLOOMA_KEY_HASH_SECRET"
KEY_HASH_SECRET_FILE_ENV = "LLOOMA_KEY_HASH_SECRET_FILE"


@lru_cache(maxsize=1)
def key_hash_secret() -> bytes:
    """The server secret API keys are hashed with (HMAC-SHA256): from the environment or the
    file it names, kept apart from the data, so a copy of the database or the KV store alone
    cannot test guesses of a weak key."""
    secret = os.environ.get(KEY_HASH_SECRET_ENV, "")
    path = os.environ.get(KEY_HASH_SECRET_FILE_ENV, "")
    if not secret and path:
        secret = Path(path).read_text().strip()
    if not secret:
        logging.getLogger(__name__).warning(
            "no %s(_FILE): API keys are hashed with the public development secret",
            KEY_HASH_SECRET_ENV,
        )
        return _PUBLIC_DEV_SECRET
    return secret.encode()


def api_key_id(key: str, secret: bytes | None = None) -> str:
    """The stored, logged and traced form of an API key, never the key itself: a keyed hash
    (HMAC-SHA256 with the server secret), so a lookup table of weak keys does not reverse it."""
    digest = hmac.new(secret or key_hash_secret(), key.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


class Settings(BaseSettings):
    """Every knob, with the environment variable that sets it (LLOOMA_<NAME> unless noted)."""

    model_config = SettingsConfigDict(env_prefix="LLOOMA_", extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        validation_alias=AliasChoices("NATS_URL", "LLOOMA_NATS_URL"),
    )
    # The control plane's nkey seed file, when the NATS server requires credentials.
    nats_nkey_seed_file: str = ""
    database_url: str = Field(
        default="", validation_alias=AliasChoices("DATABASE_URL", "LLOOMA_DATABASE_URL")
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    api_keys: Annotated[list[str], NoDecode] = [DEV_API_KEY]
    # Keys for the admin API (/admin/v1/...), comma-separated, or one a line in the file;
    # none: the admin API answers 404.
    admin_api_keys: Annotated[list[str], NoDecode] = []
    admin_api_key_file: str = ""
    # API keys whose requests skip the privacy mediator (privacy is on for every other key).
    privacy_off_api_keys: Annotated[list[str], NoDecode] = []
    max_body_bytes: int = 1024 * 1024
    # Per-API-key rate limits (0: none): requests and tokens (prompt + max_tokens, corrected
    # by actual usage) per minute; the bucket holds `rate_limit_burst_s` seconds of either.
    rate_limit_rpm: int = Field(default=0, ge=0)
    rate_limit_tpm: int = Field(default=0, ge=0)
    rate_limit_burst_s: float = Field(default=1.0, gt=0)
    # Per-key overrides, JSON: {"<api key>": {"rpm": 60, "tpm": 100000}} (0: none).
    rate_limits_by_key: dict[str, dict[str, int]] = {}
    # Per-key rates held across every ingress (JetStream counters, llooma.limiter); off: each
    # ingress holds them alone (N ingresses then allow N times each rate). Off by default
    # until its token-per-minute accuracy matches the local buckets' (see OPERATIONS.md).
    rate_limits_shared: bool = False
    # Completion tokens a request without max_tokens is charged until its usage is known.
    rate_limit_default_max_tokens: int = Field(default=256, ge=1)
    # Load shedding in each ingress (0: off): requests in flight at once, requests still
    # waiting for their first token, and in flight per model as a multiple of the capacity
    # the model's eligible hosts announce.
    max_in_flight: int = Field(default=0, ge=0)
    max_waiting_first_token: int = Field(default=256, ge=0)
    admission_capacity_factor: float = Field(default=1.0, ge=0)
    # What one host's announced capacity counts for at most: a host cannot open the gate wide.
    admission_max_host_capacity: int = Field(default=1024, ge=1)
    # The Retry-After a shed request (503) is given.
    shed_retry_after_s: int = Field(default=1, ge=1)
    request_timeout_s: float = 120.0
    # Models never used to answer the orchestrated model (test and debug backends).
    orchestration_excluded_models: Annotated[list[str], NoDecode] = ["echo"]
    first_token_deadline_ms: int = Field(default=1000, ge=1)
    # Per-model deadlines, JSON: {"model": ms}; a request may set its own (header).
    first_token_deadline_ms_by_model: dict[str, int] = {}
    stall_deadline_ms: int = Field(default=2000, ge=1)
    race_width: int = Field(default=2, ge=1, le=3)
    best_bucket_size: int = Field(default=4, ge=1)
    # S(h) weights: load, p95 first-token latency, heartbeat staleness, error rate.
    score_weights: tuple[float, float, float, float] = (0.40, 0.30, 0.20, 0.10)
    # The central fallback pool: trusted host ids, used when a race misses its deadline and
    # to continue stalled streams (other eligible hosts are used when none is available).
    fallback_hosts: Annotated[list[str], NoDecode] = []
    # With no pool host available, turn to any other eligible host (off: wait for the racers).
    fallback_to_any_host: bool = True
    # How long a fallback attempt may take to its first token.
    fallback_first_token_ms: int = Field(default=10_000, ge=1)
    max_continuations: int = Field(default=2, ge=0)
    # Hedged mode per model, JSON: {"model": "p90"} (the first host's observed p90) or
    # {"model": "150"} (ms); the second host starts only if no token came by then.
    hedge_delay_by_model: dict[str, str] = {}
    suspended_hosts: Annotated[list[str], NoDecode] = []
    # Duel-and-judge (WWW.Serve 4.2): the share p_d of races whose loser finishes and is
    # compared with the winner by `duel_judges` judges (other hosts, drawn by stake) serving
    # `duel_judge_model` ("" = the duel's own model); `duel_timeout_s` bounds a whole duel.
    # Each host's duel record (0 lost, 0.5 tie, 1 won, an EWMA from 0.5) adds
    # `duel_quality_weight` x (1 - quality) to its S(h). Above 0.3, a host that loses every
    # duel ranks behind one never seen (unknown latency costs 0.3 x 0.5, unknown quality w/2).
    duel_fraction: float = Field(default=0.05, ge=0, le=1)
    duel_judges: int = Field(default=3, ge=1)
    duel_judge_model: str = ""
    duel_timeout_s: float = Field(default=60.0, gt=0)
    duel_quality_weight: float = Field(default=0.4, ge=0)
    # A starting dispatcher replays this many seconds of duel results (the settlements stream
    # keeps 7 days) before it takes requests, so a restart keeps each host's quality; 0: none.
    duel_quality_replay_s: float = Field(default=86400.0, ge=0)
    # Planner: stage-1 bypass thresholds, DAG size, the margin eps, and the optional split
    # call (a model asked for a JSON DAG when the prompt's structure gives none).
    planner_bypass_chars: int = 160
    planner_bypass_max_tokens: int = 48
    planner_max_nodes: int = Field(default=8, ge=2)
    planner_epsilon_ms: float = 50.0
    planner_split_model: str = ""
    planner_split_timeout_ms: int = 5000
    # Ledger and payouts, all money in integer micro-credits (1 credit = 1_000_000).
    # With billing on, a key whose balance is not positive gets 402 at the ingress.
    billing_enabled: bool = True
    # Every configured key opens with this balance once; per raw key, JSON {"sk-...": 0}.
    opening_balance_micros: int = Field(default=0, ge=0)
    opening_balances_micros: dict[str, int] = {}
    # The dev key (DEV_API_KEY) opens with this instead, so `llooma up` works out of the box.
    dev_key_opening_balance_micros: int = Field(default=1_000_000_000_000, ge=0)
    # What users pay per token (prompt and completion), published; per model, JSON.
    user_price_micros: int = Field(default=20, ge=0)
    user_price_micros_by_model: dict[str, int] = {}
    # What the winning host earns per output token; per model, JSON.
    host_price_micros: int = Field(default=10, ge=0)
    host_price_micros_by_model: dict[str, int] = {}
    # Each losing host: a reservation fee plus a progress fee per token it produced, together
    # capped at eta times the winner's payout (paper IV).
    loser_reservation_fee_micros: int = Field(default=20, ge=0)
    loser_progress_fee_micros: int = Field(default=2, ge=0)
    loser_cap_eta: float = Field(default=0.15, ge=0.0, le=1.0)
    # The central fallback pool's cost per output token.
    fallback_price_micros: int = Field(default=30, ge=0)
    # Duel-and-judge: the better answer's host is rewarded, the worse one's penalized, and
    # each judge that gave a verdict is paid.
    duel_reward_micros: int = Field(default=500, ge=0)
    duel_penalty_micros: int = Field(default=500, ge=0)
    judge_fee_micros: int = Field(default=100, ge=0)
    # Ed25519 seed that signs ledger blocks (created on first use); empty: under .llooma/.
    ledger_signing_key_file: str = ""
    # How long JetStream waits for a request-path service's ack before it redelivers (to a
    # replica): what a kill -9 of privacy, planner or dispatcher costs a request in flight.
    pipeline_ack_wait_s: float = Field(default=2.0, gt=0)
    heartbeat_interval_s: float = 0.5
    host_stale_after_s: float = 2.0
    service_stale_after_s: float = 3.0
    min_host_version: str = "0.1.0"
    # /v1/stats, /metrics: race events of this many seconds back are replayed when an
    # ingress starts; loopback clients need no API key unless this is off.
    stats_replay_s: float = Field(default=900.0, ge=0)
    stats_open_on_loopback: bool = True
    log_level: str = "WARNING"

    @field_validator(
        "api_keys",
        "admin_api_keys",
        "privacy_off_api_keys",
        "orchestration_excluded_models",
        "fallback_hosts",
        "suspended_hosts",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def admin_keys(self) -> list[str]:
        """Every configured admin key (the setting and the file's lines)."""
        keys = list(self.admin_api_keys)
        if self.admin_api_key_file:
            text = Path(self.admin_api_key_file).read_text()
            keys += [line.strip() for line in text.splitlines() if line.strip()]
        return keys

    def deadline_ms(self, model: str, requested_ms: int = 0) -> int:
        """The first-token deadline: the request's own, else the model's, else the default."""
        if requested_ms:
            return requested_ms
        return self.first_token_deadline_ms_by_model.get(model, self.first_token_deadline_ms)


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    return Settings()
