"""Accounting: settles each task attempt exactly once into Postgres."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from faststream import AckPolicy
from faststream.nats import NatsRouter
from faststream.nats.annotations import NatsMessage
from llooma import subjects
from llooma.runtime import SETTLEMENTS
from llooma.v1.settlement_pb2 import AttemptOutcome, TaskSettlement

OUTCOME_NAMES = {
    AttemptOutcome.ATTEMPT_OUTCOME_WON: "won",
    AttemptOutcome.ATTEMPT_OUTCOME_LOST: "lost",
    AttemptOutcome.ATTEMPT_OUTCOME_FAILED: "failed",
}

INSERT_SETTLEMENT = """
INSERT INTO task_settlements (
    attempt_id, request_id, task_id, host_id, model, outcome, input_tokens, output_tokens,
    first_token_ms, duration_ms, api_key_id, finished_at
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (attempt_id) DO NOTHING
"""


class Ledger:
    """Holds the connection pool; settlement is idempotent by attempt_id."""

    pool: asyncpg.Pool

    async def settle(self, settlement: TaskSettlement) -> bool:
        """Write the attempt once; False if it was already settled (a redelivery)."""
        finished = datetime.fromtimestamp(settlement.finished_unix_nanos / 1e9, tz=UTC)
        status = await self.pool.execute(
            INSERT_SETTLEMENT,
            settlement.attempt_id,
            settlement.request_id,
            settlement.task_id,
            settlement.host_id,
            settlement.model,
            OUTCOME_NAMES.get(settlement.outcome, "failed"),
            settlement.usage.input_tokens,
            settlement.usage.output_tokens,
            settlement.first_token_ms,
            settlement.duration_ms,
            settlement.api_key_id,
            finished,
        )
        return str(status).endswith(" 1")


def build_router(ledger: Ledger) -> NatsRouter:
    router = NatsRouter()

    # Acked only after the row is committed; an error (Postgres down) or a crash means a
    # redelivery, which the primary key turns into a no-op if the row did land.
    @router.subscriber(
        subjects.SETTLEMENT_TASK,
        queue=subjects.CONSUMER_ACCOUNTING,
        stream=SETTLEMENTS,
        max_workers=16,
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def settle(message: NatsMessage) -> None:
        await ledger.settle(TaskSettlement.FromString(message.body))

    return router
