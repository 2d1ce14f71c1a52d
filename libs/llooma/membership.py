"""Who is alive: heartbeats put into JetStream KV buckets, heard into an in-memory view.

Service instances put a heartbeat under their own key every interval; hosts send theirs to
the dispatcher (`HostHeartbeatIntake`), which checks it and puts it under the host's key.
A view hears every put as it is published, through a plain core subscription to the bucket's
subjects, and reads the bucket once when it starts, so it knows the members at once rather
than after their next beat. A KV watch (an ordered push consumer) would do the same at a
standing cost on the server and in every watcher at rest (idle heartbeats, flow control,
renewal after a server restart), and membership needs none of what it adds: beats repeat, so
one missed while NATS was away is replaced by the next, and the bucket's TTL keeps the start-up
read free of long-dead members. The view's own staleness cutoff marks a vanished member
ineligible well before that TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KV_OP, KeyValue

from llooma import counters, heartbeats, kv_view, selection, subjects
from llooma.bus import MEMBERSHIP_TTL_S, SERVICE_MEMBERSHIP_TTL_S
from llooma.selection import (
    Ask,
    Policy,
    as_host,
    host_rejection,
    silence_allowed_s,
    version_tuple,
)
from llooma.v1.host_pb2 import HostHeartbeat
from llooma.v1.service_pb2 import ServiceHeartbeat

log = logging.getLogger(__name__)

# What membership alone decides (suspension, models and engines are the pipeline's).
MEMBERSHIP_FILTERS = (selection.not_draining, selection.min_version, selection.fresh)

HeartbeatT = TypeVar("HeartbeatT", bound=Message)

# A service that promised its next beat within t is counted gone after this many t of silence.
MISSED_BEATS = 3
# A racer's reader (an ingress, or a split request's aggregator) quiet this long asks whether
# the racer still beats (no cost while tokens flow).
RACER_CHECK_S = 0.5
# A racer that missed this many beats is taken for dead and its answer resumed elsewhere: a
# mistake costs a takeover (the claim makes it safe), a late verdict a pause in the answer.
RACER_MISSED_BEATS = 2
# How long the start-up read of a bucket may take.
SNAPSHOT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Member(Generic[HeartbeatT]):
    key: str
    heartbeat: HeartbeatT
    seen_monotonic: float

    def staleness_s(self, now: float) -> float:
        return now - self.seen_monotonic


class Membership(Generic[HeartbeatT]):
    """A live view of one heartbeat bucket; the key (from the subject) is the identity."""

    def __init__(
        self,
        bucket: str,
        parse: Callable[[bytes], HeartbeatT],
        silence_allowed_s: Callable[[HeartbeatT, float], float] = lambda _, cutoff_s: cutoff_s,
        *,
        forget_after_s: float = MEMBERSHIP_TTL_S,
    ) -> None:
        self._bucket = bucket
        # The bucket drops an entry this long after its last beat; the view does the same.
        self._forget_after_s = forget_after_s
        self._parse = parse
        # How long a member may be silent, from what its last beat announced and the reader's
        # own cutoff.
        self._silence_allowed_s = silence_allowed_s
        self._members: dict[str, Member[HeartbeatT]] = {}
        self._subscription: Subscription | None = None
        self._prefix = subjects.kv_put_subject(bucket, "")
        # Beats applied so far: a reader that sums reports re-sums only when this moved.
        self.heard = 0

    async def start(self, nc: Client, js: JetStreamContext) -> None:
        """Hear every put from now on, then read what the bucket holds (a put heard while
        reading is newer than what was read, and is kept)."""
        self._subscription = await nc.subscribe(f"{self._prefix}>", cb=self._on_put)
        await asyncio.wait_for(self._read_bucket(js), timeout=SNAPSHOT_TIMEOUT_S)

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _read_bucket(self, js: JetStreamContext) -> None:
        await kv_view.read_all(await js.key_value(self._bucket), self.apply)

    async def _on_put(self, msg: Msg) -> None:
        operation = msg.headers.get(KV_OP) if msg.headers else None
        self._apply(msg.subject[len(self._prefix) :], msg.data, operation, time.time())

    def fresh(self, stale_after_s: float) -> list[Member[HeartbeatT]]:
        """Members heard from within `stale_after_s`, or within what their last beat allows
        when longer (the wait it announced, judged by the bucket's rule)."""
        now = time.monotonic()
        return [
            m
            for m in self._members.values()
            if m.staleness_s(now) <= self._silence_allowed_s(m.heartbeat, stale_after_s)
        ]

    def all(self) -> list[Member[HeartbeatT]]:
        """Every member heard from within the bucket's TTL (expiry sends no delete event)."""
        self._forget_expired()
        return list(self._members.values())

    def _forget_expired(self) -> None:
        cutoff = time.monotonic() - self._forget_after_s
        for key in [k for k, m in self._members.items() if m.seen_monotonic < cutoff]:
            del self._members[key]

    def apply(self, entry: KeyValue.Entry) -> None:
        # nats-py annotates `created` as int but hands over a datetime.
        created: object = entry.created
        created_unix = created.timestamp() if isinstance(created, datetime) else time.time()
        self._apply(entry.key, entry.value, entry.operation, created_unix)

    def _apply(
        self, key: str, value: bytes | None, operation: str | None, created_unix: float
    ) -> None:
        self.heard += 1
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
        # The server's timestamp ages entries read from the bucket at start.
        seen = time.monotonic() - max(0.0, time.time() - created_unix)
        known = self._members.get(key)
        if known is None:
            # A new key (a restarted instance has a new id): the dead ones go, so the view
            # stays the size of the live membership however long it runs.
            self._forget_expired()
        if known is None or known.seen_monotonic <= seen:
            self._members[key] = Member(key, heartbeat, seen)


def _parse_host(data: bytes) -> HostHeartbeat:
    return heartbeats.parse(data)


def _parse_service(data: bytes) -> ServiceHeartbeat:
    return ServiceHeartbeat.FromString(data)


def _service_silence_allowed_s(beat: ServiceHeartbeat, stale_after_s: float) -> float:
    """A service is counted gone after MISSED_BEATS of the waits it announced."""
    return max(stale_after_s, MISSED_BEATS * beat.next_beat_ms / 1000)


class HostDirectory:
    """Eligible hosts by model, as the dispatcher and ingress see them."""

    def __init__(self, *, stale_after_s: float, min_version: str) -> None:
        self.members: Membership[HostHeartbeat] = Membership(
            subjects.HOSTS_BUCKET, _parse_host, silence_allowed_s
        )
        self._stale_after_s = stale_after_s
        self._policy = Policy(stale_after_s=stale_after_s, min_version=version_tuple(min_version))

    async def start(self, nc: Client, js: JetStreamContext) -> None:
        await self.members.start(nc, js)

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
            subjects.SERVICES_BUCKET,
            _parse_service,
            _service_silence_allowed_s,
            forget_after_s=SERVICE_MEMBERSHIP_TTL_S,
        )
        self._stale_after_s = stale_after_s

    async def start(self, nc: Client, js: JetStreamContext) -> None:
        await self.members.start(nc, js)

    async def stop(self) -> None:
        await self.members.stop()

    def gone(self, instance_id: str, stale_after_s: float | None = None) -> bool:
        """The instance has stopped beating, as far as a live view can tell: never while no
        instance at all is fresh (the watch itself is down, e.g. in a NATS node's election).
        By default its beats are awaited as long as it promised; with `stale_after_s`, for
        exactly that long (a caller that knows the instance has work in flight knows it beats
        every second whatever it promised at rest)."""
        fresh = self.members.fresh(self._stale_after_s)
        if not fresh:
            return False
        if stale_after_s is None:
            return all(member.key != instance_id for member in fresh)
        now = time.monotonic()
        return all(
            m.key != instance_id or m.staleness_s(now) > stale_after_s for m in self.members.all()
        )

    def fresh(self) -> list[Member[ServiceHeartbeat]]:
        """Instances still beating: heard within `stale_after_s`, or within three of the
        intervals their last beat promised."""
        return self.members.fresh(self._stale_after_s)

    def ready_instances(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for member in self.members.fresh(self._stale_after_s):
            if member.heartbeat.ready:
                counts[member.heartbeat.service] = counts.get(member.heartbeat.service, 0) + 1
        return counts
