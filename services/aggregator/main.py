"""Composition root of the aggregator service."""

from __future__ import annotations

from faststream import FastStream

from llooma import runtime
from llooma.settings import Settings
from services.aggregator.handlers import router

SERVICE = "aggregator"


def create_app(settings: Settings) -> FastStream:
    return runtime.build_app(SERVICE, settings, [router])


def main() -> None:
    runtime.serve(create_app)
