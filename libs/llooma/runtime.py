"""What every service process shares: logging, the FastStream app, topology, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import uvloop
from faststream import FastStream
from faststream.nats import NatsBroker, NatsRouter
from faststream.nats.security import NatsCredentials, NatsNKey, NatsSecurity
from nats.aio.client import Client

from llooma import bus, counters, subjects, tracing
from llooma.pacing import BeatPacer
from llooma.settings import VERSION, Settings, load_settings
from llooma.v1.service_pb2 import ServiceHeartbeat

log = logging.getLogger(__name__)

# How often a process's server loop looks for a requested stop (FastStream's, uvicorn's).
STOP_POLL_S = 1.0


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def new_instance_id(service: str) -> str:
    return f"{service}-{os.getpid()}-{secrets.token_hex(3)}"


def instance_service(instance_id: str) -> str:
    """The service an instance id (`new_instance_id`) belongs to."""
    return instance_id.rsplit("-", 2)[0]


class ServiceHeartbeater:
    """Puts this instance's ServiceHeartbeat into the services bucket on a `BeatPacer`'s pace:
    every `busy_s` while `busy()` says it has work in flight, every `idle_s` at rest; an
    instance that dies holding work is missed within `service_stale_after_s`."""

    def __init__(
        self,
        nc: Client,
        service: str,
        instance_id: str,
        *,
        busy_s: float,
        idle_s: float,
        busy: Callable[[], bool] = lambda: False,
        report: Callable[[ServiceHeartbeat], None] | None = None,
    ) -> None:
        self._nc = nc
        self._subject = subjects.kv_put_subject(subjects.SERVICES_BUCKET, instance_id)
        self._beat = ServiceHeartbeat(service=service, instance_id=instance_id, version=VERSION)
        # Fills in what this service reports beyond liveness (an ingress's in-flight counts).
        self._report = report
        self._pacer = BeatPacer(
            self._beat_ready, busy_s=busy_s, idle_s=idle_s, busy=busy, name="service-heartbeat"
        )

    async def start(self) -> None:
        await self._publish(ready=True)
        self._pacer.start()

    async def stop(self) -> None:
        await self._pacer.stop()
        with contextlib.suppress(Exception):
            await self._publish(ready=False)
            await self._nc.flush(timeout=1)

    def work_started(self) -> None:
        self._pacer.work_started()

    async def _beat_ready(self) -> None:
        await self._publish(ready=True)

    def beat_early(self, min_gap_s: float) -> None:
        self._pacer.beat_early(min_gap_s)

    async def _publish(self, *, ready: bool) -> None:
        self._beat.ready = ready
        self._beat.sent_unix_nanos = time.time_ns()
        self._beat.next_beat_ms = round(self._pacer.announce() * 1000)
        self._beat.counters.clear()
        self._beat.counters.update(counters.snapshot())
        if self._report is not None:
            self._report(self._beat)
        await self._nc.publish(self._subject, self._beat.SerializeToString())


BrokerHook = Callable[[NatsBroker], Awaitable[None]]


def broker_security(access: bus.NatsAccess) -> NatsSecurity | None:
    """FastStream's form of the control plane's NATS credential and TLS files."""
    context = access.tls_context()
    if access.creds_file:
        return NatsCredentials.from_file(access.creds_file, ssl_context=context)
    if access.nkey_seed_file:
        return NatsNKey(access.nkey_seed_file, ssl_context=context)
    return NatsSecurity(ssl_context=context) if context is not None else None


def build_app(
    service: str,
    settings: Settings,
    routers: Sequence[NatsRouter],
    *,
    on_connected: BrokerHook | None = None,
    on_stopping: BrokerHook | None = None,
) -> FastStream:
    """A FastStream app for `service`: topology ensured, hooks run, heartbeats published."""
    restoring: set[asyncio.Task[None]] = set()

    async def _reconnected() -> None:
        # A restarted server may have lost the memory streams and buckets; nats-py awaits this
        # callback inside its reconnect loop, so the restore runs on its own.
        task = asyncio.create_task(bus.restore_topology(broker.config.connection_state.stream))
        bus.keep_task(restoring, task, f"{service}: topology restore", level=logging.ERROR)

    access = settings.nats_access()
    broker = NatsBroker(
        bus.server_list(settings.nats_url),
        name=f"llooma-{service}",
        # Per-message logs go to DEBUG: INFO on every message costs more than the hop itself.
        log_level=logging.DEBUG,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        reconnected_cb=_reconnected,
        security=broker_security(access),
    )
    for router in routers:
        broker.include_router(router)
    app = FastStream(broker, logger=logging.getLogger(service))
    instance_id = new_instance_id(service)
    tracing.setup(service, instance_id=instance_id)
    heartbeater: list[ServiceHeartbeater] = []

    @app.on_startup
    async def _connect() -> None:
        await broker.connect()
        await bus.keep_topology(broker.config.connection_state.stream, service)
        if on_connected is not None:
            await on_connected(broker)

    @app.after_startup
    async def _announce() -> None:
        # No notion of work in flight here: these services beat at the idle pace.
        beat = ServiceHeartbeater(
            broker.connection,
            service,
            instance_id,
            busy_s=settings.heartbeat_interval_s,
            idle_s=settings.idle_heartbeat_interval_s,
        )
        await beat.start()
        heartbeater.append(beat)

    @app.on_shutdown
    async def _withdraw() -> None:
        for beat in heartbeater:
            await beat.stop()
        if on_stopping is not None:
            await on_stopping(broker)

    return app


def serve(create_app: Callable[[Settings], FastStream]) -> None:
    """Run one service process until SIGINT or SIGTERM."""
    settings = load_settings()
    configure_logging(settings)
    # FastStream polls for its stop flag this often (default 0.1 s, ten wake-ups a second at
    # rest): a SIGTERM is acted on within a second, well inside the supervisor's grace.
    uvloop.run(create_app(settings).run(log_level=logging.WARNING, sleep_time=STOP_POLL_S))
