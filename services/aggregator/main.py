"""Composition root of the aggregator service."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg

from llooma import subjects
from llooma.membership import RACER_CHECK_S, ServiceDirectory
from llooma.race_records import races_bucket
from llooma.service import Service, serve
from services.aggregator.handlers import Aggregator

log = logging.getLogger(__name__)

SERVICE = "aggregator"


async def setup(service: Service) -> None:
    settings = service.settings
    # Racers' heartbeats: a node whose racer stops beating is resumed on another one.
    services = ServiceDirectory(stale_after_s=settings.service_stale_after_s)
    await services.start(service.nc, service.js)
    service.on_stop(services.stop)
    aggregator = Aggregator(
        service.nc,
        service.instance_id,
        service.js,
        services,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        races=await races_bucket(service.js),
    )
    # The ingress takes an aggregator relaying requests for dead after 2 missed busy beats.
    service.holds_work = aggregator.relaying
    await service.subscribe(subjects.aggregation_any(service.instance_id), aggregator.on_node_event)

    async def on_start(msg: Msg) -> None:
        await aggregator.on_start(msg)
        service.work_started()

    await service.subscribe_queue(subjects.AGGREGATE_START, SERVICE, on_start)
    watching = asyncio.create_task(watch_relays(aggregator))

    async def stop_watching() -> None:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching

    service.on_stop(stop_watching)


async def watch_relays(aggregator: Aggregator) -> None:
    while True:
        await asyncio.sleep(RACER_CHECK_S)
        try:
            await aggregator.learn_racers()
            await aggregator.resume_stopped_racers()
            await aggregator.resume_stopped_dispatchers()
        except Exception:
            log.exception("checking node racers and dispatchers failed")


def main() -> None:
    serve(SERVICE, setup)
