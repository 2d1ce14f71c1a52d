"""Billing what the client got: the ingress reports what each request's client received
(`DeliveryReport`), and a request that did not complete is re-billed by one posting,
`delivery:<request_id>`, against its winners' charges and payouts:

- the client got nothing (a failed non-streaming request, a stream cut before its first
  token): the user's charges are refunded in full;
- a stream cut or failed after D of T output tokens: the user keeps paying for the prompt and
  D tokens, (I + D) / (I + T) of the charge, and is refunded the rest;
- the control plane failed the request (`failed`: a 5xx or an error event, e.g. the winner
  stalled and no one could continue): the winners are also paid only for the share that
  reached the client. A cut the client or a dead ingress caused leaves the hosts' pay alone.

A request whose final report never came (its ingress died) is billed for its last report,
once no report came for `CUT_GRACE_S`: the ingress reports every `CHECKPOINT_S` while it
streams, so the client had at least that much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

from llooma.ledger.economics import PLATFORM, Leg, Posting
from llooma.v1.settlement_pb2 import DeliveryReport

CHECKPOINT_S = 1.0
# No report for this long while a request was open: its ingress is gone.
CUT_GRACE_S = 10.0
# A final report waits this long for the request's settlements to land first.
SETTLE_GRACE_S = 3.0
# After this, a request with no winning settlement has nothing to re-bill.
GIVE_UP_S = 120.0
# Reconciled rows are kept this long (late reports of theirs are ignored), then pruned.
KEEP_S = 3600.0

UPSERT = """
INSERT INTO request_deliveries AS r (
    request_id, api_key_id, delivered_tokens, final, complete, failed, stream, reconciled_at
)
SELECT d.*, CASE WHEN d.complete THEN now() END
FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[], $5::bool[], $6::bool[], $7::bool[])
    AS d (request_id, api_key_id, delivered_tokens, final, complete, failed, stream)
ON CONFLICT (request_id) DO UPDATE SET
    delivered_tokens = CASE WHEN r.final THEN r.delivered_tokens
        WHEN excluded.final THEN excluded.delivered_tokens
        ELSE greatest(r.delivered_tokens, excluded.delivered_tokens) END,
    complete = CASE WHEN r.final THEN r.complete ELSE excluded.complete END,
    failed = r.failed OR excluded.failed,
    final = r.final OR excluded.final,
    updated_at = now(),
    reconciled_at = CASE WHEN NOT r.final AND excluded.complete THEN now() END
WHERE r.reconciled_at IS NULL
"""

DUE = f"""
SELECT request_id, delivered_tokens, final, complete, failed, stream,
       extract(epoch FROM now() - first_seen_at) AS age_s
FROM request_deliveries
WHERE reconciled_at IS NULL AND (
    (final AND updated_at < now() - interval '{SETTLE_GRACE_S} s')
    OR (NOT final AND updated_at < now() - interval '{CUT_GRACE_S} s'))
ORDER BY updated_at
LIMIT 1000
"""

# The winners' tokens and their postings' legs (charges and pay) for some requests.
WINNERS = """
SELECT s.request_id, s.attempt_id, s.input_tokens, s.output_tokens, e.account, e.amount, e.kind
FROM task_settlements s
LEFT JOIN ledger_entries e ON e.txn_id = 'attempt:' || s.attempt_id
WHERE s.request_id = ANY($1::text[]) AND s.outcome = 'won'
ORDER BY s.request_id, s.attempt_id, e.leg
"""

# Anything not yet re-billed, due or not (the partial index answers it).
ANY_OPEN = "SELECT EXISTS (SELECT 1 FROM request_deliveries WHERE reconciled_at IS NULL)"
MARK = "UPDATE request_deliveries SET reconciled_at = now() WHERE request_id = $1"
PRUNE = f"""
DELETE FROM request_deliveries
WHERE reconciled_at < now() - interval '{KEEP_S} s'
"""


def delivery_txn_id(request_id: str) -> str:
    return f"delivery:{request_id}"


@dataclass(frozen=True, slots=True)
class Delivered:
    """What the client of one incomplete request received."""

    request_id: str
    tokens: int
    stream: bool
    failed: bool


@dataclass(frozen=True, slots=True)
class WinnerLeg:
    attempt_id: str
    input_tokens: int
    output_tokens: int
    account: str
    amount: int
    kind: str


def adjustment(delivered: Delivered, legs: Sequence[WinnerLeg]) -> Posting:
    """The posting that re-bills an incomplete request (pure; see the module's rules)."""
    attempts = {leg.attempt_id: leg for leg in legs}
    prompt = sum(leg.input_tokens for leg in attempts.values())
    produced = sum(leg.output_tokens for leg in attempts.values())
    # A non-streaming answer either reached the client whole or not at all.
    got = min(delivered.tokens, produced) if delivered.stream else 0
    keep = (prompt + got, prompt + produced) if got else (0, 1)
    host_keep = (got, produced) if produced else (0, 1)
    out: list[Leg] = []
    refund = 0
    clawback: dict[str, int] = {}
    for leg in legs:
        if leg.kind == "charge" and leg.amount < 0:
            refund += -leg.amount - (-leg.amount * keep[0]) // keep[1]
        elif delivered.failed and leg.kind in ("payout", "fallback") and leg.amount > 0:
            taken = leg.amount - (leg.amount * host_keep[0]) // host_keep[1]
            clawback[leg.account] = clawback.get(leg.account, 0) + taken
    users = {leg.account for leg in legs if leg.kind == "charge" and leg.amount < 0}
    if refund and len(users) == 1:
        out += [Leg(PLATFORM, -refund, "refund"), Leg(users.pop(), refund, "refund")]
    for account, taken in sorted(clawback.items()):
        if taken:
            out += [Leg(account, -taken, "clawback"), Leg(PLATFORM, taken, "clawback")]
    # Its ref is a winning attempt, so spend per key finds the request's model.
    ref = min(attempts) if attempts else delivered.request_id
    return Posting(delivery_txn_id(delivered.request_id), ref, tuple(out))


class ReportRow(NamedTuple):
    request_id: str
    api_key_id: str
    delivered_tokens: int
    final: bool
    complete: bool
    failed: bool
    stream: bool


def merged(reports: Sequence[DeliveryReport]) -> list[ReportRow]:
    """One row per request (a statement's ON CONFLICT cannot touch a row twice), merged as
    `UPSERT` merges a report into its row: the reports of one request may arrive in any
    order (each is sent on its own), and a final one is never undone by an earlier one."""
    rows: dict[str, ReportRow] = {}
    for r in reports:
        row = ReportRow(
            r.request_id, r.api_key_id, r.delivered_tokens, r.final, r.complete, r.failed, r.stream
        )
        last = rows.get(r.request_id)
        if last is not None:
            failed = last.failed or row.failed
            if last.final:
                row = last._replace(failed=failed)
            elif row.final:
                row = row._replace(failed=failed)
            else:
                tokens = max(last.delivered_tokens, row.delivered_tokens)
                row = row._replace(delivered_tokens=tokens, failed=failed)
        rows[r.request_id] = row
    return list(rows.values())


async def record_reports(pool: asyncpg.Pool, reports: Sequence[DeliveryReport]) -> None:
    rows = merged(reports)
    columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[]] * 7
    await pool.execute(UPSERT, *columns)


async def due(pool: asyncpg.Pool) -> list[tuple[Delivered, bool, float]]:
    """Incomplete requests ready to re-bill: (what was delivered, final, age in s)."""
    rows = await pool.fetch(DUE)
    return [
        (
            Delivered(r["request_id"], r["delivered_tokens"], r["stream"], r["failed"]),
            r["final"],
            float(r["age_s"]),
        )
        for r in rows
    ]


async def winner_legs(pool: asyncpg.Pool, request_ids: list[str]) -> dict[str, list[WinnerLeg]]:
    """The legs of each request's winning attempts (one query for a whole round, however
    many requests still wait for their settlements); an attempt that moved no money (nothing
    to charge) has one leg of amount 0; a request with no winner (yet) is absent."""
    legs: dict[str, list[WinnerLeg]] = {}
    for r in await pool.fetch(WINNERS, request_ids):
        legs.setdefault(r[0], []).append(
            WinnerLeg(r[1], r[2], r[3], r[4] or "", r[5] or 0, r[6] or "")
        )
    return legs


async def any_open(pool: asyncpg.Pool) -> bool:
    """Some request is still waiting to be re-billed."""
    return bool(await pool.fetchval(ANY_OPEN))


async def mark_reconciled(pool: asyncpg.Pool, request_id: str) -> None:
    await pool.execute(MARK, request_id)


async def prune(pool: asyncpg.Pool) -> None:
    await pool.execute(PRUNE)
