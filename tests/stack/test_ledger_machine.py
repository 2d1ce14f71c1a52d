"""A hypothesis state machine over the ledger on a real Postgres: hosts reserve a place in a
race, make progress, and the race is settled (a winner), voided (none) or replayed
(redelivered); after every step every invariant holds: each transaction sums to zero, no
attempt is paid twice, a loser's fees stay within eta of the winner's payout, every balance
is the sum of its entries and equals what the paper's rule says."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from llooma.ledger.blocks import Signer
from llooma.ledger.economics import FALLBACK, PLATFORM, Prices, host_account, user_account
from llooma.ledger.store import LedgerStore
from llooma.ledger.verify import verify_ledger
from llooma.v1.common_pb2 import Usage
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_FAILED,
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_WON,
    TaskSettlement,
)
from tests.support.ledger_db import fresh_database

USER, HOST, RESERVATION, PROGRESS, FALLBACK_PRICE = 5, 9, 30, 4, 13
ETA = Fraction(3, 20)
T = TypeVar("T")
PRICES = Prices(
    user=USER,
    host=HOST,
    reservation_fee=RESERVATION,
    progress_fee=PROGRESS,
    eta=ETA,
    fallback=FALLBACK_PRICE,
)


@dataclass
class Attempt:
    attempt_id: str
    host: str
    fallback: bool
    tokens: int = 0
    failed: bool = False


@dataclass
class Race:
    attempts: list[Attempt] = field(default_factory=list)
    settled: list[TaskSettlement] = field(default_factory=list)


class LedgerMachine(RuleBasedStateMachine):
    dsn = ""
    signer: Signer

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool: asyncpg.Pool = self.run(
            asyncpg.create_pool(self.dsn, min_size=1, max_size=2, loop=self.loop)
        )
        self.store = LedgerStore(self.pool, self.signer, PRICES)
        # Accounts of this run only: runs share the database.
        self.run_id = uuid.uuid4().hex[:8]
        self.key_id = f"key-{self.run_id}"
        self.open: list[Race] = []
        self.closed: list[Race] = []
        self.expected: dict[str, int] = {}
        self.caps: list[tuple[str, int]] = []

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        self.run(self.pool.close())
        self.loop.close()

    def host(self, index: int) -> str:
        return f"h{index}-{self.run_id}"

    def book(self, account: str, amount: int) -> None:
        self.expected[account] = self.expected.get(account, 0) + amount

    @initialize()
    def first_race(self) -> None:
        self.open.append(Race())

    # Mostly into the open race, so races have rivals whose fees meet the cap.
    @rule(host=st.integers(0, 3), fallback=st.booleans(), new_race=st.integers(0, 3))
    def reserve(self, host: int, fallback: bool, new_race: int) -> None:
        if new_race == 0 or not self.open:
            self.open.append(Race())
        self.open[-1].attempts.append(Attempt(uuid.uuid4().hex, self.host(host), fallback))

    @precondition(lambda self: any(race.attempts for race in self.open))
    @rule(data=st.data(), tokens=st.integers(1, 400), fail=st.booleans())
    def progress(self, data: st.DataObject, tokens: int, fail: bool) -> None:
        races = [race for race in self.open if race.attempts]
        race = data.draw(st.sampled_from(races))
        attempt = data.draw(st.sampled_from(race.attempts))
        attempt.tokens += tokens
        attempt.failed = attempt.failed or fail

    def _settle(self, race: Race, winner: Attempt | None, input_tokens: int) -> None:
        won_payout = 0
        if winner is not None:
            won_payout = (FALLBACK_PRICE if winner.fallback else HOST) * winner.tokens
        settlements = []
        for attempt in race.attempts:
            payee = FALLBACK if attempt.fallback else host_account(attempt.host)
            s = TaskSettlement(
                attempt_id=attempt.attempt_id,
                request_id=f"req-{self.run_id}",
                host_id=attempt.host,
                model="m",
                api_key_id=self.key_id,
                fallback=attempt.fallback,
                usage=Usage(output_tokens=attempt.tokens),
                finished_unix_nanos=1,
                accepted=True,
            )
            if winner is not None:
                s.winner_model = "m"
                s.winner_output_tokens = winner.tokens
                s.winner_fallback = winner.fallback
            if attempt is winner:
                s.outcome = ATTEMPT_OUTCOME_WON
                s.usage.input_tokens = input_tokens
                charge = USER * (input_tokens + attempt.tokens)
                self.book(payee, won_payout)
                self.book(user_account(self.key_id), -charge)
                self.book(PLATFORM, charge - won_payout)
            else:
                s.outcome = ATTEMPT_OUTCOME_FAILED if attempt.failed else ATTEMPT_OUTCOME_LOST
                # No reservation without a token (an accept alone earns nothing).
                reservation = 0 if attempt.failed or not attempt.tokens else RESERVATION
                cap = int(ETA * won_payout)
                fee = min(reservation + PROGRESS * attempt.tokens, cap)
                self.book(payee, fee)
                self.book(PLATFORM, -fee)
                self.caps.append((attempt.attempt_id, cap))
            settlements.append(s)
        self.run(self.store.settle(settlements))
        race.settled = settlements
        self.open.remove(race)
        self.closed.append(race)

    @precondition(lambda self: any(race.attempts for race in self.open))
    @rule(data=st.data(), input_tokens=st.integers(0, 50))
    def settle(self, data: st.DataObject, input_tokens: int) -> None:
        race = data.draw(st.sampled_from([race for race in self.open if race.attempts]))
        winner = data.draw(st.sampled_from(race.attempts))
        self._settle(race, winner, input_tokens)

    @precondition(lambda self: any(race.attempts for race in self.open))
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        race = data.draw(st.sampled_from([race for race in self.open if race.attempts]))
        self._settle(race, None, 0)

    @precondition(lambda self: bool(self.closed))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        race = data.draw(st.sampled_from(self.closed))
        again = data.draw(st.lists(st.sampled_from(race.settled), min_size=1, max_size=5))
        posted = self.run(self.store.settle(again))
        assert posted.new == 0

    def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        return self.run(self.pool.fetch(query, *args))

    @invariant()
    def every_transaction_sums_to_zero(self) -> None:
        assert not self.fetch(
            "SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING sum(amount) <> 0"
        )

    @invariant()
    def no_attempt_is_paid_twice(self) -> None:
        assert not self.fetch(
            "SELECT txn_id FROM ledger_entries GROUP BY txn_id, leg HAVING count(*) > 1"
        )
        settled = [s.attempt_id for race in self.closed for s in race.settled]
        rows = self.fetch(
            "SELECT attempt_id, count(*) AS n FROM task_settlements "
            "WHERE attempt_id = ANY($1::text[]) GROUP BY attempt_id",
            settled,
        )
        assert len(rows) == len(settled)
        assert all(r["n"] == 1 for r in rows)

    @invariant()
    def losers_stay_within_eta_of_the_winner(self) -> None:
        if not self.caps:
            return
        caps = dict(self.caps)
        paid = self.fetch(
            "SELECT ref, amount FROM ledger_entries WHERE txn_id = ANY($1::text[]) AND amount > 0",
            [f"attempt:{a}" for a in caps],
        )
        for row in paid:
            assert row["amount"] <= caps[row["ref"]]

    @invariant()
    def balances_are_sums_of_entries_and_follow_the_rule(self) -> None:
        mine = [a for a in self.expected if a not in (PLATFORM, FALLBACK)]
        rows = self.fetch(
            "SELECT b.account, b.balance, (SELECT sum(amount) FROM ledger_entries e "
            "WHERE e.account = b.account) AS total FROM account_balances b "
            "WHERE b.account = ANY($1::text[])",
            mine,
        )
        stored = {r["account"]: r["balance"] for r in rows}
        for row in rows:
            assert row["balance"] == row["total"]
        for account in mine:
            assert stored.get(account, 0) == self.expected[account], account


@pytest.fixture(scope="module")
def machine_dsn(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    database = fresh_database(database_url)
    dsn = loop.run_until_complete(database.__aenter__())
    LedgerMachine.signer = Signer.load_or_create(tmp_path_factory.mktemp("key") / "ledger.key")
    yield dsn
    loop.run_until_complete(database.__aexit__(None, None, None))
    loop.close()


def test_ledger_state_machine_keeps_every_invariant(machine_dsn: str) -> None:
    LedgerMachine.dsn = machine_dsn
    run_state_machine_as_test(  # type: ignore[no-untyped-call]
        LedgerMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

    loop = asyncio.new_event_loop()

    async def verify() -> bool:
        conn = await asyncpg.connect(machine_dsn, loop=loop)
        try:
            return (await verify_ledger(conn, {LedgerMachine.signer.public_key})).ok
        finally:
            await conn.close()

    try:
        assert loop.run_until_complete(verify())
    finally:
        loop.close()
