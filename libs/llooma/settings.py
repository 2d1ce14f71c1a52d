"""Configuration shared by every process, read from the environment.

Its size (~440 lines): every setting with its description, once, by design (the operators'
table is generated from it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llooma.bus import NatsAccess

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
        description="the NATS server, or several comma-separated (`nats://a:4222,nats://b:4222`): "
        "a process starts while any one is up and fails over to the others; `llooma up` runs an "
        "embedded one when unset",
    )
    nats_nkey_seed_file: str = Field(
        default="", description="the control plane's nkey seed file, when NATS requires credentials"
    )
    nats_creds_file: str = Field(
        default="",
        description="or a `.creds` file (user JWT and nkey seed), on a server with JWT accounts",
    )
    nats_tls_ca_file: str = Field(
        default="", description="TLS: the CA that signed the NATS servers' certificates"
    )
    nats_tls_cert_file: str = Field(
        default="", description="TLS: a client certificate, when the servers verify clients"
    )
    nats_tls_key_file: str = Field(default="", description="TLS: that certificate's key")
    nats_replicas: int = Field(
        default=0,
        ge=0,
        le=5,
        description="replicas of every stream and KV bucket created (0: 1 on a lone server, 3 on "
        "a cluster); an existing stream is never lowered to this, a difference is logged",
    )
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("DATABASE_URL", "LLOOMA_DATABASE_URL"),
        description="the Postgres of the ledger (only accounting connects); `llooma up` runs an "
        "embedded one when unset",
    )
    http_host: str = Field(default="127.0.0.1", description="the address the ingress binds")
    http_port: int = Field(default=8080, description="the ingress port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default=[DEV_API_KEY],
        description="API keys, comma-separated (kept in memory only as keyed hashes)",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="keys for the admin API (`/admin/v1/...`), comma-separated; none (and no "
        "file): the admin API answers 404",
    )
    admin_api_key_file: str = Field(default="", description="or a file of admin keys, one a line")
    privacy_off_api_keys: Annotated[list[str], NoDecode] = Field(
        default=[], description="keys whose requests skip the privacy mediator"
    )
    max_body_bytes: int = Field(default=1024 * 1024, description="the request body limit (413)")
    http_read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request's headers and body must arrive within this, else 408 and the "
        "connection is closed (slow clients)",
    )
    http_max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="larger request headers get 431"
    )
    rate_limit_rpm: int = Field(
        default=0, ge=0, description="requests per minute per API key (0: no limit)"
    )
    rate_limit_tpm: int = Field(
        default=0,
        ge=0,
        description="tokens per minute per API key: a request is charged characters / 4 + "
        "`max_tokens` when admitted, corrected to its real usage when it ends (0: no limit)",
    )
    rate_limit_burst_s: float = Field(
        default=1.0,
        gt=0,
        description="how many seconds of either rate a key may save up (the bucket's depth)",
    )
    rate_limits_by_key: dict[str, dict[str, int]] = Field(
        default={},
        description='per-key overrides, JSON `{"sk-...": {"rpm": 60, "tpm": 100000}}` (0: none)',
    )
    rate_limits_shared: bool = Field(
        default=True,
        description="per-key rates held across every ingress (JetStream counters, "
        "`llooma.limiter`, one round trip per admitted request); off: each ingress holds them "
        "alone in memory (N ingresses allow N times each rate)",
    )
    rate_limit_default_max_tokens: int = Field(
        default=256,
        ge=1,
        description="what a request without `max_tokens` is charged until its usage is known",
    )
    max_in_flight: int = Field(
        default=0,
        ge=0,
        description="shed (503) past this many requests in flight in one ingress (0: no limit)",
    )
    max_waiting_first_token: int = Field(
        default=256,
        ge=0,
        description="shed past this many admitted requests still waiting for their first token "
        "(0: no limit)",
    )
    admission_capacity_factor: float = Field(
        default=1.0,
        ge=0,
        description="shed a model's requests past this multiple of the capacity its eligible "
        "hosts announce (0: off); hosts on one engine count once, and orchestrated requests "
        "share the pool's capacity with direct ones",
    )
    capacity_report_gap_s: float = Field(
        default=0.05,
        gt=0,
        le=1.0,
        description="an ingress whose in-flight requests moved reports them in its heartbeat "
        "at most this long after (every ingress's capacity gate adds the others' reports to "
        "its own count, so they may admit what arrives within this gap before hearing it)",
    )
    admission_max_host_capacity: int = Field(
        default=1024,
        ge=1,
        description="the most one host's announced capacity counts for in that shedding",
    )
    shed_retry_after_s: int = Field(default=1, ge=1, description="the `Retry-After` of a 503")
    orchestration_excluded_models: Annotated[list[str], NoDecode] = Field(
        default=["echo"],
        description="models never used to answer `llooma` (comma-separated), e.g. "
        "`echo,synthetic-small` keeps synthetic answers out of it",
    )
    first_token_deadline_ms: int = Field(
        default=1000, ge=1, description="the first-token deadline δ"
    )
    first_token_deadline_ms_by_model: dict[str, int] = Field(
        default={},
        description='per-model δ, JSON `{"model": ms}`; a request may set its own (header)',
    )
    stall_deadline_ms: int = Field(
        default=2000,
        ge=1,
        description="the inter-token stall deadline (raised per host from its observed pauses)",
    )
    race_width: int = Field(default=2, ge=1, le=3, description="hosts raced per task (1 to 3)")
    best_bucket_size: int = Field(
        default=4, ge=1, description="how many best-scoring hosts the pick draws from"
    )
    score_weights: tuple[float, float, float, float] = Field(
        default=(0.40, 0.30, 0.20, 0.10),
        description="S(h) weights, JSON: load, p95 first-token latency, heartbeat staleness, "
        "error rate",
    )
    fallback_hosts: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="the trusted fallback pool (host names), used when a race misses its "
        "deadline and to continue stalled streams",
    )
    fallback_to_any_host: bool = Field(
        default=True,
        description="with no pool host available, turn to any other eligible host (off: wait "
        "for the racers)",
    )
    fallback_first_token_ms: int = Field(
        default=10_000,
        ge=1,
        description="how long a fallback or continuation host may take to its first token",
    )
    max_continuations: int = Field(default=2, ge=0, description="continuations per stream")
    hedge_delay_by_model: dict[str, str] = Field(
        default={},
        description='hedged mode, JSON `{"model": "p90"}` (the first host\'s observed p90) or '
        '`{"model": "150"}` (ms): the second host starts only if no token came by then',
    )
    suspended_hosts: Annotated[list[str], NoDecode] = Field(
        default=[], description="hosts never picked (comma-separated)"
    )
    duel_fraction: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="p_d: the share of races whose loser finishes and is judged (0: none)",
    )
    silence_probe_fraction: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="the share of a race's losers kept running off the client's path until "
        "their first token or their first-token deadline, so a host that accepts and stays "
        "silent is seen as a no-show even when another host answers first (0: none)",
    )
    duel_judges: int = Field(
        default=3,
        ge=1,
        description="k: judges per duel, other hosts drawn by stake (fewer if fewer serve the "
        "judge model)",
    )
    duel_judge_model: str = Field(
        default="", description="the model judges are asked with; empty: the duel's own model"
    )
    duel_timeout_s: float = Field(
        default=60.0, gt=0, description="how long the loser and the judges may take, in all"
    )
    duel_quality_weight: float = Field(
        default=0.4,
        ge=0,
        description="weight of 1 - duel quality (an EWMA of 1 won, 0.5 tie, 0 lost, from 0.5) "
        "in S(h); above 0.3 a host that loses every duel ranks behind one never seen",
    )
    duel_quality_replay_s: float = Field(
        default=86400.0,
        ge=0,
        description="duel results a starting dispatcher replays into host quality before it "
        "takes requests (0: none)",
    )
    planner_bypass_chars: int = Field(
        default=160, description="prompts shorter than this are never split"
    )
    planner_bypass_max_tokens: int = Field(
        default=48, description="nor are requests with a smaller `max_tokens`"
    )
    planner_max_nodes: int = Field(default=8, ge=2, description="the largest plan accepted")
    planner_epsilon_ms: float = Field(default=50.0, description="ε in L_split + ε < L_dir")
    planner_split_model: str = Field(
        default="",
        description="a model asked for a JSON DAG when the prompt's structure gives none",
    )
    planner_split_timeout_ms: int = Field(
        default=5000, description="how long that split call may take"
    )
    billing_enabled: bool = Field(
        default=True, description="402 for a key whose balance is not positive"
    )
    opening_balance_micros: int = Field(
        default=0, ge=0, description="every configured key's opening balance (once)"
    )
    opening_balances_micros: dict[str, int] = Field(
        default={}, description='per raw key, JSON `{"sk-...": 0}`'
    )
    dev_key_opening_balance_micros: int = Field(
        default=1_000_000_000_000,
        ge=0,
        description="the dev key's (`sk-llooma-dev`) opening balance instead, so `llooma up` "
        "works out of the box",
    )
    user_price_micros: int = Field(
        default=20,
        ge=0,
        description="what users pay per prompt and completion token (money is integer "
        "micro-credits, 1 credit = 1,000,000)",
    )
    user_price_micros_by_model: dict[str, int] = Field(
        default={}, description="per requested model, JSON"
    )
    host_price_micros: int = Field(
        default=10, ge=0, description="the winner's payout per output token"
    )
    host_price_micros_by_model: dict[str, int] = Field(
        default={}, description="per serving model, JSON"
    )
    loser_reservation_fee_micros: int = Field(
        default=20,
        ge=0,
        description="a losing host's reservation fee (only if it sent a token and broke no rule)",
    )
    loser_progress_fee_micros: int = Field(
        default=2, ge=0, description="a losing host's fee per token it produced"
    )
    loser_cap_eta: float = Field(
        default=0.15,
        ge=0.0,
        le=1.0,
        description="η: a loser's fees are at most this share of the winner's payout (paper IV)",
    )
    fallback_price_micros: int = Field(
        default=30, ge=0, description="the fallback pool's cost per output token"
    )
    duel_reward_micros: int = Field(default=500, ge=0, description="a duel winner's reward")
    duel_penalty_micros: int = Field(default=500, ge=0, description="a duel loser's penalty")
    judge_fee_micros: int = Field(
        default=100, ge=0, description="paid to each judge that gave a verdict"
    )
    unstaked_host_stake: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="the credits every host counts as having locked in the stake-weighted draw "
        "(its locked stake if more); a host's weight is min(announced stake, this floor or its "
        "locked stake). 0: only ledger stake counts; 1000: announced stake as is (tests)",
    )
    opening_stakes_micros: dict[str, int] = Field(
        default={},
        description='stake locked once from the treasury per host, JSON `{"host-a": 1000000}` '
        "(the demo hosts of `llooma up`)",
    )
    stake_unlock_delay_s: float = Field(
        default=3600.0,
        ge=0.0,
        description="how long an unlocked stake stays locked (weighted, slashable) before "
        "accounting pays it out to the host",
    )
    slash_no_show_streak: int = Field(
        default=3,
        ge=0,
        description="consecutive no-shows (live at the first-token deadline, no token) that "
        "cost a host a slash; 0: never",
    )
    slash_no_show_fraction: float = Field(
        default=0.1, ge=0.0, le=1.0, description="the share of its stake such a streak costs"
    )
    slash_duel_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="the share of its stake a duel lost unanimously (2+ judges) costs",
    )
    slash_usage_fraction: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="the share of its stake each usage over-claim costs (usage reported beyond "
        "what the racer relayed plus the slack, or an absurd prompt count)",
    )
    ledger_signing_key_file: str = Field(
        default="",
        description="the Ed25519 seed that signs ledger blocks (created on first use; empty: "
        "under the stack's credentials folder)",
    )
    ledger_signing_key: str = Field(
        default="",
        repr=False,
        description="or the seed itself (hex), from a secret store; one key per ledger: an "
        "accounting replica holding another refuses to start",
    )
    pipeline_ack_wait_s: float = Field(
        default=2.0,
        gt=0,
        description="how long JetStream waits for privacy, planner or dispatcher to ack a "
        "hand-off before redelivering it (to a replica, after a crash)",
    )
    heartbeat_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="how often a service announces itself while it has work in flight "
        "(counted ready while its last beat is at most `service_stale_after_s` old)",
    )
    idle_heartbeat_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=20.0,
        description="how often a service with nothing in flight announces itself; each beat "
        "says when the next is due, and readers count it ready for three of these",
    )
    host_stale_after_s: float = Field(
        default=2.0, description="a host silent this long is no longer eligible"
    )
    service_stale_after_s: float = Field(
        default=3.0,
        description="a service instance silent this long is not counted ready (or for three "
        "of the intervals its last beat promised, if that is longer)",
    )
    min_host_version: str = Field(
        default="0.1.0", description="hosts announcing an older version are not eligible"
    )
    stats_replay_s: float = Field(
        default=900.0,
        ge=0,
        description="race events and every ingress's request tallies this far back are "
        "replayed into `/v1/stats` when an ingress starts (0: only new ones)",
    )
    stats_open_on_loopback: bool = Field(
        default=True,
        description="`/v1/stats` and `/metrics` need no API key from a loopback client; off: a "
        "key from everyone",
    )
    log_level: str = Field(default="WARNING", description="the log level of every process")

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

    def nats_access(self) -> NatsAccess:
        """The control plane's NATS credential and TLS files."""
        return NatsAccess(
            nkey_seed_file=self.nats_nkey_seed_file,
            creds_file=self.nats_creds_file,
            tls_ca_file=self.nats_tls_ca_file,
            tls_cert_file=self.nats_tls_cert_file,
            tls_key_file=self.nats_tls_key_file,
        )

    def deadline_ms(self, model: str, requested_ms: int = 0) -> int:
        """The first-token deadline: the request's own, else the model's, else the default."""
        if requested_ms:
            return requested_ms
        return self.first_token_deadline_ms_by_model.get(model, self.first_token_deadline_ms)


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    return Settings()


def environment_variable(name: str) -> str:
    """The variable that sets a setting: its alias if it has one, else LLOOMA_<NAME>."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"LLOOMA_{name.upper()}"


def _shown(value: object) -> str:
    if isinstance(value, list):
        return f"`{','.join(value)}`" if value else "empty"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{json.dumps(value)}`"
    if isinstance(value, tuple):
        return f"`{json.dumps(list(value))}`"
    if value == "":
        return "empty"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def settings_table() -> str:
    """The markdown table of every setting, generated from the descriptions above (the
    operators' documentation embeds it, and a test keeps the two the same)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        rows.append(
            f"| `{environment_variable(name)}` | {_shown(field.default)} | {field.description} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
