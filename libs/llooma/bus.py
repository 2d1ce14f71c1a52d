"""NATS connections and the JetStream topology (streams and KV buckets) every service relies on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from llooma import subjects, tracing

log = logging.getLogger(__name__)

# A hand-off not consumed within an hour is useless: its client has long timed out.
PIPELINE_MAX_AGE_S = 3600.0
SETTLEMENT_MAX_AGE_S = 7 * 24 * 3600.0
EVENTS_MAX_AGE_S = 24 * 3600.0
# JetStream's window for discarding a repeated Nats-Msg-Id.
DUPLICATE_WINDOW_S = 600.0
MEMBERSHIP_TTL_S = 5.0
LIMITS_MAX_AGE_S = 180.0
LIMIT_PHASE_TTL_S = 24 * 3600.0

STREAMS = (
    # Memory: a hand-off lives milliseconds and its client waits on a live connection that a
    # server restart would cut anyway; file storage doubled nats-server's CPU per request.
    StreamConfig(
        name=subjects.PIPELINE_STREAM,
        subjects=[subjects.PIPELINE_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.MEMORY,
        max_age=PIPELINE_MAX_AGE_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[subjects.EVENTS_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=EVENTS_MAX_AGE_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    StreamConfig(
        name=subjects.SETTLEMENT_STREAM,
        subjects=[subjects.SETTLEMENT_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=SETTLEMENT_MAX_AGE_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    # Counters (Nats-Incr) for limits shared by every ingress: a window matters for seconds.
    StreamConfig(
        name=subjects.LIMITS_STREAM,
        subjects=[subjects.LIMITS_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.MEMORY,
        max_age=LIMITS_MAX_AGE_S,
        allow_msg_counter=True,
    ),
    # Kept forever; no message can be deleted or purged, and a height's anchor is written
    # once (a second one for the same subject is refused).
    StreamConfig(
        name=subjects.LEDGER_ANCHOR_STREAM,
        subjects=[subjects.LEDGER_ANCHOR_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
)

BUCKETS = (
    KeyValueConfig(bucket=subjects.HOSTS_BUCKET, ttl=MEMBERSHIP_TTL_S, storage=StorageType.MEMORY),
    KeyValueConfig(
        bucket=subjects.SERVICES_BUCKET, ttl=MEMBERSHIP_TTL_S, storage=StorageType.MEMORY
    ),
    # Accounting's published state outlives restarts; Postgres stays the source of truth.
    KeyValueConfig(bucket=subjects.BALANCES_BUCKET, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.LEDGER_BUCKET, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.KEYS_BUCKET, storage=StorageType.FILE),
    KeyValueConfig(
        bucket=subjects.LIMIT_PHASES_BUCKET, ttl=LIMIT_PHASE_TTL_S, storage=StorageType.MEMORY
    ),
)


ErrorCallback = Callable[[Exception], Awaitable[None]]
ReconnectHook = Callable[[], Coroutine[Any, Any, None]]
# How long a reconnected client keeps trying to restore the topology while JetStream recovers.
RESTORE_TIMEOUT_S = 60.0


async def connect(
    url: str,
    name: str,
    *,
    nkey_seed_file: str | None = None,
    attempts: int = 60,
    error_cb: ErrorCallback | None = None,
    on_reconnect: ReconnectHook | None = None,
) -> Client:
    """Connect, retrying while the server starts; afterwards nats-py reconnects by itself and
    `on_reconnect` runs in the background after each reconnect (see `restore_topology`)."""
    last_error: Exception | None = None
    restoring: set[asyncio.Task[None]] = set()

    async def reconnected() -> None:
        if on_reconnect is not None:
            # nats-py awaits this inside its reconnect loop: do the slow part elsewhere.
            task = asyncio.create_task(on_reconnect(), name=f"{name}-reconnected")
            keep_task(restoring, task, f"{name}: restore after a reconnect", level=logging.ERROR)

    for _ in range(attempts):
        try:
            return await nats.connect(
                url,
                name=name,
                nkeys_seed=nkey_seed_file or None,
                error_cb=error_cb or _log_error,
                reconnected_cb=reconnected,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )
        except Exception as error:  # nats-py raises several unrelated types here
            last_error = error
            await asyncio.sleep(0.25)
    raise ConnectionError(f"cannot reach NATS at {url}: {last_error}")


def keep_task(
    tasks: set[asyncio.Task[None]], task: asyncio.Task[None], what: str, level: int = logging.DEBUG
) -> None:
    """Hold a task nobody awaits in `tasks` until it ends (the loop keeps only a weak
    reference), then log its exception, which would otherwise go unretrieved."""
    tasks.add(task)

    def ended(finished: asyncio.Task[None]) -> None:
        tasks.discard(finished)
        if not finished.cancelled() and (error := finished.exception()) is not None:
            log.log(level, "%s failed", what, exc_info=error)

    task.add_done_callback(ended)


async def _log_error(error: Exception) -> None:
    log.warning("nats: %s", error)


async def ensure_topology(js: JetStreamContext) -> None:
    """Create the streams and buckets if missing; safe to call from every process at once."""
    for config in STREAMS:
        try:
            await js.add_stream(config=config)
        except BadRequestError:
            try:
                await js.update_stream(config=config)
            except BadRequestError as error:
                # E.g. a storage type change, which JetStream refuses; the old one still works.
                log.warning("stream %s keeps its old config: %s", config.name, error)
    for bucket in BUCKETS:
        try:
            await js.create_key_value(config=bucket)
        except BadRequestError:
            log.debug("bucket %s already exists", bucket.bucket)


async def restore_topology(js: JetStreamContext, timeout_s: float = RESTORE_TIMEOUT_S) -> None:
    """After a reconnect: the server may be a restarted one, whose memory streams and buckets
    are gone and whose JetStream may still be recovering its files; retry until it stands."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await ensure_topology(js)
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.25)


def msg_id_headers(msg_id: str) -> dict[str, str]:
    """Headers making a JetStream publish idempotent within the duplicate window."""
    return {"Nats-Msg-Id": msg_id}


async def hand_off(js: JetStreamContext, subject: str, payload: bytes, msg_id: str) -> None:
    """A durable, idempotent hand-off to the next service (waits for the stream's ack); it
    carries the current span's traceparent when tracing."""
    await js.publish(subject, payload, headers=tracing.inject(msg_id_headers(msg_id)))
