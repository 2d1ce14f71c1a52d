"""Accounting: prices and posts every task attempt and duel exactly once into the ledger,
then publishes the touched users' balances and the ledger summary to KV."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from faststream import AckPolicy, Context
from faststream.nats import NatsRouter, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.js import JetStreamContext

from llooma import subjects, tracing
from llooma.ledger.balances import publish_balances
from llooma.ledger.store import LedgerStore, Posted
from llooma.runtime import SETTLEMENTS
from llooma.v1.duel_pb2 import DuelResult
from llooma.v1.settlement_pb2 import TaskSettlement

log = logging.getLogger(__name__)

# Settlements are not on the user's path: batching amortises FastStream's per-message cost
# and the ledger's per-transaction cost (one block per batch) at the price of <= 50 ms.
BATCH_SIZE = 256
BATCH_WAIT_S = 0.05
# Balances can also change outside a batch (`llooma ledger credit`): re-read them this often.
BALANCE_REFRESH_S = 2.0


class Accounting:
    """The ledger store plus what accounting publishes from it."""

    store: LedgerStore
    js: JetStreamContext

    def __init__(self) -> None:
        self._published: dict[str, int] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def settle(self, settlements: list[TaskSettlement]) -> Posted:
        return await self._publish(await self.store.settle(settlements))

    async def settle_duels(self, duels: list[DuelResult]) -> Posted:
        return await self._publish(await self.store.settle_duels(duels))

    async def _publish(self, posted: Posted) -> Posted:
        if posted.block is None:
            return posted
        await publish_balances(self.js, posted.user_balances)
        self._published.update(posted.user_balances)
        await self.publish_summary()
        return posted

    async def publish_summary(self) -> None:
        kv = await self.js.key_value(subjects.LEDGER_BUCKET)
        summary = await self.store.summary()
        await kv.put(subjects.LEDGER_SUMMARY_KEY, summary.SerializeToString())

    async def refresh_balances(self) -> None:
        """Publish every user balance that differs from what was last published."""
        balances = await self.store.user_balances()
        changed = {k: v for k, v in balances.items() if self._published.get(k) != v}
        if changed:
            await publish_balances(self.js, changed)
            self._published.update(changed)

    def start_refresher(self) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(BALANCE_REFRESH_S)
                try:
                    await self.refresh_balances()
                except Exception:
                    log.warning("balance refresh failed", exc_info=True)

        self._refresher = asyncio.create_task(loop(), name="balance-refresh")

    async def stop_refresher(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher


def build_router(accounting: Accounting) -> NatsRouter:
    router = NatsRouter()

    # Acked only after the batch is committed; an error (Postgres down) or a crash means a
    # redelivery, which the settlement's key turns into a no-op for attempts that did land.
    @router.subscriber(
        subjects.SETTLEMENT_TASK,
        durable=subjects.CONSUMER_ACCOUNTING,
        stream=SETTLEMENTS,
        pull_sub=PullSub(batch_size=BATCH_SIZE, timeout=BATCH_WAIT_S, batch=True),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def settle(batch: Annotated[NatsBatchMessage, Context("message")]) -> None:
        # One span per settlement, each in its task's trace, covering the batch's posting.
        with tracing.batch_spans(subjects.SETTLEMENT_TASK, batch.raw_message):
            await accounting.settle([TaskSettlement.FromString(m.data) for m in batch.raw_message])

    @router.subscriber(
        subjects.SETTLEMENT_DUEL,
        durable=subjects.CONSUMER_ACCOUNTING_DUELS,
        stream=SETTLEMENTS,
        pull_sub=PullSub(batch_size=BATCH_SIZE, timeout=BATCH_WAIT_S, batch=True),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def settle_duels(batch: Annotated[NatsBatchMessage, Context("message")]) -> None:
        with tracing.batch_spans(subjects.SETTLEMENT_DUEL, batch.raw_message):
            await accounting.settle_duels(
                [DuelResult.FromString(m.data) for m in batch.raw_message]
            )

    return router
