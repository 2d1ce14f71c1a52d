"""The admin API: /admin/v1/keys (create, list, get, update, revoke) and /admin/v1/usage,
behind an admin key (`LLOOMA_ADMIN_API_KEYS` or `LLOOMA_ADMIN_API_KEY_FILE`). The ingress
only checks the admin key and relays each call to accounting's key service over NATS: it
never touches Postgres. Without an admin key configured, every admin route is 404.
"""

from __future__ import annotations

import hmac
from typing import Any

import nats.errors
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llooma import subjects
from llooma.settings import api_key_id
from services.ingress.api import Ingress
from services.ingress.schema import error_response

# Creating a key posts a signed deposit: allow accounting a busy batch or two.
ADMIN_TIMEOUT_S = 10.0
QUERY_FIELDS = ("key", "since", "until", "owner")


def _ingress(request: Request) -> Ingress:
    ingress: Ingress = request.app.state.ingress
    return ingress


def _refusal(request: Request) -> Response | None:
    ingress = _ingress(request)
    admin_ids: set[str] = request.app.state.admin_key_ids
    if not admin_ids:
        return error_response(404, "the admin API is off (no admin key)", code="not_found")
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key:
        candidate = api_key_id(key.strip())
        if any(hmac.compare_digest(candidate, known) for known in admin_ids):
            return None
    if ingress.stats is not None:
        ingress.stats.rejected(401, "invalid_admin_key")
    return error_response(
        401,
        "missing or invalid admin key",
        error_type="authentication_error",
        code="invalid_api_key",
    )


async def _relay(request: Request, call: dict[str, Any]) -> Response:
    refused = _refusal(request)
    if refused is not None:
        return refused
    try:
        reply = await _ingress(request).nc.request(
            subjects.KEYS_ADMIN, orjson.dumps(call), timeout=ADMIN_TIMEOUT_S
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return error_response(
            503,
            "accounting's key service is not reachable right now",
            error_type="server_error",
            code="key_service_unavailable",
            headers={"retry-after": "1"},
        )
    answer = orjson.loads(reply.data)
    return Response(
        orjson.dumps(answer["body"]), status_code=answer["status"], media_type="application/json"
    )


async def _body(request: Request) -> dict[str, Any] | Response:
    try:
        body = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        return error_response(400, "the body is not JSON", code="invalid_request")
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object", code="invalid_request")
    return body


async def keys(request: Request) -> Response:
    if request.method == "GET":
        include = request.query_params.get("include_revoked", "") in ("1", "true")
        owner = request.query_params.get("owner", "")
        return await _relay(request, {"op": "list", "include_revoked": include, "owner": owner})
    if (refused := _refusal(request)) is not None:
        return refused
    body = await _body(request)
    if isinstance(body, Response):
        return body
    return await _relay(request, {**body, "op": "create"})


async def key(request: Request) -> Response:
    reference = request.path_params["key"]
    if request.method == "GET":
        return await _relay(request, {"op": "get", "key": reference})
    if request.method == "DELETE":
        return await _relay(request, {"op": "revoke", "key": reference})
    if (refused := _refusal(request)) is not None:
        return refused
    body = await _body(request)
    if isinstance(body, Response):
        return body
    return await _relay(request, {**body, "op": "update", "key": reference})


async def usage(request: Request) -> Response:
    query = {f: request.query_params[f] for f in QUERY_FIELDS if request.query_params.get(f)}
    return await _relay(request, {**query, "op": "usage"})


def admin_key_ids(keys: list[str]) -> set[str]:
    return {api_key_id(k) for k in keys}


ROUTES = [
    Route("/admin/v1/keys", keys, methods=["GET", "POST"]),
    Route("/admin/v1/keys/{key}", key, methods=["GET", "PATCH", "DELETE"]),
    Route("/admin/v1/usage", usage, methods=["GET"]),
]
