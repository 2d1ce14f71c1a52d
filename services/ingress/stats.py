"""Operator routes: GET /v1/stats (Table II as JSON), GET /metrics (Prometheus text) and the
status page at GET /.

The page itself holds no data and is always served. The data needs no API key from a loopback
client (unless `stats_open_on_loopback` is off); anyone else sends a bearer API key.
"""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from llooma.metrics import StatsCollector
from services.ingress.api import Ingress
from services.ingress.schema import error_response

STATUS_PAGE = Path(__file__).parent / "static" / "status.html"


@functools.cache
def _page() -> bytes:
    return STATUS_PAGE.read_bytes()


def _loopback(request: Request) -> bool:
    if request.client is None:
        return False
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def _authorized(request: Request) -> bool:
    ingress: Ingress = request.app.state.ingress
    if ingress.settings.stats_open_on_loopback and _loopback(request):
        return True
    return ingress._authenticate(request) is not None


def _collector(request: Request) -> StatsCollector:
    collector: StatsCollector = request.app.state.stats
    return collector


def _unauthorized() -> Response:
    return error_response(
        401,
        "missing or invalid API key (stats are open only to loopback clients)",
        error_type="authentication_error",
        code="invalid_api_key",
    )


async def stats(request: Request) -> Response:
    if not _authorized(request):
        return _unauthorized()
    body = orjson.dumps(_collector(request).snapshot())
    return Response(body, media_type="application/json", headers={"cache-control": "no-store"})


async def metrics(request: Request) -> Response:
    if not _authorized(request):
        return _unauthorized()
    return Response(_collector(request).prometheus_text(), media_type=CONTENT_TYPE_LATEST)


async def status_page(_: Request) -> Response:
    return HTMLResponse(_page(), headers={"cache-control": "no-cache"})


ROUTES = [
    Route("/v1/stats", stats, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/", status_page, methods=["GET"]),
]
