"""Accounting's intake and publishing on a real nats-server (its own) and a real Postgres: a
poison message is set aside without blocking the good ones, balances are never republished
older, the summary is rate-limited, and the ingress's balance book tells unknown from 0."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from llooma import bus, subjects
from llooma.embedded import EmbeddedNats
from llooma.ledger.balances import BalanceBook, publish_balances, publish_balances_complete
from llooma.ledger.blocks import Signer, public_key_path
from llooma.ledger.economics import Prices, deposit, opening_balances
from llooma.ledger.intake import Rejected, read_deliveries, read_duel, read_settlement
from llooma.ledger.store import LedgerStore
from llooma.settings import DEV_API_KEY, Settings, api_key_id
from llooma.v1.common_pb2 import Usage
from llooma.v1.duel_pb2 import DUEL_VERDICT_A, DuelResult, JudgeVote
from llooma.v1.ledger_pb2 import LedgerSummary
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_WON,
    DeliveryReport,
    DeliveryReports,
    TaskSettlement,
)
from services.accounting.handlers import Accounting, one
from services.accounting.main import open_signer
from tests.support.ledger_db import fresh_database

UINT32_MAX = 2**32 - 1
# A user price at which a uint32 token count overflows int8 once priced: a message that
# decodes and validates but that Postgres refuses.
PRICES = Prices(user=3_000_000_000, host=11)


def settlement(
    tokens: int = 5, *, host: str = "h1", key_id: str = "k-good", outcome: int = 1
) -> TaskSettlement:
    return TaskSettlement(
        attempt_id=uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
        task_id=uuid.uuid4().hex,
        host_id=host,
        model="m",
        outcome=outcome,  # type: ignore[arg-type]
        usage=Usage(input_tokens=1, output_tokens=tokens),
        api_key_id=key_id,
        finished_unix_nanos=1_700_000_000_000_000_000,
    )


# -- unit: what the intake refuses or clamps ------------------------------------------------


def test_intake_refuses_what_cannot_be_posted() -> None:
    with pytest.raises(Rejected, match="undecodable"):
        read_settlement(b"\x0a\xff")
    with pytest.raises(Rejected, match="host_id"):
        read_settlement(settlement(host="").SerializeToString())
    with pytest.raises(Rejected, match="NUL"):
        read_settlement(settlement(key_id="k\x00").SerializeToString())
    with pytest.raises(Rejected, match="duelist"):
        read_duel(DuelResult(duel_id="d", host_a="a").SerializeToString())
    nameless_judge = DuelResult(
        duel_id="d",
        host_a="a",
        host_b="b",
        outcome=DUEL_VERDICT_A,
        votes=[JudgeVote(judge_host_id="", verdict_in_order=DUEL_VERDICT_A)],
    )
    with pytest.raises(Rejected, match="judge"):
        read_duel(nameless_judge.SerializeToString())


def test_only_the_dev_key_opens_with_credit_by_default() -> None:
    other = "sk-someone-else"
    settings = Settings(api_keys=[DEV_API_KEY, other])
    opening = opening_balances(settings)
    assert opening[api_key_id(other)] == 0
    assert opening[api_key_id(DEV_API_KEY)] == settings.dev_key_opening_balance_micros > 0
    funded = Settings(api_keys=[other], opening_balances_micros={other: 7})
    assert opening_balances(funded) == {api_key_id(other): 7}


def test_racing_key_creators_all_sign_with_the_one_key_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "ledger.key"

    async def race() -> list[Signer]:
        return list(
            await asyncio.gather(
                *(asyncio.to_thread(Signer.load_or_create, path) for _ in range(16))
            )
        )

    signers = asyncio.run(race())
    on_disk = Signer.load(path).public_key
    assert {s.public_key for s in signers} == {on_disk}
    assert public_key_path(path).read_text().strip() == on_disk
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.key", "ledger.pub"]


# -- on a real nats-server and Postgres -------------------------------------------------------


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats.start(tmp_path_factory.mktemp("accounting-nats"), sync_always=False)
    yield server
    server.stop()


@pytest.fixture
async def js(own_nats: EmbeddedNats) -> AsyncIterator[JetStreamContext]:
    client: Client = await nats.connect(own_nats.url)
    stream = client.jetstream()
    await bus.ensure_topology(stream)
    yield stream
    await client.drain()


@pytest.fixture
async def accounting(
    database_url: str, js: JetStreamContext, tmp_path: Path
) -> AsyncIterator[Accounting]:
    async with fresh_database(database_url) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        running = Accounting()
        running.store = LedgerStore(pool, Signer.load_or_create(tmp_path / "l.key"), PRICES)
        running.js = js
        yield running
        await running.stop_background()
        await pool.close()


async def settled_ids(accounting: Accounting) -> set[str]:
    rows = await accounting.store.pool.fetch("SELECT attempt_id FROM task_settlements")
    return {r["attempt_id"] for r in rows}


async def test_a_poison_message_is_set_aside_and_the_good_ones_post(
    accounting: Accounting, js: JetStreamContext
) -> None:
    good = [settlement() for _ in range(3)]
    # Wider than int4 (what the columns were): must post now.
    wide = settlement(UINT32_MAX, key_id="", outcome=ATTEMPT_OUTCOME_LOST)
    # Valid on its own, but its charge overflows int8 in Postgres: refused by the database.
    overflowing = settlement(UINT32_MAX, key_id="k-poison", outcome=ATTEMPT_OUTCOME_WON)
    payloads = [
        good[0].SerializeToString(),
        b"\x0a\xff",
        settlement(host="").SerializeToString(),
        good[1].SerializeToString(),
        overflowing.SerializeToString(),
        wide.SerializeToString(),
        good[2].SerializeToString(),
    ]
    for payload in payloads:
        await js.publish(subjects.SETTLEMENT_TASK, payload)
    durable = f"poison-{uuid.uuid4().hex[:8]}"
    sub = await js.pull_subscribe(
        subjects.SETTLEMENT_TASK,
        durable=durable,
        config=ConsumerConfig(ack_wait=2.0, filter_subject=subjects.SETTLEMENT_TASK),
    )
    messages = await sub.fetch(len(payloads), timeout=5)
    assert len(messages) == len(payloads)

    await accounting.take(messages, one(read_settlement), accounting.settle)

    assert await settled_ids(accounting) == {s.attempt_id for s in [*good, wide]}
    assert accounting.rejected == 3
    info = await sub.consumer_info()
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    # Nothing comes back after the ack wait: each message was acked or terminated.
    await asyncio.sleep(2.5)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=0.5)
    balances = await js.key_value(subjects.BALANCES_BUCKET)
    expected = -PRICES.user_charge("m", 3 * (1 + 5))
    assert int((await balances.get("k-good")).value or b"") == expected


async def test_an_ingress_batch_of_delivery_reports_is_recorded_but_its_impossible_ones(
    accounting: Accounting, js: JetStreamContext
) -> None:
    run = uuid.uuid4().hex[:8]
    good = [
        DeliveryReport(request_id=f"{run}-a", api_key_id="k", stream=True),
        DeliveryReport(request_id=f"{run}-b", api_key_id="k", delivered_tokens=3, final=True),
        # A later report of the first request in the same batch: merged, not lost.
        DeliveryReport(request_id=f"{run}-a", api_key_id="k", delivered_tokens=2, stream=True),
    ]
    impossible = [DeliveryReport(api_key_id="k"), DeliveryReport(request_id="x\x00", final=True)]
    payloads = [
        DeliveryReports(reports=[good[0], impossible[0], good[1]]).SerializeToString(),
        b"\x0a\xff",
        DeliveryReports(reports=impossible).SerializeToString(),
        DeliveryReports(reports=[good[2]]).SerializeToString(),
    ]
    for payload in payloads:
        await js.publish(subjects.SETTLEMENT_DELIVERIES, payload)
    sub = await js.pull_subscribe(
        subjects.SETTLEMENT_DELIVERIES,
        durable=f"deliveries-{run}",
        config=ConsumerConfig(ack_wait=2.0, filter_subject=subjects.SETTLEMENT_DELIVERIES),
    )
    messages = await sub.fetch(len(payloads), timeout=5)
    assert len(messages) == len(payloads)

    await accounting.take(messages, read_deliveries, accounting.record_deliveries)

    rows = await accounting.store.pool.fetch(
        "SELECT request_id, delivered_tokens, final FROM request_deliveries "
        "WHERE request_id LIKE $1 ORDER BY request_id",
        f"{run}-%",
    )
    assert [tuple(row) for row in rows] == [(f"{run}-a", 2, False), (f"{run}-b", 3, True)]
    assert accounting.rejected == 2  # the undecodable message and the one of only impossibles
    info = await sub.consumer_info()
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_late_batch_never_republishes_an_older_balance(
    accounting: Accounting, js: JetStreamContext
) -> None:
    key = f"k-{uuid.uuid4().hex[:8]}"
    late = await accounting.store.settle([settlement(key_id=key)])
    assert late.block is not None
    await accounting.store.deposit([deposit(f"credit:{key}", key, 1_000_000)])
    await accounting.refresh_balances()
    newest = await accounting.store.user_balance(key)
    # The batch's publish, delayed past the refresh, carries the balance before the deposit.
    await accounting.publish_posted(late)
    balances = await js.key_value(subjects.BALANCES_BUCKET)
    assert late.user_balances[key] != newest
    assert int((await balances.get(key)).value or b"") == newest


async def test_the_summary_is_published_at_most_about_once_a_second(
    accounting: Accounting, js: JetStreamContext
) -> None:
    ledger = await js.key_value(subjects.LEDGER_BUCKET)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await ledger.get(subjects.LEDGER_SUMMARY_KEY)
    stream = await js.stream_info(f"KV_{subjects.LEDGER_BUCKET}")
    accounting.start_background()
    for _ in range(20):
        await accounting.settle([settlement()])
    await asyncio.sleep(1.5)
    entry = await ledger.get(subjects.LEDGER_SUMMARY_KEY)
    assert entry.revision is not None
    assert entry.value is not None
    # The first batch publishes at once, the other 19 together within the next second.
    assert 1 <= entry.revision - stream.state.last_seq <= 3
    # None is lost: the last publish covers the last batch.
    assert LedgerSummary.FromString(entry.value).blocks == 20


async def test_accounting_never_signs_with_a_new_key_over_an_existing_chain(
    accounting: Accounting, tmp_path: Path
) -> None:
    await accounting.store.settle([settlement()])
    missing = tmp_path / "elsewhere" / "ledger.key"
    with pytest.raises(SystemExit, match="signing key"):
        await open_signer(accounting.store.pool, missing)
    assert not missing.exists()


async def test_the_balance_book_tells_unknown_from_none_left(js: JetStreamContext) -> None:
    kv = await js.key_value(subjects.BALANCES_BUCKET)
    await kv.purge(subjects.BALANCES_COMPLETE_KEY)
    book = BalanceBook()
    await book.start(js)
    try:
        spent, funded, unknown = (uuid.uuid4().hex for _ in range(3))
        await publish_balances(js, {spent: 0, funded: 5})

        await _until(lambda: None not in (book.balance(spent), book.balance(funded)))
        assert book.refuses(spent)
        assert not book.refuses(funded)
        # Accounting has not said it published everything: unknown is not "none left".
        assert book.balance(unknown) is None
        assert not book.refuses(unknown)
        await publish_balances_complete(js)
        await _until(lambda: book.refuses(unknown))
        assert not book.refuses(funded)
    finally:
        await book.stop()


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the balance book never saw it")
