"""Composition root of the dispatcher service."""

from __future__ import annotations

from llooma import subjects
from llooma.membership import HostDirectory
from llooma.service import Service, serve
from services.dispatcher.handlers import Dispatcher

SERVICE = "dispatcher"


async def setup(service: Service) -> None:
    settings = service.settings
    hosts = HostDirectory(
        stale_after_s=settings.host_stale_after_s, min_version=settings.min_host_version
    )
    await hosts.start(service.js)
    service.on_stop(hosts.stop)
    dispatcher = Dispatcher(settings, hosts, service.nc, service.js, service.instance_id)
    await service.subscribe(dispatcher.dag.done_subject, dispatcher.dag.on_node_done)
    # Every dispatcher replica learns from every race, so no queue group.
    await service.subscribe(subjects.RACE_EVENT, dispatcher.on_race_event)
    # Duel results make the host quality term of S(h); likewise every replica.
    await service.subscribe(subjects.SETTLEMENT_DUEL, dispatcher.on_duel_result)
    await service.consume(
        subjects.PIPELINE_DISPATCHER, subjects.CONSUMER_DISPATCHER, dispatcher.handle
    )


def main() -> None:
    serve(SERVICE, setup)
