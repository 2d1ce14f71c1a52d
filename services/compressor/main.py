"""Composition root of the compressor service."""

from __future__ import annotations

from faststream import FastStream

from llooma import runtime
from llooma.settings import Settings
from services.compressor.handlers import router

SERVICE = "compressor"


def create_app(settings: Settings) -> FastStream:
    return runtime.build_app(SERVICE, settings, [router])


def main() -> None:
    runtime.serve(create_app)
