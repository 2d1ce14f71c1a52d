"""API keys in Postgres (accounting's key service is the only writer), and spend per key from
the ledger: each charge leg of a key's account, by the model of the attempt it settled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from llooma.keys._record import KeyRecord

COLUMNS = "key_id, name, owner, prefix, rpm, tpm, models, expires_at, created_at, revoked_at"

INSERT = f"""
INSERT INTO api_keys (key_id, name, owner, prefix, rpm, tpm, models, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING {COLUMNS}
"""

UPDATE = f"""
UPDATE api_keys SET
    name = coalesce($2, name), owner = coalesce($3, owner), rpm = coalesce($4, rpm),
    tpm = coalesce($5, tpm), models = coalesce($6, models),
    expires_at = CASE WHEN $7 THEN $8 ELSE expires_at END, updated_at = now()
WHERE key_id = $1 AND revoked_at IS NULL
RETURNING {COLUMNS}
"""

REVOKE = f"""
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()), updated_at = now()
WHERE key_id = $1
RETURNING {COLUMNS}
"""

# Each charge is the user's leg of an attempt's posting (ref = attempt id), each refund the
# user's leg of its request's re-billing (`delivery:<request_id>`, ref = a winning attempt);
# its time is its block's. Requests count distinct requests (a split request settles one
# attempt a node); tokens are the winners' (what the hosts produced).
USAGE = """
SELECT substr(e.account, 6) AS key_id, s.model,
       count(DISTINCT s.request_id) AS requests,
       coalesce(sum(s.input_tokens) FILTER (WHERE e.kind = 'charge'), 0)::int8 AS input_tokens,
       coalesce(sum(s.output_tokens) FILTER (WHERE e.kind = 'charge'), 0)::int8
           AS output_tokens,
       coalesce(sum(-e.amount), 0)::int8 AS credits_micros
FROM ledger_entries e
JOIN ledger_blocks b ON b.height = e.block_height
JOIN task_settlements s ON s.attempt_id = e.ref
WHERE e.kind IN ('charge', 'refund') AND e.account LIKE 'user:%'
  AND e.txn_id IN ('attempt:' || s.attempt_id, 'delivery:' || s.request_id)
  AND ($1::text IS NULL OR e.account = 'user:' || $1)
  AND b.created_unix_nanos >= $2 AND b.created_unix_nanos < $3
GROUP BY 1, 2
ORDER BY 1, 2
"""


_NANOS_MAX = 2**63 - 1


def _unix_ms(moment: datetime | None) -> int:
    return int(moment.timestamp() * 1000) if moment is not None else 0


def record_of(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        name=row["name"],
        owner=row["owner"],
        prefix=row["prefix"],
        rpm=row["rpm"],
        tpm=row["tpm"],
        models=tuple(row["models"]),
        expires_unix_ms=_unix_ms(row["expires_at"]),
        created_unix_ms=_unix_ms(row["created_at"]),
        revoked_unix_ms=_unix_ms(row["revoked_at"]),
    )


@dataclass(frozen=True, slots=True)
class Changes:
    """An update: None leaves a field as it is; `expires_at` applies when `set_expiry`."""

    name: str | None = None
    owner: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: Sequence[str] | None = None
    set_expiry: bool = False
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class UsageLine:
    key_id: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    credits_micros: int


class KeyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self,
        key_id: str,
        name: str,
        *,
        owner: str = "",
        prefix: str = "",
        rpm: int = 0,
        tpm: int = 0,
        models: Sequence[str] = (),
        expires_at: datetime | None = None,
    ) -> KeyRecord:
        row = await self.pool.fetchrow(
            INSERT, key_id, name, owner, prefix, rpm, tpm, list(models), expires_at
        )
        assert row is not None
        return record_of(row)

    async def get(self, key_id: str) -> KeyRecord | None:
        row = await self.pool.fetchrow(f"SELECT {COLUMNS} FROM api_keys WHERE key_id = $1", key_id)
        return record_of(row) if row is not None else None

    async def find(self, reference: str) -> KeyRecord | None:
        """By key id, else by name (the newest key of that name that is not revoked)."""
        found = await self.get(reference)
        if found is not None:
            return found
        row = await self.pool.fetchrow(
            f"SELECT {COLUMNS} FROM api_keys WHERE name = $1 "
            "ORDER BY revoked_at IS NULL DESC, created_at DESC LIMIT 1",
            reference,
        )
        return record_of(row) if row is not None else None

    async def list_keys(self, *, include_revoked: bool = False, owner: str = "") -> list[KeyRecord]:
        rows = await self.pool.fetch(
            f"SELECT {COLUMNS} FROM api_keys "
            "WHERE ($1 OR revoked_at IS NULL) AND ($2 = '' OR owner = $2) ORDER BY created_at",
            include_revoked,
            owner,
        )
        return [record_of(row) for row in rows]

    async def update(self, key_id: str, changes: Changes) -> KeyRecord | None:
        models = list(changes.models) if changes.models is not None else None
        row = await self.pool.fetchrow(
            UPDATE,
            key_id,
            changes.name,
            changes.owner,
            changes.rpm,
            changes.tpm,
            models,
            changes.set_expiry,
            changes.expires_at,
        )
        return record_of(row) if row is not None else None

    async def revoke(self, key_id: str) -> KeyRecord | None:
        row = await self.pool.fetchrow(REVOKE, key_id)
        return record_of(row) if row is not None else None

    async def usage(
        self, key_id: str | None, since: datetime | None, until: datetime | None
    ) -> list[UsageLine]:
        start = min(_NANOS_MAX, int(since.timestamp() * 1e9)) if since is not None else 0
        end = min(_NANOS_MAX, int(until.timestamp() * 1e9)) if until is not None else _NANOS_MAX
        rows = await self.pool.fetch(USAGE, key_id, start, end)
        return [UsageLine(**dict(row)) for row in rows]


def parse_time(value: object) -> datetime | None:
    """An ISO-8601 time (naive means UTC) or unix seconds; None for None or ""."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    raise ValueError(f"not a time: {value!r}")
