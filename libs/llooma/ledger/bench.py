"""How many settlements per second the ledger posts: `python -m llooma.ledger.bench`.

Races of two attempts (a winner and a capped loser) are posted in accounting's batch size
into a fresh embedded Postgres (or DATABASE_URL), each batch one signed block, as the
accounting consumer does; then the chain is verified.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from llooma.db.migrate import migrate
from llooma.ledger.blocks import Signer
from llooma.ledger.economics import Prices
from llooma.ledger.verify import verify_ledger
from llooma.v1.common_pb2 import Usage
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, ATTEMPT_OUTCOME_WON, TaskSettlement

BATCH = 256


def race(index: int) -> list[TaskSettlement]:
    request = uuid.uuid4().hex
    common = {"request_id": request, "task_id": request, "model": "m", "api_key_id": "bench"}
    winner = TaskSettlement(
        attempt_id=uuid.uuid4().hex,
        host_id=f"host-{index % 8}",
        outcome=ATTEMPT_OUTCOME_WON,
        usage=Usage(input_tokens=40, output_tokens=120),
        finished_unix_nanos=time.time_ns(),
        **common,  # type: ignore[arg-type]
    )
    loser = TaskSettlement(
        attempt_id=uuid.uuid4().hex,
        host_id=f"host-{(index + 1) % 8}",
        outcome=ATTEMPT_OUTCOME_LOST,
        usage=Usage(output_tokens=30),
        accepted=True,
        winner_model="m",
        winner_output_tokens=120,
        finished_unix_nanos=time.time_ns(),
        **common,  # type: ignore[arg-type]
    )
    return [winner, loser]


async def measure(dsn: str, settlements: int, key: Path) -> tuple[float, float]:
    from llooma.ledger.store import LedgerStore

    await migrate(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    store = LedgerStore(pool, Signer.load_or_create(key), Prices())
    pending = [s for index in range(settlements // 2) for s in race(index)]
    started = time.perf_counter()
    for offset in range(0, len(pending), BATCH):
        await store.settle(pending[offset : offset + BATCH])
    rate = len(pending) / (time.perf_counter() - started)
    started = time.perf_counter()
    async with pool.acquire() as conn:
        verdict = await verify_ledger(conn, {store.signer.public_key})  # type: ignore[arg-type]
    assert verdict.ok, verdict.reason
    verify_rate = verdict.entries / (time.perf_counter() - started)
    await pool.close()
    return rate, verify_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settlements", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llooma-ledger-bench-") as scratch:
        server = None
        dsn = os.environ.get("DATABASE_URL", "")
        if not dsn:
            from llooma.embedded import EmbeddedPostgres

            server = EmbeddedPostgres(Path(scratch) / "postgres")
            dsn = server.url
        try:
            rate, verify_rate = asyncio.run(
                measure(dsn, args.settlements, Path(scratch) / "ledger.key")
            )
        finally:
            if server is not None:
                server.stop()
    print(f"{args.settlements} settlements in batches of {BATCH}: {rate:,.0f} settlements/s")
    print(f"verify: {verify_rate:,.0f} entries/s")


if __name__ == "__main__":
    main()
