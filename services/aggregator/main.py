"""Composition root of the aggregator service."""

from __future__ import annotations

from llooma import subjects
from llooma.service import Service, serve
from services.aggregator.handlers import Aggregator

SERVICE = "aggregator"


async def setup(service: Service) -> None:
    aggregator = Aggregator(service.nc, service.instance_id)
    await service.subscribe(subjects.aggregation_any(service.instance_id), aggregator.on_node_event)
    await service.subscribe_queue(subjects.AGGREGATE_START, SERVICE, aggregator.on_start)


def main() -> None:
    serve(SERVICE, setup)
