"""NATS connections and the JetStream topology (streams and KV buckets) every service relies on.

Its size (~560 lines): the topology is declared here once (every stream and bucket with its
limits) beside the rules that keep it (created with the configured replicas, never put back to
an older config) and the hand-off that publishes into it; they change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError

from llooma import subjects, tracing

log = logging.getLogger(__name__)

# A hand-off not consumed within an hour is useless: its client has long timed out.
PIPELINE_MAX_AGE_S = 3600.0
SETTLEMENT_MAX_AGE_S = 7 * 24 * 3600.0
EVENTS_MAX_AGE_S = 24 * 3600.0
# JetStream's window for discarding a repeated Nats-Msg-Id (its default). It covers every
# repeat the code makes: a hand-off's retries (HAND_OFF_BUDGET_S), a redelivered handler's
# (pipeline ack wait x MAX_DELIVER, about 10 s), a racer's settlement retries (60 s), a DAG part
# handed off again when its dispatcher died; the ledger posts a settlement once by its own key
# whenever it comes. nats-server holds each id in memory for the window: with 10 minutes it
# reached 387 MB after 100,000 requests in 9.5 minutes, 284 MB with this (endurance bench).
DUPLICATE_WINDOW_S = 120.0
# Hosts at rest announce waits of up to `heartbeats.MAX_NEXT_BEAT_MS` (15 s) between beats:
# their entries must outlive one of those and its grace, so a view that starts reads them.
MEMBERSHIP_TTL_S = 20.0
# Services at rest beat every `idle_heartbeat_interval_s` (at most 20 s): their entries must
# outlive three of those, so a view that starts reads every live instance.
SERVICE_MEMBERSHIP_TTL_S = 60.0
LIMITS_MAX_AGE_S = 180.0
LIMIT_PHASE_TTL_S = 24 * 3600.0
# A race's record, and the finished mark each finished race leaves (memory, ~100 bytes a
# request), live this long after their last write (the winner's first token): a stream still
# running 10 minutes later can no longer be resumed.
RACE_RECORD_TTL_S = 600.0

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
        bucket=subjects.SERVICES_BUCKET, ttl=SERVICE_MEMBERSHIP_TTL_S, storage=StorageType.MEMORY
    ),
    # Accounting's published state outlives restarts; Postgres stays the source of truth.
    KeyValueConfig(bucket=subjects.BALANCES_BUCKET, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.LEDGER_BUCKET, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.STAKES_BUCKET, storage=StorageType.FILE),
    KeyValueConfig(bucket=subjects.KEYS_BUCKET, storage=StorageType.FILE),
    KeyValueConfig(
        bucket=subjects.LIMIT_PHASES_BUCKET, ttl=LIMIT_PHASE_TTL_S, storage=StorageType.MEMORY
    ),
    # Memory, as the pipeline: it must outlive a racer, not a nats-server (which cuts every
    # client's stream anyway); replicated on a cluster like every bucket.
    KeyValueConfig(bucket=subjects.RACES_BUCKET, ttl=RACE_RECORD_TTL_S, storage=StorageType.MEMORY),
)


ErrorCallback = Callable[[Exception], Awaitable[None]]


class CredentialRefused(ConnectionError):
    """The server refused this key (revoked, or never admitted): retrying cannot help."""


# A connected host refused on a reconnect keeps trying this long before it takes the refusal
# as final: after a NATS restart the server refuses for want of an answer until the auth
# callout's responder is back and its auth timeout (credentials.CALLOUT_TIMEOUT_S) has passed.
# A revoked host is disconnected at once either way; only its exit waits.
REFUSAL_GRACE_S = 10.0


ReconnectHook = Callable[[], Coroutine[Any, Any, None]]
# How long a reconnected client keeps trying to restore the topology while JetStream recovers
# (None: until it stands; each failure is logged).
RESTORE_TIMEOUT_S: float | None = None
# Retries of a topology that cannot be ensured yet (a cluster electing leaders, a node down):
# from the first delay, doubled up to the last.
TOPOLOGY_RETRY_FIRST_S = 0.25
TOPOLOGY_RETRY_MAX_S = 5.0
# Replicas of every stream and bucket on a clustered server when none is configured.
CLUSTER_REPLICAS = 3


def server_list(urls: str | Sequence[str]) -> list[str]:
    """`nats://a:4222,nats://b:4222` (commas or spaces) as nats-py's list of servers: a
    process starts and stays connected while any one of them is up."""
    parts = re.split(r"[,\s]+", urls) if isinstance(urls, str) else list(urls)
    servers = [part.strip() for part in parts if part.strip()]
    if not servers:
        raise ValueError("no NATS server URL given")
    return servers


@dataclasses.dataclass(frozen=True)
class NatsAccess:
    """How a process proves who it is to NATS and how it trusts the servers: an nkey seed
    file, or a `.creds` file (user JWT and nkey seed, from `nsc` or an operator); TLS with a
    CA to verify the servers and optionally a client certificate and key (mutual TLS)."""

    nkey_seed_file: str = ""
    creds_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __post_init__(self) -> None:
        if self.nkey_seed_file and self.creds_file:
            raise ValueError("give an nkey seed file or a .creds file, not both")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("a TLS client certificate needs its key, and a key its certificate")

    def tls_context(self) -> ssl.SSLContext | None:
        """None when no TLS file is given (a `tls://` URL still gets the system's CAs)."""
        if not (self.tls_ca_file or self.tls_cert_file):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file or None)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        options: dict[str, Any] = {}
        if self.nkey_seed_file:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if (context := self.tls_context()) is not None:
            options["tls"] = context
        return options


def credential_kind(path: str) -> str:
    """ "creds" for a `.creds` file (a user JWT and its seed), "nkey" for a bare seed file."""
    if path.endswith(".creds"):
        return "creds"
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return "nkey"  # nats-py names the missing file when it connects
    return "creds" if b"BEGIN NATS USER JWT" in head else "nkey"


def access_for(
    credential: str = "", *, tls_ca_file: str = "", tls_cert_file: str = "", tls_key_file: str = ""
) -> NatsAccess:
    """A NatsAccess from one credential file of either kind (a host's YAML names one)."""
    kind = credential_kind(credential) if credential else "nkey"
    return NatsAccess(
        nkey_seed_file=credential if kind == "nkey" else "",
        creds_file=credential if kind == "creds" else "",
        tls_ca_file=tls_ca_file,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
    )


class _Client(Client):
    """nats-py's client, with a PONG that answers a cancelled flush tolerated.

    nats-py 2.16 sets the result of the oldest flush's future on every PONG, even when that
    flush was cancelled (a task stopped while it waited): the read loop then raises
    InvalidStateError and stops reading for good, so the connection silently receives
    nothing more. A cancelled flush's PING is still answered, so its PONG is consumed here
    in turn and only a live future is resolved."""

    async def _process_pong(self) -> None:
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0


async def connect(
    url: str | Sequence[str],
    name: str,
    *,
    nkey_seed_file: str | None = None,
    nkey_seed: str | None = None,
    access: NatsAccess | None = None,
    attempts: int = 60,
    error_cb: ErrorCallback | None = None,
    on_reconnect: ReconnectHook | None = None,
    on_disconnect: Callable[[], object] | None = None,
) -> Client:
    """Connect to any of the servers in `url` (one URL or several, comma-separated), retrying
    while they start; afterwards nats-py reconnects by itself (to any of them, or to a server
    the cluster announced) and `on_reconnect` runs in the background after each reconnect
    (see `restore_topology`); `on_disconnect` is called as soon as a connection breaks (and on
    close), before any reconnect: core messages sent to this client until then are lost."""
    servers = server_list(url)
    if access is None:
        access = NatsAccess(nkey_seed_file=nkey_seed_file or "")
    elif nkey_seed_file:
        access = dataclasses.replace(access, nkey_seed_file=nkey_seed_file)
    options = access.connect_options()
    if nkey_seed:
        # Held in memory: a reconnect presents the same key even if the file is gone.
        options.pop("nkeys_seed", None)
        options["nkeys_seed_str"] = nkey_seed
    last_error: Exception | None = None
    restoring: set[asyncio.Task[None]] = set()

    async def reconnected() -> None:
        if on_reconnect is not None:
            # nats-py awaits this inside its reconnect loop: do the slow part elsewhere.
            task = asyncio.create_task(on_reconnect(), name=f"{name}-reconnected")
            keep_task(restoring, task, f"{name}: restore after a reconnect", level=logging.ERROR)

    async def disconnected() -> None:
        if on_disconnect is not None:
            on_disconnect()

    refused: list[Exception] = []
    report = error_cb or _log_error

    async def on_error(error: Exception) -> None:
        if "authorization" in str(error).lower():
            refused.append(error)
        await report(error)

    for _ in range(attempts):
        # nats-py retries a refused first connect by itself, forever: stop it on a refusal.
        client = _Client()
        connecting = asyncio.ensure_future(
            client.connect(
                servers,
                name=name,
                **options,
                error_cb=on_error,
                reconnected_cb=reconnected,
                disconnected_cb=disconnected,
                max_reconnect_attempts=-1,
                # Annotated int, but slept as seconds: half a second is meant.
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
            )
        )
        try:
            while not connecting.done() and not refused:
                await asyncio.wait({connecting}, timeout=0.05)
            if refused and not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                raise CredentialRefused(
                    f"NATS at {', '.join(servers)} refused the credential: {refused[0]}"
                )
            connecting.result()
            return client
        except CredentialRefused:
            raise
        except Exception as error:  # nats-py raises several unrelated types here
            if "authorization" in str(error).lower():
                raise CredentialRefused(
                    f"NATS at {', '.join(servers)} refused the credential: {error}"
                ) from error
            last_error = error
            await asyncio.sleep(0.25)
    raise ConnectionError(f"cannot reach NATS at {', '.join(servers)}: {last_error}")


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


def replicas_for(nc: Client, configured: int = 0) -> int:
    """The replicas of every stream and bucket: the configured number, else 1 on a lone
    server and CLUSTER_REPLICAS on one that belongs to a cluster."""
    if configured > 0:
        return configured
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    return CLUSTER_REPLICAS if info.get("cluster") else 1


def topology(replicas: int = 1) -> tuple[list[StreamConfig], list[StreamConfig]]:
    """The streams and the buckets' streams, each with `replicas`."""
    streams = [dataclasses.replace(c, num_replicas=replicas) for c in STREAMS]
    buckets = [bucket_stream(dataclasses.replace(b, replicas=replicas)) for b in BUCKETS]
    return streams, buckets


def bucket_stream(bucket: KeyValueConfig) -> StreamConfig:
    """The stream behind a KV bucket, as nats-py's `create_key_value` makes it."""
    duplicate_window = min(bucket.ttl, 120.0) if bucket.ttl else 120.0
    return StreamConfig(
        name=f"KV_{bucket.bucket}",
        description=bucket.description,
        subjects=[f"$KV.{bucket.bucket}.>"],
        allow_direct=bucket.direct,
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=duplicate_window,
        max_age=bucket.ttl,
        max_bytes=bucket.max_bytes,
        max_consumers=-1,
        max_msg_size=bucket.max_value_size,
        max_msgs=-1,
        max_msgs_per_subject=bucket.history,
        num_replicas=bucket.replicas,
        storage=bucket.storage,
    )


class TopologyError(RuntimeError):
    """Some stream or bucket could not be created or read (JetStream unavailable, a cluster
    without a leader, too few nodes for the replicas asked): retried, never fatal."""


# Fields compared between the code's config and a stream's; the others are left to the server.
_COMPARED = ("retention", "storage", "max_age", "duplicate_window", "max_msgs_per_subject")


def differences(wanted: StreamConfig, existing: StreamConfig) -> dict[str, tuple[Any, Any]]:
    """Field -> (wanted, existing) for every field of the code's config the stream differs
    in (the subjects: only those missing)."""
    found: dict[str, tuple[Any, Any]] = {}
    if (wanted.num_replicas or 1) != (existing.num_replicas or 1):
        found["num_replicas"] = (wanted.num_replicas or 1, existing.num_replicas or 1)
    missing = sorted(set(wanted.subjects or ()) - set(existing.subjects or ()))
    if missing:
        found["subjects"] = (missing, existing.subjects)
    for name in _COMPARED:
        mine, theirs = getattr(wanted, name), getattr(existing, name)
        if mine is None or (name == "duplicate_window" and not mine):
            continue  # not set here: the server's default is no difference
        if isinstance(mine, float) and isinstance(theirs, (int, float)):
            if math.isclose(mine, theirs, rel_tol=1e-6, abs_tol=1e-3):
                continue
        elif mine == theirs:
            continue
        found[name] = (mine, theirs)
    return found


def safe_update(wanted: StreamConfig, existing: StreamConfig) -> StreamConfig | None:
    """The stream's own config with only what is additive and safe taken from the code's:
    missing subjects added, replicas raised (never lowered); None when nothing is."""
    update: dict[str, Any] = {}
    missing = [s for s in wanted.subjects or () if s not in (existing.subjects or ())]
    if missing:
        update["subjects"] = [*(existing.subjects or ()), *missing]
    if (wanted.num_replicas or 1) > (existing.num_replicas or 1):
        update["num_replicas"] = wanted.num_replicas
    return dataclasses.replace(existing, **update) if update else None


# Mismatches already reported by this process (each once, not at every reconnect).
_reported: set[tuple[str, str, str]] = set()


def _report(kind: str, name: str, found: dict[str, tuple[Any, Any]]) -> None:
    for field, (mine, theirs) in found.items():
        key = (name, field, repr(theirs))
        if key in _reported:
            continue
        _reported.add(key)
        if field == "num_replicas" and theirs > mine:
            log.warning(
                "%s %s has %s replicas, more than the %s configured here: kept "
                "(set LLOOMA_NATS_REPLICAS=%s to match)",
                kind,
                name,
                theirs,
                mine,
                theirs,
            )
        else:
            log.warning(
                "%s %s differs from this version's config in %s (here %r, on the server %r): "
                "left as it is; change it on the server (nats stream edit) if it should be",
                kind,
                name,
                field,
                mine,
                theirs,
            )


async def _ensure_stream(js: JetStreamContext, wanted: StreamConfig, kind: str) -> None:
    assert wanted.name is not None
    refused: Exception | None = None
    for _ in range(3):
        try:
            existing: StreamInfo = await js.stream_info(wanted.name)
        except NotFoundError:
            try:
                await js.add_stream(config=wanted)
                log.info("%s %s created with %s replicas", kind, wanted.name, wanted.num_replicas)
                return
            except BadRequestError as error:
                refused = error  # another process created it meanwhile: compare with theirs
                continue
        _report(kind, wanted.name, differences(wanted, existing.config))
        update = safe_update(wanted, existing.config)
        if update is None:
            return
        if wanted.name == subjects.LEDGER_ANCHOR_STREAM:
            # The server refuses its updates to the control plane (LEDGER_ANCHOR_GUARDED_API).
            log.warning(
                "%s %s: replicas %s / subjects %s are changed by the NATS operator only",
                kind,
                wanted.name,
                update.num_replicas,
                update.subjects,
            )
            return
        try:
            await js.update_stream(config=update)
        except Exception as error:
            # The stream works as it is; raising its replicas waits for the next start or
            # reconnect (e.g. while a node is down there may be too few for them).
            log.warning(
                "%s %s: could not raise it to %s replicas / subjects %s (kept as it is): %s",
                kind,
                wanted.name,
                update.num_replicas,
                update.subjects,
                error,
            )
            return
        log.warning(
            "%s %s updated: replicas %s -> %s, subjects %s",
            kind,
            wanted.name,
            existing.config.num_replicas,
            update.num_replicas,
            update.subjects,
        )
        return
    raise TopologyError(f"{kind} {wanted.name} cannot be created: {refused}")


async def ensure_topology(js: JetStreamContext, replicas: int | None = None) -> None:
    """Create the streams and buckets that are missing, with `replicas` (default: the
    LLOOMA_NATS_REPLICAS setting, else 1 on a lone server and 3 on a cluster); safe to call
    from every process at once. An existing one is never put back to this code's config: a
    difference is logged, and only missing subjects and more replicas are applied. Raises
    TopologyError naming everything that failed (the rest is done)."""
    if replicas is None:
        from llooma.settings import load_settings

        replicas = replicas_for(js._nc, load_settings().nats_replicas)
    streams, buckets = topology(replicas)
    failures: list[str] = []
    for kind, configs in (("stream", streams), ("bucket", buckets)):
        for config in configs:
            try:
                await _ensure_stream(js, config, kind)
            except Exception as error:  # timeouts, no leader, too few nodes, ...
                failures.append(f"{kind} {config.name}: {type(error).__name__}: {error}")
    if failures:
        raise TopologyError("; ".join(failures))


async def keep_topology(
    js: JetStreamContext,
    what: str,
    timeout_s: float | None = None,
    replicas: int | None = None,
) -> bool:
    """`ensure_topology` until it succeeds (or `timeout_s` passes: False), each failure
    logged, retried with backoff; never raises."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    delay = TOPOLOGY_RETRY_FIRST_S
    failures = 0
    while True:
        try:
            await ensure_topology(js, replicas)
            if failures:
                log.warning("%s: topology ensured after %s failed attempts", what, failures)
            return True
        except Exception as error:
            failures += 1
            if deadline is not None and loop.time() + delay > deadline:
                log.error("%s: topology not ensured, giving up for now: %s", what, error)
                return False
            # The first failure and then every 10th: a cluster electing leaders takes seconds.
            level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
            log.log(
                level,
                "%s: topology not ensured (attempt %s), retrying in %.2f s: %s",
                what,
                failures,
                delay,
                error,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, TOPOLOGY_RETRY_MAX_S)


async def restore_topology(
    js: JetStreamContext, timeout_s: float | None = RESTORE_TIMEOUT_S
) -> None:
    """After a reconnect: the server may be a restarted one, whose memory streams and buckets
    are gone and whose JetStream may still be recovering its files; retry until it stands
    (never raises, never downgrades anything)."""
    await keep_topology(js, "restore after a reconnect", timeout_s)


def msg_id_headers(msg_id: str) -> dict[str, str]:
    """Headers making a JetStream publish idempotent within the duplicate window."""
    return {"Nats-Msg-Id": msg_id}


# A hand-off's publish is retried (with its Nats-Msg-Id, so a retry of one that was in fact
# stored is discarded as a duplicate) while a stream's leader is re-elected after a node died;
# each attempt waits this long for the ack, all of them together the budget.
HAND_OFF_ATTEMPT_S = 1.0
HAND_OFF_BUDGET_S = 2.5
HAND_OFF_RETRY_PAUSE_S = 0.1


async def hand_off(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    msg_id: str,
    *,
    budget_s: float = HAND_OFF_BUDGET_S,
) -> None:
    """A durable, idempotent hand-off to the next service (waits for the stream's ack); it
    carries the current span's traceparent when tracing. Retried within `budget_s` (no
    leader for the stream yet, a lost ack, a reconnect), then the last error is raised."""
    headers = tracing.inject(msg_id_headers(msg_id))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    while True:
        attempt_s = min(HAND_OFF_ATTEMPT_S, max(deadline - loop.time(), 0.05))
        try:
            await js.publish(subject, payload, timeout=attempt_s, headers=headers)
            return
        except BadRequestError:
            raise  # the stream's own answer about this message: resending cannot change it
        except Exception:  # a timeout, no responders (no leader yet), a lost connection
            if loop.time() + HAND_OFF_RETRY_PAUSE_S >= deadline:
                raise
            await asyncio.sleep(HAND_OFF_RETRY_PAUSE_S)


# A pull consumer's wait for its first message is one long-lived pull request the server
# answers the moment something arrives: at rest that is one request per this long instead of
# one per batch window. It also bounds how long a pull lost in a server restart goes unnoticed.
PULL_IDLE_WAIT_S = 5.0
PULL_RETRY_PAUSE_S = 1.0


async def pull_batches(
    js: JetStreamContext,
    subject: str,
    durable: str,
    stream: str,
    handle: Callable[[list[Msg]], Awaitable[None]],
    *,
    batch_size: int,
    gather_s: float,
    idle_wait_s: float = PULL_IDLE_WAIT_S,
) -> None:
    """Feed `handle` batches from a durable pull consumer until cancelled: wait (long-polled)
    for the first message, then gather up to `batch_size` within `gather_s`. `handle` acks."""
    sub: JetStreamContext.PullSubscription | None = None
    while True:
        try:
            if sub is None:
                sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
            batch = await sub.fetch(1, timeout=idle_wait_s)
        except nats.errors.TimeoutError:
            continue
        except Exception:  # a reconnect, no JetStream for a moment
            log.warning("pulling from %s failed; retrying", durable, exc_info=True)
            await asyncio.sleep(PULL_RETRY_PAUSE_S)
            continue
        if batch_size > 1:
            # Nothing more within the window, or a reconnect: post what came.
            with contextlib.suppress(Exception):
                batch += await sub.fetch(batch_size - 1, timeout=gather_s)
        try:
            await handle(batch)
        except Exception:
            log.exception("handling a batch from %s failed", durable)
