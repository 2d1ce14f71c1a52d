"""Composition root of the privacy service."""

from __future__ import annotations

from llooma import subjects
from llooma.planning import planner_config
from llooma.service import Service, serve
from services.privacy.handlers import Mediator

SERVICE = "privacy"


async def setup(service: Service) -> None:
    mediator = Mediator(service.nc, service.js, planner_config(service.settings))
    await service.consume(subjects.PIPELINE_PRIVACY, subjects.CONSUMER_PRIVACY, mediator.handle)


def main() -> None:
    serve(SERVICE, setup)
