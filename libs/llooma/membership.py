"""Who is alive: heartbeats in JetStream KV buckets, watched into an in-memory view.

Service instances put a heartbeat under their own key every interval; hosts send theirs to
the dispatcher (`HostHeartbeatIntake`), which checks it and puts it under the host's key.
The bucket's TTL drops entries nobody refreshes, so a restarted watcher never sees long-dead
members; the view's own staleness cutoff marks a vanished member ineligible well before that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from llooma import counters, heartbeats, selection, subjects
from llooma.bus import MEMBERSHIP_TTL_S
from llooma.kv_view import BucketView
from llooma.selection import Ask, Policy, as_host, host_rejection, version_tuple
from llooma.v1.host_pb2 import HostHeartbeat
from llooma.v1.service_pb2 import ServiceHeartbeat

log = logging.getLogger(__name__)

# What membership alone decides (suspension, models and engines are the pipeline's).
MEMBERSHIP_FILTERS = (selection.not_draining, selection.min_version, selection.fresh)

HeartbeatT = TypeVar("HeartbeatT", bound=Message)

# The bucket drops an entry MEMBERSHIP_TTL_S after its last heartbeat; the view does the same.
FORGET_AFTER_S = MEMBERSHIP_TTL_S
# Members beat every 0.5-1 s, so a watch this quiet has lost its consumer (a restarted server
# forgets memory buckets and their consumers without telling the client): watch anew.
WATCH_IDLE_S = 3.0


@dataclass(slots=True)
class Member(Generic[HeartbeatT]):
    key: str
    heartbeat: HeartbeatT
    seen_monotonic: float

    def staleness_s(self, now: float) -> float:
        return now - self.seen_monotonic


class Membership(BucketView, Generic[HeartbeatT]):
    """A live view of one heartbeat bucket; the key (from the subject) is the identity."""

    def __init__(self, bucket: str, parse: Callable[[bytes], HeartbeatT]) -> None:
        super().__init__(bucket, idle_renew_s=WATCH_IDLE_S)
        self._parse = parse
        self._members: dict[str, Member[HeartbeatT]] = {}

    def fresh(self, stale_after_s: float) -> list[Member[HeartbeatT]]:
        now = time.monotonic()
        return [m for m in self._members.values() if m.staleness_s(now) <= stale_after_s]

    def all(self) -> list[Member[HeartbeatT]]:
        """Every member heard from within the bucket's TTL (expiry sends no delete event)."""
        cutoff = time.monotonic() - FORGET_AFTER_S
        for key in [k for k, m in self._members.items() if m.seen_monotonic < cutoff]:
            del self._members[key]
        return list(self._members.values())

    def apply(self, entry: KeyValue.Entry) -> None:
        # nats-py annotates `created` as int but hands over a datetime.
        created: object = entry.created
        created_unix = created.timestamp() if isinstance(created, datetime) else time.time()
        self._apply(entry.key, entry.value, entry.operation, created_unix)

    def _apply(
        self, key: str, value: bytes | None, operation: str | None, created_unix: float
    ) -> None:
        if operation in ("DEL", "PURGE") or not value:
            self._members.pop(key, None)
            return
        try:
            heartbeat = self._parse(value)
        except (DecodeError, ValueError) as error:
            # Only the control plane writes these buckets, and it checks first: this is the
            # second line (every reader of heartbeat numbers reads them through here).
            counters.count(f"membership_refused.{self._bucket}")
            log.warning("refused a heartbeat under %s.%s: %s", self._bucket, key, error)
            self._members.pop(key, None)
            return
        # The server's timestamp ages entries read from history when a watch (re)starts.
        age_s = max(0.0, time.time() - created_unix)
        self._members[key] = Member(key, heartbeat, time.monotonic() - age_s)


def _parse_host(data: bytes) -> HostHeartbeat:
    return heartbeats.parse(data)


def _parse_service(data: bytes) -> ServiceHeartbeat:
    return ServiceHeartbeat.FromString(data)


class HostDirectory:
    """Eligible hosts by model, as the dispatcher and ingress see them."""

    def __init__(self, *, stale_after_s: float, min_version: str) -> None:
        self.members: Membership[HostHeartbeat] = Membership(subjects.HOSTS_BUCKET, _parse_host)
        self._stale_after_s = stale_after_s
        self._policy = Policy(stale_after_s=stale_after_s, min_version=version_tuple(min_version))

    async def start(self, js: JetStreamContext) -> None:
        await self.members.start(js)

    async def stop(self) -> None:
        await self.members.stop()

    def eligible(self, model: str | None = None) -> list[Member[HostHeartbeat]]:
        """Fresh heartbeat, minimum version, not draining, and (if given) serving model: the
        selection pipeline's membership filters (`llooma.selection.Selector` adds the rest)."""
        now = time.monotonic()
        ask = Ask(model or "")
        hosts = []
        for member in self.members.fresh(self._stale_after_s):
            host = as_host(member, now)
            if host_rejection(host, ask, self._policy, MEMBERSHIP_FILTERS) is not None:
                continue
            if model is not None and all(cap.name != model for cap in member.heartbeat.models):
                continue
            hosts.append(member)
        return hosts

    def models(self) -> set[str]:
        """Models some eligible host serves right now, on an engine that answers."""
        return {
            cap.name
            for member in self.eligible()
            for cap in member.heartbeat.models
            if not cap.engine_unreachable
        }

    def serving(self) -> list[Member[HostHeartbeat]]:
        """Eligible hosts with at least one model whose engine answers (for /healthz)."""
        return [
            member
            for member in self.eligible()
            if any(not cap.engine_unreachable for cap in member.heartbeat.models)
        ]

    def known_models(self) -> set[str]:
        """Models any host in the bucket announced, eligible or not (draining, stale, old)."""
        return {cap.name for m in self.members.all() for cap in m.heartbeat.models}


class ServiceDirectory:
    """Which control-plane services have a fresh, ready instance."""

    def __init__(self, *, stale_after_s: float) -> None:
        self.members: Membership[ServiceHeartbeat] = Membership(
            subjects.SERVICES_BUCKET, _parse_service
        )
        self._stale_after_s = stale_after_s

    async def start(self, js: JetStreamContext) -> None:
        await self.members.start(js)

    async def stop(self) -> None:
        await self.members.stop()

    def gone(self, instance_id: str, stale_after_s: float | None = None) -> bool:
        """The instance has stopped beating (for `stale_after_s`, by default the directory's
        limit), as far as a live view can tell: never while no instance at all is fresh (the
        watch itself is down, e.g. in a NATS node's election)."""
        fresh = self.members.fresh(stale_after_s or self._stale_after_s)
        return bool(fresh) and all(member.key != instance_id for member in fresh)

    def ready_instances(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for member in self.members.fresh(self._stale_after_s):
            if member.heartbeat.ready:
                counts[member.heartbeat.service] = counts.get(member.heartbeat.service, 0) + 1
        return counts
