"""The dispatcher's answer to the server's advisory that a host connection closed: the entry
of every host whose beats named that key is deleted, and nothing else (no servers)."""

from __future__ import annotations

import time

import orjson
from nats.js.kv import KV_OP

from llooma import subjects
from llooma.membership import HostDirectory
from llooma.settings import VERSION
from llooma.v1.host_pb2 import HostHeartbeat, ModelCapability
from services.dispatcher.heartbeats import HostHeartbeatIntake

KEY_A = "U" + "A" * 55
KEY_B = "U" + "B" * 55


class RecordingConnection:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str] | None]] = []

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.published.append((subject, payload, headers))


class Advisory:
    def __init__(self, account: str, user: str, connection: int = 7) -> None:
        client = {"acc": account, "user": user, "id": connection}
        self.data = orjson.dumps({"type": "x", "client": client})


def hosts_announcing(keys: dict[str, str], connection_id: int = 7) -> HostDirectory:
    hosts = HostDirectory(stale_after_s=2.0, min_version="0.1.0")
    for host_id, key in keys.items():
        beat = HostHeartbeat(
            version=VERSION,
            models=[ModelCapability(name="m")],
            nkey=key,
            connection_id=connection_id,
        )
        hosts.members._apply(host_id, beat.SerializeToString(), "PUT", time.time())
    return hosts


async def test_a_closed_connection_deletes_the_hosts_that_named_its_key_and_no_other() -> None:
    nc = RecordingConnection()
    # "liar" names host-a's key: when host-a's connection closes, only it loses its entry too.
    hosts = hosts_announcing({"host-a": KEY_A, "host-b": KEY_B, "liar": KEY_A, "quiet": ""})
    intake = HostHeartbeatIntake(nc, hosts)  # type: ignore[arg-type]
    await intake.disconnected(Advisory("HOSTS", KEY_A))  # type: ignore[arg-type]
    deleted = {subject for subject, _, _ in nc.published}
    assert deleted == {
        subjects.kv_put_subject(subjects.HOSTS_BUCKET, "host-a"),
        subjects.kv_put_subject(subjects.HOSTS_BUCKET, "liar"),
    }
    assert all(payload == b"" and headers == {KV_OP: "DEL"} for _, payload, headers in nc.published)


async def test_other_accounts_unknown_keys_replaced_connections_and_garbage_delete_nothing() -> (
    None
):
    nc = RecordingConnection()
    intake = HostHeartbeatIntake(nc, hosts_announcing({"host-a": KEY_A}))  # type: ignore[arg-type]
    await intake.disconnected(Advisory("LLOOMA", KEY_A))  # type: ignore[arg-type]
    await intake.disconnected(Advisory("HOSTS", KEY_B))  # type: ignore[arg-type]
    await intake.disconnected(Advisory("HOSTS", ""))  # type: ignore[arg-type]
    # The close of host-a's older connection, heard after it reconnected (connection 7).
    await intake.disconnected(Advisory("HOSTS", KEY_A, connection=3))  # type: ignore[arg-type]

    class Garbage:
        data = b"not json"

    await intake.disconnected(Garbage())  # type: ignore[arg-type]
    assert nc.published == []


async def test_a_host_that_gave_no_connection_id_is_matched_by_its_key() -> None:
    nc = RecordingConnection()
    hosts = hosts_announcing({"host-a": KEY_A}, connection_id=0)
    intake = HostHeartbeatIntake(nc, hosts)  # type: ignore[arg-type]
    await intake.disconnected(Advisory("HOSTS", KEY_A, connection=12))  # type: ignore[arg-type]
    assert [subject for subject, _, _ in nc.published] == [
        subjects.kv_put_subject(subjects.HOSTS_BUCKET, "host-a")
    ]
