"""Filters: which (host, model) endpoints may serve a request at all.

A host filter looks at the host's heartbeat alone; a model filter at one model the host
announced. Each is a named predicate, so a rejected host can say which rule turned it away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import orjson

from llooma.settings import ORCHESTRATED_MODEL, Settings
from llooma.v1.common_pb2 import GenerationParams
from llooma.v1.host_pb2 import HostHeartbeat, ModelCapability


class HostEntry(Protocol):
    """A heartbeat as the hosts bucket's view holds it (`membership.Member`)."""

    @property
    def key(self) -> str: ...

    @property
    def heartbeat(self) -> HostHeartbeat: ...

    def staleness_s(self, now: float) -> float: ...


def version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("."):
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class Policy:
    """The operator's rules, from settings."""

    stale_after_s: float = 2.0
    min_version: tuple[int, ...] = (0,)
    suspended: frozenset[str] = frozenset()
    # Models never used to answer the orchestrated model (the demo and debug backends).
    excluded: frozenset[str] = frozenset()
    orchestrated_model: str = ORCHESTRATED_MODEL
    # Credits every host counts as having locked in the stake draw (settings).
    unstaked_stake: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            stale_after_s=settings.host_stale_after_s,
            min_version=version_tuple(settings.min_host_version),
            suspended=frozenset(settings.suspended_hosts),
            excluded=frozenset(settings.orchestration_excluded_models),
            unstaked_stake=settings.unstaked_host_stake,
        )


@dataclass(frozen=True, slots=True)
class Ask:
    """What one request needs: a model (or the orchestrated one), the ModelFeatures it uses
    (field names: "tools", "json_schema", ...), and the first-token deadline it runs under."""

    model: str
    features: frozenset[str] = frozenset()
    deadline_ms: int = 1000


def asked_features(params: GenerationParams) -> frozenset[str]:
    """The ModelFeatures a request's parameters need of the host that answers it."""
    needed = []
    if params.tools_json:
        needed.append("tools")
    if params.response_format_json:
        kind = orjson.loads(params.response_format_json).get("type")
        if kind == "json_schema":
            needed.append("json_schema")
        elif kind == "json_object":
            needed.append("json_mode")
    if params.logprobs:
        needed.append("logprobs")
    return frozenset(needed)


@dataclass(frozen=True, slots=True)
class Host:
    host_id: str
    heartbeat: HostHeartbeat
    staleness_s: float


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model on one host: what the picker chooses between."""

    host: Host
    model: ModelCapability

    @property
    def host_id(self) -> str:
        return self.host.host_id


HostFilter = Callable[[Host, Ask, Policy], bool]
ModelFilter = Callable[[Endpoint, Ask, Policy], bool]


def not_suspended(host: Host, ask: Ask, policy: Policy) -> bool:
    return host.host_id not in policy.suspended


def not_draining(host: Host, ask: Ask, policy: Policy) -> bool:
    return not host.heartbeat.draining


def min_version(host: Host, ask: Ask, policy: Policy) -> bool:
    return version_tuple(host.heartbeat.version) >= policy.min_version


# Past the wait a host announced, how long its beat may take to arrive (a loaded machine,
# the dispatcher's hop into the bucket) before the host is counted gone.
NEXT_BEAT_GRACE_S = 1.5


def silence_allowed_s(heartbeat: HostHeartbeat, stale_after_s: float) -> float:
    """How long a host may stay silent and still count: the operator's `stale_after_s`, or the
    wait its last beat announced plus NEXT_BEAT_GRACE_S when that is longer (a host at rest;
    `heartbeats.check` bounds what it may announce)."""
    return max(stale_after_s, heartbeat.next_beat_ms / 1000 + NEXT_BEAT_GRACE_S)


def fresh(host: Host, ask: Ask, policy: Policy) -> bool:
    return host.staleness_s <= silence_allowed_s(host.heartbeat, policy.stale_after_s)


def serves_model(endpoint: Endpoint, ask: Ask, policy: Policy) -> bool:
    return ask.model == policy.orchestrated_model or endpoint.model.name == ask.model


def not_excluded(endpoint: Endpoint, ask: Ask, policy: Policy) -> bool:
    """The orchestrated model never answers with an excluded model (asked by name, it may)."""
    return ask.model != policy.orchestrated_model or endpoint.model.name not in policy.excluded


def engine_reachable(endpoint: Endpoint, ask: Ask, policy: Policy) -> bool:
    return not endpoint.model.engine_unreachable


def capable(endpoint: Endpoint, ask: Ask, policy: Policy) -> bool:
    """Announces every feature the request uses (an unknown feature name: nobody does)."""
    features = endpoint.model.features
    known = features.DESCRIPTOR.fields_by_name
    return all(name in known and getattr(features, name) for name in ask.features)


# In the order a rejected host reports them: the operator's word first.
HOST_FILTERS: tuple[HostFilter, ...] = (not_suspended, not_draining, min_version, fresh)
MODEL_FILTERS: tuple[ModelFilter, ...] = (serves_model, not_excluded, engine_reachable, capable)


def as_host(entry: HostEntry, now: float) -> Host:
    return Host(entry.key, entry.heartbeat, entry.staleness_s(now))


def host_rejection(
    host: Host, ask: Ask, policy: Policy, filters: Iterable[HostFilter] = HOST_FILTERS
) -> str | None:
    """The name of the first host filter that turns the host away, or None."""
    return next((f.__name__ for f in filters if not f(host, ask, policy)), None)


def endpoints(
    entries: Iterable[HostEntry],
    ask: Ask,
    policy: Policy,
    now: float,
    *,
    host_filters: tuple[HostFilter, ...] = HOST_FILTERS,
    model_filters: tuple[ModelFilter, ...] = MODEL_FILTERS,
) -> list[Endpoint]:
    """Every endpoint that passes every filter."""
    found: list[Endpoint] = []
    for entry in entries:
        host = as_host(entry, now)
        if not all(f(host, ask, policy) for f in host_filters):
            continue
        for capability in host.heartbeat.models:
            endpoint = Endpoint(host, capability)
            if all(f(endpoint, ask, policy) for f in model_filters):
                found.append(endpoint)
    return found
