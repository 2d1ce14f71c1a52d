"""Composition root of the planner service."""

from __future__ import annotations

from llooma import subjects
from llooma.service import Service, serve
from services.planner.handlers import Planner

SERVICE = "planner"


async def setup(service: Service) -> None:
    planner = Planner(service.settings, service.nc, service.js, service.instance_id)
    # Every planner replica learns the per-model rates from every race.
    await service.subscribe(subjects.RACE_EVENT, planner.on_race_event)
    await service.consume(subjects.PIPELINE_PLANNER, subjects.CONSUMER_PLANNER, planner.handle)


def main() -> None:
    serve(SERVICE, setup)
