"""Posting to the Postgres ledger: each batch is one transaction that records the raw events
once (their ids are keys), prices the new ones, and seals their entries into one signed block.

Posters serialise on the chain's head row, so blocks link in order even with several
accounting replicas; a duplicate event finds its key taken and posts nothing.

Its size (~400 lines) is one transaction's SQL and its bookkeeping, kept together so a
reader sees every statement a batch runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from llooma.ledger.blocks import Block, Entry, Signer
from llooma.ledger.economics import (
    FALLBACK,
    STAKE_PREFIX,
    TREASURY,
    Posting,
    Prices,
    SlashRules,
    account_deltas,
    deposit,
    lock_stake,
    opening_txn_id,
    release_stake,
    settle_attempt,
    settle_duel,
    slash_duel,
    slash_no_shows,
    slash_usage_claims,
    stake_account,
    unanimous_loser,
    user_charges,
    voted_judges,
)
from llooma.v1.duel_pb2 import DUEL_VERDICT_A, DUEL_VERDICT_B, DuelResult
from llooma.v1.ledger_pb2 import HostLedgerLine, LedgerSummary
from llooma.v1.settlement_pb2 import AttemptOutcome, TaskSettlement

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

OUTCOME_NAMES = {
    AttemptOutcome.ATTEMPT_OUTCOME_WON: "won",
    AttemptOutcome.ATTEMPT_OUTCOME_LOST: "lost",
    AttemptOutcome.ATTEMPT_OUTCOME_FAILED: "failed",
}
DUEL_OUTCOME_NAMES = {DUEL_VERDICT_A: "a", DUEL_VERDICT_B: "b"}

LOCK_HEAD = "SELECT height, block_id FROM ledger_head FOR UPDATE"

INSERT_SETTLEMENTS = """
INSERT INTO task_settlements (
    attempt_id, request_id, task_id, host_id, model, outcome, input_tokens, output_tokens,
    first_token_ms, duration_ms, api_key_id, finished_at, fallback
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[],
    $8::int8[], $9::int8[], $10::int8[], $11::text[], $12::timestamptz[], $13::bool[]
)
ON CONFLICT (attempt_id) DO NOTHING
RETURNING attempt_id
"""

INSERT_DUELS = """
INSERT INTO duel_settlements (duel_id, request_id, model, host_a, host_b, outcome, judges)
SELECT d.duel_id, d.request_id, d.model, d.host_a, d.host_b, d.outcome,
       ARRAY(SELECT json_array_elements_text(d.judges::json))
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
    AS d (duel_id, request_id, model, host_a, host_b, outcome, judges)
ON CONFLICT (duel_id) DO NOTHING
RETURNING duel_id
"""

POSTED_TXNS = "SELECT txn_id FROM ledger_entries WHERE leg = 0 AND txn_id = ANY($1::text[])"

SUMMARY = """
SELECT t.completed_responses, t.user_charges_micros, h.height, h.block_id,
    (SELECT coalesce(sum(balance), 0)::int8 FROM account_balances WHERE account LIKE 'host:%')
        AS host_payouts,
    (SELECT coalesce(sum(balance), 0)::int8 FROM account_balances WHERE account = $1)
        AS fallback_cost,
    (SELECT coalesce(json_agg(line ORDER BY line.host_id), '[]')
     FROM (
        SELECT coalesce(t.host_id, substr(b.account, 6)) AS host_id,
               coalesce(b.balance, 0) AS payouts,
               coalesce(t.race_wins, 0) AS race_wins,
               coalesce(t.race_losses, 0) AS race_losses,
               coalesce(t.duels, 0) AS duels,
               coalesce(t.duel_wins, 0) AS duel_wins,
               coalesce(t.duel_ties, 0) AS duel_ties
        FROM host_tallies t
        FULL JOIN account_balances b ON b.account = 'host:' || t.host_id
        WHERE b.account IS NULL OR b.account LIKE 'host:%'
     ) AS line) AS hosts
FROM ledger_totals t, ledger_head h
"""


# One statement, so one snapshot: the balances as of exactly that height.
USER_BALANCES = """
SELECT h.height, b.account, b.balance
FROM ledger_head h LEFT JOIN account_balances b ON b.account LIKE 'user:%'
"""


# Each host's no-show streak and locked stake, read under the head lock before slashing.
SLASH_STATE = """
SELECT h.host_id, coalesce(t.no_show_streak, 0) AS streak, coalesce(b.balance, 0) AS locked
FROM unnest($1::text[]) AS h (host_id)
LEFT JOIN host_tallies t USING (host_id)
LEFT JOIN account_balances b ON b.account = 'stake:' || h.host_id
"""

LOCKED = "SELECT account, balance FROM account_balances WHERE account = ANY($1::text[])"

STAKES = """
SELECT h.height, b.account, b.balance
FROM ledger_head h LEFT JOIN account_balances b ON b.account LIKE 'stake:%'
"""

# What is locked and not already asked back: the most a new unlock may ask.
UNLOCKABLE = """
SELECT coalesce((SELECT balance FROM account_balances WHERE account = $2), 0)
     - coalesce((SELECT sum(amount) FROM stake_unlocks WHERE host_id = $1 AND released_at IS NULL),
                0)
"""

DUE_UNLOCKS = """
SELECT txn_id, host_id, amount FROM stake_unlocks
WHERE released_at IS NULL AND release_after <= now()
ORDER BY release_after, txn_id
"""
ANY_DUE_UNLOCK = """
SELECT EXISTS (SELECT 1 FROM stake_unlocks WHERE released_at IS NULL AND release_after <= now())
"""


class NotEnoughCredits(ValueError):
    """A stake or an unlock asked for more than its account holds."""


Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


async def _lock_head(conn: Connection) -> tuple[int, str]:
    row = await conn.fetchrow(LOCK_HEAD)
    assert row is not None, "migration 0002 inserts the head row"
    return row["height"], row["block_id"]


class _Statement:
    """One statement of data-modifying CTEs, so a batch's writes cost one round trip."""

    def __init__(self) -> None:
        self.ctes: list[str] = []
        self.args: list[object] = []

    def arg(self, value: object, cast: str) -> str:
        self.args.append(value)
        return f"${len(self.args)}::{cast}"

    def sql(self, final: str) -> str:
        return f"WITH {', '.join(self.ctes)} {final}" if self.ctes else final


@dataclass
class Posted:
    """What a batch changed: how many events were new, the block sealed (if any), and the
    new balances of the users it touched (api_key_id -> micro-credits)."""

    new: int = 0
    block: Block | None = None
    user_balances: dict[str, int] = field(default_factory=dict)
    # The new locked stake of each host whose stake the batch changed (host_id -> micros).
    stakes: dict[str, int] = field(default_factory=dict)


def quality(duels: int, wins: int, ties: int) -> float:
    """Duel quality in [0, 1]: wins count 1, ties 0.5, with one tie as prior (0.5 at first)."""
    return (wins + 0.5 * ties + 0.5) / (duels + 1)


class LedgerStore:
    def __init__(
        self, pool: asyncpg.Pool, signer: Signer, prices: Prices, slashing: SlashRules | None = None
    ) -> None:
        self.pool = pool
        self.signer = signer
        self.prices = prices
        self.slashing = slashing or SlashRules()

    async def settle(self, settlements: Sequence[TaskSettlement]) -> Posted:
        """Post each attempt once; a redelivered or replayed settlement posts nothing."""
        columns: list[list[object]] = [[] for _ in range(13)]
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
                s.fallback,
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        async with self.pool.acquire() as conn, conn.transaction():
            head = await _lock_head(conn)
            new_ids = {r["attempt_id"] for r in await conn.fetch(INSERT_SETTLEMENTS, *columns)}
            fresh: dict[str, TaskSettlement] = {}
            for s in settlements:
                if s.attempt_id in new_ids:
                    fresh.setdefault(s.attempt_id, s)
            if not fresh:
                return Posted()
            statement = _Statement()
            postings = [settle_attempt(self.prices, s) for s in fresh.values()]
            hosts = sorted({s.host_id for s in fresh.values()})
            state = await conn.fetch(SLASH_STATE, hosts)
            locked = {r["host_id"]: r["locked"] for r in state}
            slashes = slash_no_shows(
                self.slashing,
                fresh.values(),
                {r["host_id"]: r["streak"] for r in state},
                locked,
            )
            # After the no-show slashes, on what they left (`locked` follows each slash).
            usage_slashes = slash_usage_claims(self.slashing, fresh.values(), locked)
            self._tally_races(
                statement,
                list(fresh.values()),
                user_charges(postings),
                slashes.streaks,
                slashes.no_shows,
            )
            posted = await self._seal(
                conn, head, statement, postings + slashes.postings + usage_slashes
            )
            posted.new = len(fresh)
            return posted

    @staticmethod
    def _tally_races(
        statement: _Statement,
        fresh: list[TaskSettlement],
        charges: int,
        streaks: dict[str, int],
        no_shows: dict[str, int],
    ) -> None:
        """Race wins, losses and no-shows per host (and the no-show streak each batch leaves),
        completed responses, and the user charges the batch's postings carry (summed off their
        legs, not priced again)."""
        wins: dict[str, int] = {}
        losses: dict[str, int] = {}
        completed: set[str] = set()
        for s in fresh:
            if s.outcome == AttemptOutcome.ATTEMPT_OUTCOME_WON:
                wins[s.host_id] = wins.get(s.host_id, 0) + 1
                completed.add(s.request_id)
            else:
                losses[s.host_id] = losses.get(s.host_id, 0) + 1
        hosts = sorted(wins.keys() | losses.keys())
        if hosts:
            statement.ctes.append(
                "tallies AS (INSERT INTO host_tallies AS h "
                "(host_id, race_wins, race_losses, no_shows, no_show_streak) "
                f"SELECT * FROM unnest({statement.arg(hosts, 'text[]')}, "
                f"{statement.arg([wins.get(h, 0) for h in hosts], 'int8[]')}, "
                f"{statement.arg([losses.get(h, 0) for h in hosts], 'int8[]')}, "
                f"{statement.arg([no_shows.get(h, 0) for h in hosts], 'int8[]')}, "
                f"{statement.arg([streaks.get(h, 0) for h in hosts], 'int8[]')}) "
                "ON CONFLICT (host_id) DO UPDATE SET race_wins = h.race_wins + excluded.race_wins,"
                " race_losses = h.race_losses + excluded.race_losses,"
                " no_shows = h.no_shows + excluded.no_shows,"
                " no_show_streak = excluded.no_show_streak)"
            )
        if completed:
            statement.ctes.append(
                "done AS (INSERT INTO completed_requests "
                f"SELECT unnest({statement.arg(sorted(completed), 'text[]')}) "
                "ON CONFLICT DO NOTHING RETURNING 1)"
            )
            statement.ctes.append(
                "totals AS (UPDATE ledger_totals SET "
                "completed_responses = completed_responses + (SELECT count(*) FROM done), "
                f"user_charges_micros = user_charges_micros + {statement.arg(charges, 'int8')})"
            )

    async def settle_duels(self, duels: Sequence[DuelResult]) -> Posted:
        """Post each duel once (reward, penalty, judges' fees) and count it per host."""
        rows = [
            (
                d.duel_id,
                d.request_id,
                d.model,
                d.host_a,
                d.host_b,
                DUEL_OUTCOME_NAMES.get(d.outcome, "tie"),
                json.dumps(voted_judges(d)),
            )
            for d in duels
        ]
        columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * 7
        async with self.pool.acquire() as conn, conn.transaction():
            head = await _lock_head(conn)
            new_ids = {r["duel_id"] for r in await conn.fetch(INSERT_DUELS, *columns)}
            fresh: dict[str, DuelResult] = {}
            for d in duels:
                if d.duel_id in new_ids:
                    fresh.setdefault(d.duel_id, d)
            if not fresh:
                return Posted()
            statement = _Statement()
            tally: dict[str, list[int]] = {}
            for d in fresh.values():
                for host, label in ((d.host_a, DUEL_VERDICT_A), (d.host_b, DUEL_VERDICT_B)):
                    counts = tally.setdefault(host, [0, 0, 0])
                    counts[0] += 1
                    counts[1] += d.outcome == label
                    counts[2] += d.outcome not in (DUEL_VERDICT_A, DUEL_VERDICT_B)
            hosts = sorted(tally)
            statement.ctes.append(
                "tallies AS (INSERT INTO host_tallies AS h (host_id, duels, duel_wins, duel_ties) "
                f"SELECT * FROM unnest({statement.arg(hosts, 'text[]')}, "
                f"{statement.arg([tally[h][0] for h in hosts], 'int8[]')}, "
                f"{statement.arg([tally[h][1] for h in hosts], 'int8[]')}, "
                f"{statement.arg([tally[h][2] for h in hosts], 'int8[]')}) "
                "ON CONFLICT (host_id) DO UPDATE SET duels = h.duels + excluded.duels, "
                "duel_wins = h.duel_wins + excluded.duel_wins, "
                "duel_ties = h.duel_ties + excluded.duel_ties)"
            )
            postings = [settle_duel(self.prices, d) for d in fresh.values()]
            losers = {loser for d in fresh.values() if (loser := unanimous_loser(d))}
            if losers:
                held = await conn.fetch(LOCKED, [stake_account(h) for h in losers])
                locked = {r["account"].removeprefix(STAKE_PREFIX): r["balance"] for r in held}
                for d in fresh.values():
                    slashed = slash_duel(self.slashing, d, locked)
                    if slashed is not None:
                        postings.append(slashed)
            posted = await self._seal(conn, head, statement, postings)
            posted.new = len(fresh)
            return posted

    async def deposit(self, postings: Sequence[Posting]) -> Posted:
        """Post deposits whose transaction ids are not taken yet (opening balances, top-ups)."""
        async with self.pool.acquire() as conn, conn.transaction():
            head = await _lock_head(conn)
            taken = {
                r["txn_id"] for r in await conn.fetch(POSTED_TXNS, [p.txn_id for p in postings])
            }
            fresh = [p for p in postings if p.txn_id not in taken and p.legs]
            if not fresh:
                return Posted()
            posted = await self._seal(conn, head, _Statement(), fresh)
            posted.new = len(fresh)
            return posted

    async def lock_stake(self, txn_id: str, host_id: str, amount: int, funding: str) -> Posted:
        """Lock `amount` from `funding` as the host's stake, once per txn_id. A host's own
        earnings (`host:<id>`) must cover it; the treasury issues it."""
        async with self.pool.acquire() as conn, conn.transaction():
            head = await _lock_head(conn)
            if await conn.fetchval(POSTED_TXNS, [txn_id]):
                return Posted()
            if funding != TREASURY:
                held = await conn.fetchval(
                    "SELECT balance FROM account_balances WHERE account = $1", funding
                )
                if (held or 0) < amount:
                    raise NotEnoughCredits(f"{funding} holds {held or 0}, not {amount}")
            posted = await self._seal(
                conn, head, _Statement(), [lock_stake(txn_id, host_id, amount, funding)]
            )
            posted.new = 1
            return posted

    async def request_unlock(self, txn_id: str, host_id: str, amount: int, delay_s: float) -> bool:
        """Ask for `amount` of the host's stake back after `delay_s`; False if this txn_id
        was asked before. Refuses more than is locked and not already asked back."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_head(conn)
            if await conn.fetchval("SELECT 1 FROM stake_unlocks WHERE txn_id = $1", txn_id):
                return False
            free = await conn.fetchval(UNLOCKABLE, host_id, stake_account(host_id))
            if free < amount:
                raise NotEnoughCredits(f"{host_id} has {free} unlockable, not {amount}")
            await conn.execute(
                "INSERT INTO stake_unlocks (txn_id, host_id, amount, release_after) "
                "VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
                txn_id,
                host_id,
                amount,
                delay_s,
            )
            return True

    async def release_unlocks(self) -> Posted:
        """Pay out every unlock whose delay is over, from what is left of the stake."""
        # Asked every second: a plain read first, so the head's row lock (a write) is taken
        # only when something is due.
        if not await self.pool.fetchval(ANY_DUE_UNLOCK):
            return Posted()
        async with self.pool.acquire() as conn, conn.transaction():
            head = await _lock_head(conn)
            due = await conn.fetch(DUE_UNLOCKS)
            if not due:
                return Posted()
            hosts = sorted({r["host_id"] for r in due})
            rows = await conn.fetch(LOCKED, [stake_account(h) for h in hosts])
            locked = {r["account"].removeprefix(STAKE_PREFIX): r["balance"] for r in rows}
            postings = []
            for r in due:
                posting = release_stake(
                    r["txn_id"], r["host_id"], r["amount"], locked.get(r["host_id"], 0)
                )
                if posting.legs:
                    locked[r["host_id"]] -= posting.legs[1].amount
                    postings.append(posting)
            await conn.execute(
                "UPDATE stake_unlocks SET released_at = now() WHERE txn_id = ANY($1::text[])",
                [r["txn_id"] for r in due],
            )
            posted = await self._seal(conn, head, _Statement(), postings)
            posted.new = len(due)
            return posted

    async def open_stakes(self, opening: dict[str, int]) -> Posted:
        """Lock each host's opening stake from the treasury, once ever (the demo hosts)."""
        return await self.deposit(
            [
                lock_stake(f"openstake:{host_id}", host_id, amount, TREASURY)
                for host_id, amount in opening.items()
                if amount > 0
            ]
        )

    async def stakes(self) -> tuple[int, dict[str, int]]:
        """Every host's locked stake and the chain height it is as of (one snapshot)."""
        rows = await self.pool.fetch(STAKES)
        return rows[0]["height"], {
            r["account"].removeprefix(STAKE_PREFIX): r["balance"] for r in rows if r["account"]
        }

    async def open_accounts(self, opening: dict[str, int]) -> Posted:
        """Give each api_key_id its opening balance, once ever."""
        return await self.deposit(
            [deposit(opening_txn_id(key_id), key_id, amount) for key_id, amount in opening.items()]
        )

    async def _seal(
        self,
        conn: Connection,
        head: tuple[int, str],
        statement: _Statement,
        postings: list[Posting],
    ) -> Posted:
        """Seal the postings' entries into the next block, with the batch's other writes, in
        one statement; returns the touched users' balances after it."""
        deltas = account_deltas(postings)
        users = sorted(account for account in deltas if account.startswith("user:"))
        stakes = sorted(account for account in deltas if account.startswith(STAKE_PREFIX))
        block = None
        rows = [
            (posting.txn_id, leg_index, leg.account, leg.amount, leg.kind, posting.ref)
            for posting in postings
            for leg_index, leg in enumerate(posting.legs)
        ]
        if rows:
            height = head[0] + 1
            entries = [Entry(height, seq, *row) for seq, row in enumerate(rows)]
            block = self.signer.seal(height, head[1], time.time_ns(), entries)
            at = statement.arg(height, "int8")
            statement.ctes.append(
                "block AS (INSERT INTO ledger_blocks VALUES ("
                f"{at}, {statement.arg(block.block_id, 'text')}, "
                f"{statement.arg(block.parent_id, 'text')}, "
                f"{statement.arg(block.created_unix_nanos, 'int8')}, "
                f"{statement.arg(block.proposer, 'text')}, "
                f"{statement.arg(block.entry_count, 'int4')}, "
                f"{statement.arg(block.entries_root, 'text')}, "
                f"{statement.arg(block.signature, 'text')}))"
            )
            fields = list(zip(*rows, strict=True))
            statement.ctes.append(
                f"entries AS (INSERT INTO ledger_entries SELECT {at}, * FROM unnest("
                f"{statement.arg(list(range(len(rows))), 'int4[]')}, "
                f"{statement.arg(list(fields[0]), 'text[]')}, "
                f"{statement.arg(list(fields[1]), 'int2[]')}, "
                f"{statement.arg(list(fields[2]), 'text[]')}, "
                f"{statement.arg(list(fields[3]), 'int8[]')}, "
                f"{statement.arg(list(fields[4]), 'text[]')}, "
                f"{statement.arg(list(fields[5]), 'text[]')}))"
            )
            statement.ctes.append(
                f"head AS (UPDATE ledger_head SET height = {at}, "
                f"block_id = {statement.arg(block.block_id, 'text')})"
            )
        # Sub-statements see the snapshot from before this statement: with the head locked,
        # these are the balances just before this batch.
        before = await conn.fetch(
            statement.sql(
                "SELECT account, balance FROM account_balances "
                f"WHERE account = ANY({statement.arg(users + stakes, 'text[]')})"
            ),
            *statement.args,
        )
        balances = {r["account"]: r["balance"] for r in before}
        return Posted(
            block=block,
            user_balances={
                account.removeprefix("user:"): balances.get(account, 0) + deltas[account]
                for account in users
            },
            stakes={
                account.removeprefix(STAKE_PREFIX): balances.get(account, 0) + deltas[account]
                for account in stakes
            },
        )

    async def height(self) -> int:
        """The chain's height: every balance and stake changes with a new block."""
        height: int = await self.pool.fetchval("SELECT height FROM ledger_head")
        return height

    async def user_balances(self) -> tuple[int, dict[str, int]]:
        """Every user's balance and the chain height they are as of (one snapshot)."""
        rows = await self.pool.fetch(USER_BALANCES)
        return rows[0]["height"], {
            r["account"].removeprefix("user:"): r["balance"] for r in rows if r["account"]
        }

    async def user_balance(self, api_key_id: str) -> int:
        balance: int | None = await self.pool.fetchval(
            "SELECT balance FROM account_balances WHERE account = $1", f"user:{api_key_id}"
        )
        return balance or 0

    async def summary(self) -> LedgerSummary:
        return await read_summary(self.pool)


async def ledger_height(db: asyncpg.Pool | asyncpg.Connection) -> int:
    """How many blocks the chain has (0 before the first)."""
    height: int = await db.fetchval("SELECT height FROM ledger_head")
    return height


async def read_summary(db: asyncpg.Pool | asyncpg.Connection) -> LedgerSummary:
    """The report's figures: cost per successful response, payouts and wins per host."""
    row = await db.fetchrow(SUMMARY, FALLBACK)
    assert row is not None
    completed = row["completed_responses"]
    summary = LedgerSummary(
        completed_responses=completed,
        user_charges_micros=row["user_charges_micros"],
        host_payouts_micros=row["host_payouts"],
        fallback_cost_micros=row["fallback_cost"],
        blocks=row["height"],
        head_block_id=row["block_id"],
        updated_unix_nanos=time.time_ns(),
    )
    total = summary.user_charges_micros + summary.host_payouts_micros
    total += summary.fallback_cost_micros
    summary.cost_per_successful_response_micros = total / completed if completed else 0.0
    for line in json.loads(row["hosts"]):
        summary.hosts.append(
            HostLedgerLine(
                host_id=line["host_id"],
                payouts_micros=line["payouts"],
                race_wins=line["race_wins"],
                race_losses=line["race_losses"],
                quality=quality(line["duels"], line["duel_wins"], line["duel_ties"]),
                duels=line["duels"],
            )
        )
    return summary
