"""Accounting: prices and posts every task attempt and duel exactly once into the ledger,
then publishes the touched users' balances and the ledger summary to KV."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import metrics

from llooma import bus, counters, subjects, tracing
from llooma.ledger import deliveries
from llooma.ledger.anchors import Anchorer
from llooma.ledger.balances import publish_balances, publish_balances_complete
from llooma.ledger.intake import (
    Rejected,
    read_deliveries,
    read_delivery,
    read_duel,
    read_settlement,
)
from llooma.ledger.stakes import publish_stakes
from llooma.ledger.store import LedgerStore, Posted
from llooma.v1.duel_pb2 import DuelResult
from llooma.v1.settlement_pb2 import DeliveryReport, TaskSettlement

log = logging.getLogger(__name__)

# Settlements are not on the user's path: batching amortises the per-message cost and the
# ledger's per-transaction cost (one block per batch) at the price of <= 50 ms.
BATCH_SIZE = 256
BATCH_WAIT_S = 0.05
# Balances can also change outside a batch (`llooma ledger credit`): re-read them this often.
BALANCE_REFRESH_S = 2.0
# The summary's query scans every account: at most this often, however many batches land.
SUMMARY_EVERY_S = 1.0

# What one message can make Postgres (or the pricing) refuse, as opposed to Postgres being
# unreachable: only these set a message aside; anything else is retried by redelivery.
POISON_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    ValueError,
    OverflowError,
)

Event = TypeVar("Event", TaskSettlement, DuelResult, DeliveryReport)
# Incomplete requests are re-billed (what their clients got) this often while any is open.
RECONCILE_EVERY_S = 1.0
# With none open, a round waits for the next delivery report, or this long: stake unlocks are
# written by the CLI, which wakes no one, so one is released at most this late.
RECONCILE_IDLE_S = 10.0


class Accounting:
    """The ledger store plus what accounting publishes from it."""

    store: LedgerStore
    js: JetStreamContext
    anchors: Anchorer

    def __init__(self) -> None:
        # api_key_id -> (block height it was read at, balance published).
        self._published: dict[str, tuple[int, int]] = {}
        # host_id -> (block height it was read at, locked stake published); the same rule.
        self._published_stakes: dict[str, tuple[int, int]] = {}
        # A batch's balances and a refresh's are each a snapshot at some height: publishing
        # one under this lock, only where it is newer, never puts an older balance last.
        self._publishing = asyncio.Lock()
        self._summary_due = asyncio.Event()
        self._deliveries_recorded = asyncio.Event()
        # The chain height the last published summary was read at.
        self._summarized_blocks = -1
        self._tasks: list[asyncio.Task[None]] = []
        self.rejected = 0
        self._rejected_counter = metrics.get_meter("llooma.accounting").create_counter(
            "llooma.accounting.rejected",
            description="Settlement-stream messages set aside as impossible to post",
        )

    async def settle(self, settlements: list[TaskSettlement]) -> Posted:
        return await self.publish_posted(await self.store.settle(settlements))

    async def settle_duels(self, duels: list[DuelResult]) -> Posted:
        return await self.publish_posted(await self.store.settle_duels(duels))

    async def record_deliveries(self, reports: list[DeliveryReport]) -> Posted:
        await deliveries.record_reports(self.store.pool, reports)
        self._deliveries_recorded.set()
        return Posted()

    async def reconcile_deliveries(self) -> int:
        """Re-bill every incomplete request that is due; returns how many were settled."""
        pool = self.store.pool
        done = 0
        due = await deliveries.due(pool)
        if not due:
            return 0
        winners = await deliveries.winner_legs(pool, [d.request_id for d, _, _ in due])
        for delivered, _final, age_s in due:
            legs = winners.get(delivered.request_id, [])
            if not legs and age_s < deliveries.GIVE_UP_S:
                continue  # its settlements have not landed yet
            posting = deliveries.adjustment(delivered, legs)
            if posting.legs:
                await self.publish_posted(await self.store.deposit([posting]))
            await deliveries.mark_reconciled(pool, delivered.request_id)
            done += 1
        return done

    async def publish_posted(self, posted: Posted) -> Posted:
        if posted.block is None:
            return posted
        await self._anchor()
        await self._publish_balances(posted.block.height, posted.user_balances)
        if posted.stakes:
            await self._publish_stakes(posted.block.height, posted.stakes)
        self._summary_due.set()
        return posted

    async def release_unlocks(self) -> Posted:
        return await self.publish_posted(await self.store.release_unlocks())

    async def _anchor(self) -> None:
        """Anchor the new blocks outside the database; a failure is retried by the refresh."""
        try:
            await self.anchors.catch_up(self.store.pool)
        except Exception:
            log.warning("anchoring blocks failed; will retry", exc_info=True)

    async def _publish_balances(self, height: int, balances: dict[str, int]) -> None:
        await self._publish_newer(self._published, publish_balances, height, balances)

    async def _publish_stakes(self, height: int, stakes: dict[str, int]) -> None:
        await self._publish_newer(self._published_stakes, publish_stakes, height, stakes)

    async def _publish_newer(
        self,
        published: dict[str, tuple[int, int]],
        publish: Callable[[JetStreamContext, dict[str, int]], Awaitable[None]],
        height: int,
        values: dict[str, int],
    ) -> None:
        async with self._publishing:
            newer = {
                key: value
                for key, value in values.items()
                if published.get(key, (-1, 0))[0] < height
            }
            changed = {
                key: value
                for key, value in newer.items()
                if key not in published or published[key][1] != value
            }
            if changed:
                await publish(self.js, changed)
            for key, value in newer.items():
                published[key] = (height, value)

    async def publish_summary(self) -> None:
        kv = await self.js.key_value(subjects.LEDGER_BUCKET)
        summary = await self.store.summary()
        await kv.put(subjects.LEDGER_SUMMARY_KEY, summary.SerializeToString())
        self._summarized_blocks = summary.blocks

    async def refresh_balances(self) -> None:
        """Publish every user balance that differs from what was last published, and the
        summary if blocks were posted since it was read (by another process, e.g. `llooma
        ledger credit`, or while it was being read)."""
        height, balances = await self.store.user_balances()
        await self._publish_balances(height, balances)
        if height != self._summarized_blocks:
            self._summary_due.set()
        # Stakes change outside a batch too (`llooma ledger stake`).
        height, stakes = await self.store.stakes()
        await self._publish_stakes(height, stakes)

    async def publish_all_balances(self) -> None:
        """Every balance, then the mark that tells the ingress a key absent now has none."""
        await self.refresh_balances()
        await publish_balances_complete(self.js)

    async def take(
        self,
        messages: Sequence[Msg],
        read: Callable[[bytes], Sequence[Event]],
        post: Callable[[list[Event]], Awaitable[Posted]],
    ) -> None:
        """Post a batch and ack it; set aside (terminate) each message that cannot be posted,
        so it never blocks the others; nak the rest if Postgres is unreachable. `read` gives
        a message's events (one, or an ingress's batch of delivery reports)."""
        good: list[tuple[Msg, Sequence[Event]]] = []
        for message in messages:
            try:
                good.append((message, read(message.data)))
            except Rejected as why:
                await self._set_aside(message, str(why))
        if not good:
            return
        try:
            await post([event for _, events in good for event in events])
        except POISON_ERRORS:
            # One of them is refused: find it by posting them one message at a time.
            for index, (message, events) in enumerate(good):
                try:
                    await post(list(events))
                except POISON_ERRORS as error:
                    await self._set_aside(message, f"refused: {type(error).__name__}")
                except BaseException:
                    await asyncio.gather(*(m.nak() for m, _ in good[index:]))
                    raise
                else:
                    await message.ack()
            return
        except BaseException:
            await asyncio.gather(*(m.nak() for m, _ in good))
            raise
        await asyncio.gather(*(m.ack() for m, _ in good))

    async def _set_aside(self, message: Msg, reason: str) -> None:
        self.rejected += 1
        consumer = _CONSUMERS.get(message.subject, message.subject)
        counters.count(f"poison_terminated.{consumer}")
        self._rejected_counter.add(1, {"messaging.destination.name": message.subject})
        sequence = message.metadata.sequence.stream if message.reply else None
        log.warning("set aside %s message (stream seq %s): %s", message.subject, sequence, reason)
        await message.term()

    def start_background(self, consumers: Sequence[Coroutine[Any, Any, None]] = ()) -> None:
        async def refresh() -> None:
            refreshed_at_height = -1
            while True:
                await asyncio.sleep(BALANCE_REFRESH_S)
                try:
                    # Balances and stakes change only with a block: at rest, one read.
                    height = await self.store.height()
                    if height == refreshed_at_height and self.anchors.anchored >= height:
                        continue
                    await self._anchor()
                    await self.refresh_balances()
                    refreshed_at_height = height
                except Exception:
                    log.warning("balance refresh failed", exc_info=True)

        async def summarize() -> None:
            while True:
                await self._summary_due.wait()
                self._summary_due.clear()
                try:
                    await self.publish_summary()
                except Exception:
                    log.warning("summary publish failed", exc_info=True)
                    self._summary_due.set()
                await asyncio.sleep(SUMMARY_EVERY_S)

        async def reconcile() -> None:
            rounds = 0
            while True:
                await self._reconcile_due()
                try:
                    await self.release_unlocks()
                except Exception:
                    log.warning("releasing unlocked stakes failed", exc_info=True)
                try:
                    await self.reconcile_deliveries()
                    rounds += 1
                    if rounds % 600 == 0:
                        await deliveries.prune(self.store.pool)
                except Exception:
                    log.warning("delivery reconciliation failed", exc_info=True)

        self._tasks = [
            asyncio.create_task(refresh(), name="balance-refresh"),
            asyncio.create_task(summarize(), name="summary-publish"),
            asyncio.create_task(reconcile(), name="delivery-reconcile"),
            *(asyncio.create_task(consumer) for consumer in consumers),
        ]

    async def _reconcile_due(self) -> None:
        """Wait for the next round: a second while some request waits to be re-billed (or
        the database cannot say), else until a delivery report lands or RECONCILE_IDLE_S."""
        try:
            idle = not await deliveries.any_open(self.store.pool)
        except Exception:
            idle = False
        if not idle:
            await asyncio.sleep(RECONCILE_EVERY_S)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._deliveries_recorded.wait(), RECONCILE_IDLE_S)
        self._deliveries_recorded.clear()

    async def stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


def one(read: Callable[[bytes], Event]) -> Callable[[bytes], Sequence[Event]]:
    """A reader of one event a message, as `Accounting.take` reads them."""

    def read_one(data: bytes) -> Sequence[Event]:
        return (read(data),)

    return read_one


_CONSUMERS = {
    subjects.SETTLEMENT_TASK: subjects.CONSUMER_ACCOUNTING,
    subjects.SETTLEMENT_DUEL: subjects.CONSUMER_ACCOUNTING_DUELS,
    subjects.SETTLEMENT_DELIVERIES: subjects.CONSUMER_ACCOUNTING_DELIVERY_BATCHES,
    subjects.SETTLEMENT_DELIVERY: subjects.CONSUMER_ACCOUNTING_DELIVERIES,
}


def settlement_consumers(accounting: Accounting) -> list[Coroutine[Any, Any, None]]:
    """The batched pull consumers on the settlements stream, acked one by one once the
    batch is committed; Postgres down or a crash means a redelivery, which each event's key
    turns into a no-op for what did land."""

    async def settle(batch: list[Msg]) -> None:
        # One span per settlement, each in its task's trace, covering the batch's posting.
        with tracing.batch_spans(subjects.SETTLEMENT_TASK, batch):
            await accounting.take(batch, one(read_settlement), accounting.settle)

    async def settle_duels(batch: list[Msg]) -> None:
        with tracing.batch_spans(subjects.SETTLEMENT_DUEL, batch):
            await accounting.take(batch, one(read_duel), accounting.settle_duels)

    async def record_deliveries(batch: list[Msg]) -> None:
        await accounting.take(batch, read_deliveries, accounting.record_deliveries)

    async def record_single_deliveries(batch: list[Msg]) -> None:
        await accounting.take(batch, one(read_delivery), accounting.record_deliveries)

    return [
        bus.pull_batches(
            accounting.js,
            subject,
            durable,
            subjects.SETTLEMENT_STREAM,
            handle,
            batch_size=BATCH_SIZE,
            gather_s=BATCH_WAIT_S,
        )
        for subject, durable, handle in (
            (subjects.SETTLEMENT_TASK, subjects.CONSUMER_ACCOUNTING, settle),
            (subjects.SETTLEMENT_DUEL, subjects.CONSUMER_ACCOUNTING_DUELS, settle_duels),
            (
                subjects.SETTLEMENT_DELIVERIES,
                subjects.CONSUMER_ACCOUNTING_DELIVERY_BATCHES,
                record_deliveries,
            ),
            (
                subjects.SETTLEMENT_DELIVERY,
                subjects.CONSUMER_ACCOUNTING_DELIVERIES,
                record_single_deliveries,
            ),
        )
    ]
