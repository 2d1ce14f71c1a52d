"""Accounting's key service: the only writer of API keys (Postgres) and of the keys bucket the
ingresses watch. It lives in accounting because a key's budget is a signed deposit into the
ledger, which only accounting (holding the block-signing key) may post, and because accounting
is already the one process that touches Postgres.

Requests arrive on `subjects.KEYS_ADMIN` (from the ingress's admin API and `llooma keys`) as
JSON `{"op": ..., ...}`; replies are `{"status": <HTTP status>, "body": {...}}`.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import nats.js.errors
import orjson
from faststream.nats import NatsRouter
from faststream.nats.annotations import NatsMessage

from llooma import subjects
from llooma.keys import Changes, KeyRecord, KeyStore, new_api_key, parse_time, shown_prefix
from llooma.ledger.economics import deposit, opening_txn_id
from llooma.settings import api_key_id
from services.accounting.handlers import Accounting

log = logging.getLogger(__name__)

MICROS = 1_000_000
Reply = tuple[int, dict[str, Any]]


class Refused(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _micros(value: object, field: str) -> int:
    try:
        micros = int(Decimal(str(value)) * MICROS)
    except (InvalidOperation, ValueError) as error:
        raise Refused(400, f"{field} is not a number of credits", "invalid_request") from error
    if micros < 0:
        raise Refused(400, f"{field} must not be negative", "invalid_request")
    return micros


def _count(request: dict[str, Any], field: str) -> int | None:
    value = request.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Refused(400, f"{field} must be a whole number >= 0", "invalid_request")
    return value


def _models(request: dict[str, Any]) -> list[str] | None:
    value = request.get("models")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise Refused(400, "models must be a list of model names", "invalid_request")
    return value


def _time(request: dict[str, Any], field: str) -> Any:
    try:
        return parse_time(request.get(field))
    except (ValueError, TypeError, OverflowError) as error:
        raise Refused(400, f"{field}: {error}", "invalid_request") from error


class KeyService:
    def __init__(self, accounting: Accounting) -> None:
        self.accounting = accounting
        self.keys: KeyStore

    def open(self, pool: asyncpg.Pool) -> None:
        self.keys = KeyStore(pool)

    # -- the bucket ------------------------------------------------------------------------

    async def publish(self, record: KeyRecord) -> None:
        kv = await self.accounting.js.key_value(subjects.KEYS_BUCKET)
        if record.revoked_unix_ms:
            await kv.delete(record.key_id)
        else:
            await kv.put(record.key_id, record.encode())

    async def publish_all(self) -> None:
        """Every key that is not revoked; entries of keys revoked meanwhile are deleted."""
        kv = await self.accounting.js.key_value(subjects.KEYS_BUCKET)
        active = await self.keys.list_keys()
        for record in active:
            await kv.put(record.key_id, record.encode())
        try:
            published = set(await kv.keys())
        except nats.js.errors.NoKeysError:
            published = set()
        for stale in published - {r.key_id for r in active}:
            await kv.delete(stale)

    # -- requests --------------------------------------------------------------------------

    async def handle(self, request: dict[str, Any]) -> Reply:
        operations = {
            "create": self.create,
            "list": self.list_keys,
            "get": self.get,
            "update": self.update,
            "revoke": self.revoke,
            "usage": self.usage,
        }
        operation = operations.get(str(request.get("op")))
        if operation is None:
            return 400, _error(f"unknown op {request.get('op')!r}", "invalid_request")
        try:
            return await operation(request)
        except Refused as why:
            return why.status, _error(str(why), why.code)

    async def _view(self, record: KeyRecord) -> dict[str, Any]:
        balance = await self.accounting.store.user_balance(record.key_id)
        return {**record.to_dict(), "balance_micros": balance}

    async def _find(self, request: dict[str, Any]) -> KeyRecord:
        reference = request.get("key")
        if not isinstance(reference, str) or not reference:
            raise Refused(400, "name the key (its key id or name)", "invalid_request")
        record = await self.keys.find(reference)
        if record is None:
            raise Refused(404, f"no key {reference!r}", "key_not_found")
        return record

    async def _deposit(self, txn_id: str, key_id: str, micros: int) -> None:
        if micros:
            posted = await self.accounting.store.deposit([deposit(txn_id, key_id, micros)])
            await self.accounting.publish_posted(posted)

    async def create(self, request: dict[str, Any]) -> Reply:
        name = request.get("name")
        if not isinstance(name, str) or not name.strip():
            raise Refused(400, "a key needs a name", "invalid_request")
        budget = _micros(request.get("budget", 0), "budget")
        key = new_api_key()
        key_id = api_key_id(key)
        record = await self.keys.create(
            key_id,
            name.strip(),
            owner=str(request.get("owner") or ""),
            prefix=shown_prefix(key),
            rpm=_count(request, "rpm") or 0,
            tpm=_count(request, "tpm") or 0,
            models=_models(request) or [],
            expires_at=_time(request, "expires_at"),
        )
        # The balance first: an ingress that sees the key sees its budget too.
        await self._deposit(opening_txn_id(key_id), key_id, budget)
        await self.publish(record)
        log.info("created key %s (%s)", key_id, record.name)
        return 201, {**(await self._view(record)), "key": key}

    async def list_keys(self, request: dict[str, Any]) -> Reply:
        records = await self.keys.list_keys(
            include_revoked=bool(request.get("include_revoked")),
            owner=str(request.get("owner") or ""),
        )
        return 200, {"data": [await self._view(r) for r in records]}

    async def get(self, request: dict[str, Any]) -> Reply:
        return 200, await self._view(await self._find(request))

    async def update(self, request: dict[str, Any]) -> Reply:
        found = await self._find(request)
        if found.revoked_unix_ms:
            raise Refused(409, "the key is revoked", "key_revoked")
        name = request.get("name")
        changes = Changes(
            name=name.strip() if isinstance(name, str) and name.strip() else None,
            owner=request["owner"] if isinstance(request.get("owner"), str) else None,
            rpm=_count(request, "rpm"),
            tpm=_count(request, "tpm"),
            models=_models(request),
            set_expiry="expires_at" in request,
            expires_at=_time(request, "expires_at"),
        )
        top_up = _micros(request.get("add_budget", 0), "add_budget")
        record = await self.keys.update(found.key_id, changes)
        if record is None:
            raise Refused(409, "the key is revoked", "key_revoked")
        once = str(request.get("idempotency_key") or uuid.uuid4().hex)
        await self._deposit(f"credit:{once}", record.key_id, top_up)
        await self.publish(record)
        return 200, await self._view(record)

    async def revoke(self, request: dict[str, Any]) -> Reply:
        found = await self._find(request)
        record = await self.keys.revoke(found.key_id)
        assert record is not None
        await self.publish(record)
        log.info("revoked key %s (%s)", record.key_id, record.name)
        return 200, await self._view(record)

    async def usage(self, request: dict[str, Any]) -> Reply:
        key_id = None
        if request.get("key"):
            key_id = (await self._find(request)).key_id
        lines = await self.keys.usage(key_id, _time(request, "since"), _time(request, "until"))
        names = {r.key_id: r.name for r in await self.keys.list_keys(include_revoked=True)}
        data = [{**dataclasses.asdict(line), "name": names.get(line.key_id, "")} for line in lines]
        totals = {
            field: sum(int(row[field]) for row in data)
            for field in ("requests", "input_tokens", "output_tokens", "credits_micros")
        }
        return 200, {"data": data, "totals": totals}


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def build_key_router(service: KeyService) -> NatsRouter:
    router = NatsRouter()

    @router.subscriber(subjects.KEYS_ADMIN, queue="accounting")
    async def administer(message: NatsMessage) -> bytes:
        try:
            request = orjson.loads(message.body)
            if not isinstance(request, dict):
                raise TypeError("not an object")
        except (orjson.JSONDecodeError, TypeError):
            status, body = 400, _error("the request is not a JSON object", "invalid_request")
        else:
            status, body = await service.handle(request)
        return orjson.dumps({"status": status, "body": body})

    return router
