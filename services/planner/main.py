"""Composition root of the planner service."""

from __future__ import annotations

from llooma import subjects
from llooma.membership import HostDirectory
from llooma.service import Service, serve
from services.planner.handlers import Planner

SERVICE = "planner"


async def setup(service: Service) -> None:
    settings = service.settings
    # Which hosts could run a split's parts: hosts on one shared engine count once (L_split).
    hosts = HostDirectory(
        stale_after_s=settings.host_stale_after_s, min_version=settings.min_host_version
    )
    await hosts.start(service.nc, service.js)
    service.on_stop(hosts.stop)
    planner = Planner(settings, service.nc, service.js, service.instance_id, hosts)
    # Every planner replica learns the per-model rates from every race.
    await service.subscribe(subjects.RACE_EVENT, planner.on_race_event)
    await service.consume(subjects.PIPELINE_PLANNER, subjects.CONSUMER_PLANNER, planner.handle)


def main() -> None:
    serve(SERVICE, setup)
