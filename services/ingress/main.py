"""Composition root of the ingress: settings -> NATS -> directories -> HTTP app -> uvicorn."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llooma import bus, runtime, tracing
from llooma.keys import KeyBook
from llooma.ledger.balances import BalanceBook
from llooma.limiter import SharedCounters
from llooma.membership import HostDirectory, ServiceDirectory
from llooma.metrics import StatsCollector
from llooma.runtime import ServiceHeartbeater
from llooma.settings import Settings, load_settings
from services.ingress.admin import ROUTES as ADMIN_ROUTES
from services.ingress.admin import admin_key_ids
from services.ingress.api import Ingress
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
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        instance_id = runtime.new_instance_id(SERVICE)

        async def reconnected() -> None:
            # A restarted server may have lost the memory stream and buckets the ingress
            # publishes to and watches (bus.connect logs a failure).
            await bus.restore_topology(nc.jetstream())

        nc = await bus.connect(
            settings.nats_url,
            f"llooma-{SERVICE}",
            access=settings.nats_access(),
            on_reconnect=reconnected,
        )
        js = nc.jetstream()
        await bus.keep_topology(js, SERVICE)
        hosts = HostDirectory(
            stale_after_s=settings.host_stale_after_s, min_version=settings.min_host_version
        )
        services = ServiceDirectory(stale_after_s=settings.service_stale_after_s)
        await hosts.start(js)
        await services.start(js)
        replies = ReplyRouter(instance_id)
        await replies.start(nc)
        stats = StatsCollector(settings, hosts)
        await stats.start(js)
        app.state.stats = stats
        app.state.ingress = Ingress(settings, nc, js, replies, hosts, services)
        balances = BalanceBook()
        await balances.start(js)
        app.state.ingress.balances = balances
        keys = KeyBook()
        await keys.start(js)
        app.state.ingress.keys = keys
        app.state.ingress.deliveries = DeliveryReporter(js)
        if settings.rate_limits_shared:
            app.state.ingress.shared_limits = SharedRateLimits(settings, SharedCounters(js))
            app.state.ingress.limits.rates_shared = True
        app.state.admin_key_ids = admin_key_ids(settings.admin_keys())
        app.state.ingress.stats = stats
        heartbeat = ServiceHeartbeater(nc, SERVICE, instance_id, settings.heartbeat_interval_s)
        await heartbeat.start()
        try:
            yield
        finally:
            await heartbeat.stop()
            await stats.stop()
            await balances.stop()
            await keys.stop()
            await hosts.stop()
            await services.stop()
            await nc.drain()

    # Only when tracing: an untraced ingress keeps no middleware layer at all.
    middleware = [Middleware(tracing.ServerSpans)] if tracing.enabled() else []
    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
    )


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
    uvloop.run(uvicorn.Server(config).serve())
