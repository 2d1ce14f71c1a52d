"""Composition root of the dispatcher service."""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker
from llooma import runtime
from llooma.membership import HostDirectory
from llooma.settings import Settings

from services.dispatcher.handlers import Dispatcher, build_router

SERVICE = "dispatcher"


def create_app(settings: Settings) -> FastStream:
    hosts = HostDirectory(
        stale_after_s=settings.host_stale_after_s, min_version=settings.min_host_version
    )

    async def watch_hosts(broker: NatsBroker) -> None:
        await hosts.start(broker.config.connection_state.stream)

    async def stop_watching(_: NatsBroker) -> None:
        await hosts.stop()

    return runtime.build_app(
        SERVICE,
        settings,
        [build_router(Dispatcher(settings, hosts))],
        on_connected=watch_hosts,
        on_stopping=stop_watching,
    )


def main() -> None:
    runtime.serve(create_app)
