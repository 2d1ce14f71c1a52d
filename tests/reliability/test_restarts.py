"""nats-server and Postgres crash (kill -9) and restart mid-load: the stack reconnects by
itself, and every settlement acknowledged before the crash ends up in the ledger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from llooma.stack import Stack
from tests.reliability.conftest import (
    Load,
    audit_settlements,
    ledger_rows,
    published_settlements,
    stack_fixture,
    tally,
    wait_healthy,
)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory.mktemp("restarts"))


@pytest.mark.timeout(150)
async def test_nats_server_crash_and_restart_mid_load(own: Stack) -> None:
    load = Load(own.base_url, concurrency=6)
    load.start()
    await asyncio.sleep(3.0)
    acknowledged = {s.attempt_id for s in await published_settlements(own)}
    in_flight = load.in_flight()
    crashed_at = time.monotonic()
    await asyncio.to_thread(own.restart_nats)
    await wait_healthy(own)
    await asyncio.sleep(6.0)
    results = await load.stop()
    counts = tally(results)
    audit = await audit_settlements(own)
    stored = {r["attempt_id"] for r in await ledger_rows(own)}
    # Recovered once every request started later completed: measured from the last one that
    # did not, which the hosts bucket's re-watch (idle for WATCH_IDLE_S) mostly bounds.
    failed_starts = [r.started_at for r in results if r.end != "completed"]
    recovery_s = max(failed_starts, default=crashed_at) - crashed_at
    print(
        f"\nnats restart: in_flight={in_flight} requests={len(results)} ends={counts} "
        f"acknowledged_before={len(acknowledged)} missing_after={len(acknowledged - stored)} "
        f"settlements={audit} recovery_s={recovery_s:.2f}"
    )
    assert acknowledged <= stored
    assert counts.get("hung", 0) == 0
    assert counts.get("unfinished", 0) == 0
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
    assert recovery_s < 10.0
    assert sum(1 for r in results if r.started_at > crashed_at + recovery_s) >= 10


@pytest.mark.timeout(150)
async def test_postgres_crash_and_restart_mid_load(own: Stack) -> None:
    load = Load(own.base_url, concurrency=6)
    load.start()
    await asyncio.sleep(2.0)
    crashed_at = time.monotonic()
    await asyncio.to_thread(own.restart_postgres)
    restarted_s = time.monotonic() - crashed_at
    await asyncio.sleep(3.0)
    results = await load.stop()
    counts = tally(results)
    audit = await audit_settlements(own, timeout_s=60.0)
    caught_up_s = time.monotonic() - crashed_at
    print(
        f"\npostgres restart: requests={len(results)} ends={counts} settlements={audit} "
        f"postgres_back_s={restarted_s:.2f} ledger_caught_up_within_s={caught_up_s:.2f}"
    )
    # Postgres is off the request path: no request notices it.
    assert counts == {"completed": len(results)}
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
