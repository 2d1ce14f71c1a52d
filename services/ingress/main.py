"""Composition root of the ingress: settings -> the shared service runtime (NATS, topology,
heartbeat, stop hooks) -> directories -> HTTP app -> uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llooma import runtime, tracing
from llooma.keys import KeyBook
from llooma.ledger.balances import BalanceBook
from llooma.limiter import SharedCounters
from llooma.membership import HostDirectory, ServiceDirectory
from llooma.metrics import StatsCollector
from llooma.service import Service
from llooma.settings import Settings, load_settings
from services.ingress.admin import ROUTES as ADMIN_ROUTES
from services.ingress.admin import admin_key_ids
from services.ingress.api import Ingress
from services.ingress.capacity import PeerInFlight, fill_report
from services.ingress.completions import TEXT_COMPLETIONS
from services.ingress.delivery import DeliveryReporter
from services.ingress.embeddings import EMBEDDINGS
from services.ingress.http_protocol import bounded_protocol
from services.ingress.openapi import serve_openapi
from services.ingress.replies import ReplyRouter
from services.ingress.responses import RESPONSES
from services.ingress.schema import error_response
from services.ingress.shared_limits import SharedRateLimits
from services.ingress.stats import ROUTES as STATS_ROUTES

SERVICE = "ingress"

log = logging.getLogger(__name__)


def _ingress(request: Request) -> Ingress:
    ingress: Ingress = request.app.state.ingress
    return ingress


async def chat_completions(request: Request) -> Response:
    return await _ingress(request).chat_completions(request)


async def completions(request: Request) -> Response:
    return await _ingress(request).chat_completions(request, TEXT_COMPLETIONS)


async def responses(request: Request) -> Response:
    return await _ingress(request).chat_completions(request, RESPONSES)


async def embeddings(request: Request) -> Response:
    return await _ingress(request).chat_completions(request, EMBEDDINGS)


async def models(request: Request) -> Response:
    return await _ingress(request).models(request)


async def model(request: Request) -> Response:
    return await _ingress(request).model(request)


async def healthz(request: Request) -> Response:
    return await _ingress(request).healthz(request)


async def http_error(request: Request, error: Exception) -> Response:
    """Unknown routes and wrong methods answer in OpenAI's error shape, not plain text."""
    assert isinstance(error, HTTPException)
    if error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(
            405, message, code="method_not_allowed", headers=dict(error.headers or {})
        )
    message = f"no route {request.method} {request.url.path}; see /openapi.json"
    return error_response(error.status_code, message, code="not_found")


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    *STATS_ROUTES,
    *ADMIN_ROUTES,
    Route("/openapi.json", serve_openapi, methods=["GET"]),
]


def create_app(settings: Settings) -> Starlette:
    async def setup(service: Service, replies: ReplyRouter) -> None:
        """The ingress's parts on the shared service runtime; `app.state` is where the HTTP
        routes find them."""
        nc, js = service.nc, service.js
        hosts = HostDirectory(
            stale_after_s=settings.host_stale_after_s, min_version=settings.min_host_version
        )
        services = ServiceDirectory(stale_after_s=settings.service_stale_after_s)
        await hosts.start(nc, js)
        service.on_stop(hosts.stop)
        await services.start(nc, js)
        service.on_stop(services.stop)
        await replies.start(nc)
        stats = StatsCollector(settings, hosts, service.instance_id)
        await stats.start(js, nc)
        service.on_stop(stats.stop)
        ingress = Ingress(settings, nc, js, replies, hosts, services)
        ingress.balances = BalanceBook()
        await ingress.balances.start(js)
        service.on_stop(ingress.balances.stop)
        ingress.keys = KeyBook()
        await ingress.keys.start(js)
        service.on_stop(ingress.keys.stop)
        ingress.deliveries = DeliveryReporter(js, service.instance_id)
        service.on_stop(ingress.deliveries.close)
        if settings.rate_limits_shared:
            ingress.shared_limits = SharedRateLimits(settings, SharedCounters(js))
            ingress.limits.rates_shared = True
        # The capacity gate counts every ingress's requests (services.ingress.capacity).
        limits = ingress.limits
        limits.peer_in_flight = PeerInFlight(services, SERVICE, service.instance_id)
        gap_s = settings.capacity_report_gap_s
        limits.on_change = lambda: service.beat_early(gap_s)
        service.holds_work = lambda: limits.in_flight > 0
        service.report = lambda beat: fill_report(
            beat, limits.in_flight_by_model, limits.waiting_first_token
        )
        stats.cluster_in_flight = limits.cluster_in_flight
        ingress.stats = stats
        app.state.stats = stats
        app.state.ingress = ingress
        app.state.admin_key_ids = admin_key_ids(settings.admin_keys())

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        service = Service(SERVICE, settings)
        replies = ReplyRouter(service.instance_id)

        def disconnected() -> None:
            lost = replies.connection_lost()
            if lost:
                log.warning("NATS connection lost: %d open requests refused or ended", lost)

        service.on_disconnect = disconnected
        await service.start(functools.partial(setup, replies=replies))
        try:
            yield
        finally:
            await service.stop()

    # Only when tracing: an untraced ingress keeps no middleware layer at all.
    middleware = [Middleware(tracing.ServerSpans)] if tracing.enabled() else []
    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
    )
    return app


class Server(uvicorn.Server):
    """uvicorn's server with its housekeeping tick (the Date header, the stop flag) once a
    second rather than ten times: the ingress at rest wakes for nothing else."""

    async def main_loop(self) -> None:
        ticks_per_poll = round(10 * runtime.STOP_POLL_S)  # on_tick counts tenths of a second
        counter = 0
        while not await self.on_tick(counter):
            await asyncio.sleep(runtime.STOP_POLL_S)
            counter = (counter + ticks_per_poll) % 864000


def main() -> None:
    settings = load_settings()
    runtime.configure_logging(settings)
    tracing.setup(SERVICE)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        loop="none",
        # Requests read whole within a deadline, headers bounded (slow clients are cut off).
        http=bounded_protocol(settings.http_read_timeout_s, settings.http_max_header_bytes),
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    uvloop.run(Server(config).serve())
