"""Shared fixtures: a real nats-server and Postgres per session, and one running stack.

The suite is a pyramid: `tests/unit/` runs no server (`make test-fast`, on every change; a
unit test that asks for a server fixture is refused at collection), `tests/stack/` drives the
running stack through real NATS, Postgres and HTTP, `tests/engine/` a real llama-server, and
`tests/reliability/` kills, restarts and attacks stacks of its own. `tests/support/` holds the
helpers they share (scripted hosts, a fake engine, corpora).

`NATS_URL` / `DATABASE_URL` make the suite use servers that already run instead (tests that
need the embedded server's credentials are then skipped).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import httpx
import hypothesis
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import bus, subjects
from llooma.credentials import CredentialStore
from llooma.embedded import EmbeddedNats, EmbeddedPostgres
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY, KEY_HASH_SECRET_ENV
from llooma.stack import Stack, demo_hosts
from llooma.v1.race_pb2 import RaceEvent
from tests.support.otlp_receiver import OtlpReceiver

# Hypothesis's 200 ms deadline per example is a timing check, and speed belongs to the benches:
# on a loaded 2-core machine it failed correct properties.
hypothesis.settings.register_profile("llooma", deadline=None)
hypothesis.settings.load_profile("llooma")

# One key-hash secret for the session, in the environment before anything hashes a key: every
# stack a test starts inherits it, so `api_key_id` here names the same accounts as there.
os.environ.setdefault(KEY_HASH_SECRET_ENV, secrets.token_hex(32))

AUTH = {"Authorization": f"Bearer {DEV_API_KEY}"}
HEDGED_MODEL = "hedged-test-model"
HEDGE_DELAY_MS = 150
SPLITTER_MODEL = "splitter-test-model"
PRIVACY_OFF_KEY = "sk-test-privacy-off"
# A known key that opens with no balance: with billing on, the ingress answers it 402.
NO_BALANCE_KEY = "sk-test-no-balance"


# Fixtures that start or reach a server: never in tests/unit/.
SERVER_FIXTURES = frozenset(
    {"nats_server", "nats_url", "control_seed", "database_url", "stack", "http", "nc"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name != "unit":
            continue
        used = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used:
            raise pytest.UsageError(
                f"{item.nodeid} is a unit test but uses {', '.join(sorted(used))}: "
                "move it to tests/stack/"
            )


class RaceEvents:
    """Collects race events from the stack: all of them (a split request has several), and
    the last one by request id."""

    def __init__(self) -> None:
        self.all: list[RaceEvent] = []
        self.by_request: dict[str, RaceEvent] = {}

    async def on_event(self, msg: Msg) -> None:
        event = RaceEvent.FromString(msg.data)
        self.all.append(event)
        self.by_request[event.request_id] = event

    async def wait_for(self, request_id: str) -> RaceEvent:
        for _ in range(200):
            if request_id in self.by_request:
                return self.by_request[request_id]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no race event for {request_id}")


@pytest.fixture
async def race_events(nc: Client) -> AsyncIterator[RaceEvents]:
    events = RaceEvents()
    subscription = await nc.subscribe(subjects.RACE_EVENT, cb=events.on_event)
    yield events
    await subscription.unsubscribe()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats | None]:
    if os.environ.get("NATS_URL"):
        yield None
        return
    root = tmp_path_factory.mktemp("nats")
    server = EmbeddedNats.start(root / "server", credentials=CredentialStore(root / "keys"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats | None) -> str:
    return nats_server.url if nats_server is not None else os.environ["NATS_URL"]


@pytest.fixture(scope="session")
def control_seed(nats_server: EmbeddedNats | None) -> str | None:
    if nats_server is None or nats_server.credentials is None:
        return os.environ.get("LLOOMA_NATS_NKEY_SEED_FILE")
    return str(nats_server.credentials.control_plane_seed())


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("DATABASE_URL")
    if existing:
        yield existing
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def stack(
    nats_server: EmbeddedNats | None,
    nats_url: str,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    running = Stack(
        root=tmp_path_factory.mktemp("stack"),
        http_port=free_port(),
        nats_url=nats_url,
        database_url=database_url,
        shared_nats=nats_server,
        hosts=demo_hosts(nats_url),
        extra_env={
            "LLOOMA_HEDGE_DELAY_BY_MODEL": f'{{"{HEDGED_MODEL}": "{HEDGE_DELAY_MS}"}}',
            "LLOOMA_PLANNER_SPLIT_MODEL": SPLITTER_MODEL,
            "LLOOMA_API_KEYS": f"{DEV_API_KEY},{PRIVACY_OFF_KEY},{NO_BALANCE_KEY}",
            # Keys open at 0 but for the dev key; NO_BALANCE_KEY keeps that default.
            "LLOOMA_OPENING_BALANCES_MICROS": f'{{"{PRIVACY_OFF_KEY}": 1000000000000}}',
            "LLOOMA_PRIVACY_OFF_API_KEYS": PRIVACY_OFF_KEY,
            # Duels (tested on their own stack, tests/stack/test_duel.py) would let a sampled race's
            # loser run on and send judge prompts to other tests' hosts.
            "LLOOMA_DUEL_FRACTION": "0",
            # Silence probes (tested on tests/stack/test_stake.py's stack) would keep a sampled
            # loser running past its race's answer, where tests count cancels and settlements.
            "LLOOMA_SILENCE_PROBE_FRACTION": "0",
            # Scripted hosts announce the stakes their tests draw by and lock none: here every
            # host counts as staked to the maximum (tests/stack/test_stake.py has a stack with
            # ledger stake alone).
            "LLOOMA_UNSTAKED_HOST_STAKE": "1000",
        },
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP endpoint keeping every span it is sent in memory."""
    running = OtlpReceiver().start()
    yield running
    running.stop()


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30.0) as client:
        yield client


@pytest.fixture
async def nc(nats_url: str, control_seed: str | None) -> AsyncIterator[Client]:
    client = await bus.connect(nats_url, "llooma-tests", nkey_seed_file=control_seed)
    yield client
    # A drain waits on every callback still queued and on a PING to the server; on a loaded
    # machine that can outlast nats-py's 10 s flush. The test is over: close instead.
    try:
        await asyncio.wait_for(client.drain(), timeout=5.0)
    except TimeoutError:
        await client.close()
