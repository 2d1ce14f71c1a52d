"""Composition root of the racer service."""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker
from llooma import runtime
from llooma.settings import Settings

from services.racer.handlers import build_router
from services.racer.race import Racer

SERVICE = "racer"


def create_app(settings: Settings) -> FastStream:
    racer = Racer(runtime.new_instance_id(SERVICE))

    async def start_racer(broker: NatsBroker) -> None:
        state = broker.config.connection_state
        await racer.start(state.connection, state.stream)

    return runtime.build_app(SERVICE, settings, [build_router(racer)], on_connected=start_racer)


def main() -> None:
    runtime.serve(create_app)
