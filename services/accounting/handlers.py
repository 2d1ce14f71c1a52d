"""Accounting: settles each task attempt exactly once into Postgres."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import asyncpg
from faststream import AckPolicy, Context
from faststream.nats import NatsRouter, PullSub
from faststream.nats.message import NatsBatchMessage

from llooma import subjects, tracing
from llooma.runtime import SETTLEMENTS
from llooma.v1.settlement_pb2 import AttemptOutcome, TaskSettlement

OUTCOME_NAMES = {
    AttemptOutcome.ATTEMPT_OUTCOME_WON: "won",
    AttemptOutcome.ATTEMPT_OUTCOME_LOST: "lost",
    AttemptOutcome.ATTEMPT_OUTCOME_FAILED: "failed",
}

INSERT_SETTLEMENTS = """
INSERT INTO task_settlements (
    attempt_id, request_id, task_id, host_id, model, outcome, input_tokens, output_tokens,
    first_token_ms, duration_ms, api_key_id, finished_at
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[],
    $8::int[], $9::int[], $10::int[], $11::text[], $12::timestamptz[]
)
ON CONFLICT (attempt_id) DO NOTHING
"""

# Settlements are not on the user's path: batching them amortises the per-message cost of
# FastStream and of a Postgres round trip (one INSERT per batch) at the price of <= 50 ms.
BATCH_SIZE = 256
BATCH_WAIT_S = 0.05


class Ledger:
    """Holds the connection pool; settlement is idempotent by attempt_id."""

    pool: asyncpg.Pool

    async def settle(self, settlements: list[TaskSettlement]) -> int:
        """Write each attempt once; returns how many were new (redeliveries change nothing)."""
        columns: list[list[object]] = [[] for _ in range(12)]
        for s in settlements:
            row = (
                s.attempt_id,
                s.request_id,
                s.task_id,
                s.host_id,
                s.model,
                OUTCOME_NAMES.get(s.outcome, "failed"),
                s.usage.input_tokens,
                s.usage.output_tokens,
                s.first_token_ms,
                s.duration_ms,
                s.api_key_id,
                datetime.fromtimestamp(s.finished_unix_nanos / 1e9, tz=UTC),
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        status = await self.pool.execute(INSERT_SETTLEMENTS, *columns)
        return int(str(status).rsplit(" ", 1)[-1])


def build_router(ledger: Ledger) -> NatsRouter:
    router = NatsRouter()

    # Acked only after the batch is committed; an error (Postgres down) or a crash means a
    # redelivery, which the primary key turns into a no-op for rows that did land.
    @router.subscriber(
        subjects.SETTLEMENT_TASK,
        durable=subjects.CONSUMER_ACCOUNTING,
        stream=SETTLEMENTS,
        pull_sub=PullSub(batch_size=BATCH_SIZE, timeout=BATCH_WAIT_S, batch=True),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def settle(batch: Annotated[NatsBatchMessage, Context("message")]) -> None:
        # One span per settlement, each in its task's trace, covering the batch's INSERT.
        with tracing.batch_spans(subjects.SETTLEMENT_TASK, batch.raw_message):
            await ledger.settle([TaskSettlement.FromString(m.data) for m in batch.raw_message])

    return router
