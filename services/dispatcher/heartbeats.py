"""Host heartbeats in, checked, and into the hosts bucket: a host never writes a bucket.

Hosts publish in their own NATS account on `llooma.v1.heartbeat.host.<host>`, which only that
host's credential may publish to; the host id is taken from that subject, never the payload.
The dispatcher keeps the host registry, so it admits heartbeats too: with no dispatcher,
nothing would be dispatched to a listed host anyway, and hosts drop out of the bucket.

A host at rest beats seldom (each beat announces the wait until the next), so the server's own
advisory that a connection holding a host's key closed deletes the host's entry at once: a
crashed, killed or revoked host leaves the membership as soon as the server notices, and only
a host that stops beating with its connection still open (a frozen process, a lost network) is
dropped by the readers when the wait it announced and the grace are over.
"""

from __future__ import annotations

import logging
import time

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KV_OP

from llooma import counters, heartbeats, subjects
from llooma.credentials import HOSTS_ACCOUNT
from llooma.membership import HostDirectory

log = logging.getLogger(__name__)

# Per host: a burst of this many heartbeats, refilled at this rate (hosts beat every 0.5 s;
# a drain sends one more at once). More is refused, so one host cannot flood the bucket.
BURST = 5.0
PER_SECOND = 10.0
# At most one log line per host this often: a hostile host must not fill the log instead.
LOG_EVERY_S = 10.0


class HostHeartbeatIntake:
    def __init__(self, nc: Client, hosts: HostDirectory) -> None:
        self._nc = nc
        # The bucket as this dispatcher reads it: which host announced which key.
        self._hosts = hosts
        self._allowance: dict[str, tuple[float, float]] = {}
        self._logged: dict[str, float] = {}

    def _admit(self, host_id: str, now: float) -> bool:
        tokens, since = self._allowance.get(host_id, (BURST, now))
        tokens = min(BURST, tokens + (now - since) * PER_SECOND)
        if tokens < 1.0:
            self._allowance[host_id] = (tokens, now)
            return False
        self._allowance[host_id] = (tokens - 1.0, now)
        return True

    def _refuse(self, host_id: str, reason: str, detail: str, now: float) -> None:
        counters.count(f"heartbeat_refused.{reason}")
        if now - self._logged.get(host_id, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[host_id] = now
            log.warning("refused a heartbeat from %s: %s: %s", host_id, reason, detail)

    async def handle(self, msg: Msg) -> None:
        host_id = msg.subject.rpartition(".")[2]
        now = time.monotonic()
        try:
            subjects.checked_token(host_id)
        except ValueError:
            self._refuse("?", "host_id", msg.subject[:100], now)
            return
        if not self._admit(host_id, now):
            self._refuse(host_id, "rate", "more than 10 a second", now)
            return
        try:
            heartbeats.parse(msg.data)
        except heartbeats.HeartbeatRefused as error:
            self._refuse(host_id, error.reason, str(error), now)
            return
        # What lands in the bucket is the host's own bytes, checked; the key is its identity.
        await self._nc.publish(subjects.kv_put_subject(subjects.HOSTS_BUCKET, host_id), msg.data)

    async def disconnected(self, msg: Msg) -> None:
        """A connection in the hosts account closed: delete the entry of every host whose
        last beat named that connection (its key and, if given, its id), so every view drops
        it now. Key and id are the server's (the nkey that signed in); a host naming another's
        can only drop itself, and the close of a connection a host has since replaced (seen
        late, after a reconnect) matches nothing."""
        try:
            client = orjson.loads(msg.data)["client"]
            account, key, connection = client["acc"], client["user"], int(client["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            counters.count("host_disconnect_unreadable")
            return
        if account != HOSTS_ACCOUNT or not key:
            return
        for member in self._hosts.members.all():
            beat = member.heartbeat
            if beat.nkey == key and beat.connection_id in (0, connection):
                await self._nc.publish(
                    subjects.kv_put_subject(subjects.HOSTS_BUCKET, member.key),
                    b"",
                    headers={KV_OP: "DEL"},
                )
