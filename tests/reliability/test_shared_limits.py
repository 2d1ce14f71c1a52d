"""Per-key limits held across ingresses: two ingresses share one key's requests and tokens
per minute (JetStream counters, on by default), so together they admit the configured rate,
not twice it, within 5%, for several rates."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import httpx
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client

from llooma import subjects
from llooma.limiter import CARRY, Window, window_for
from llooma.settings import DEV_API_KEY, api_key_id
from llooma.stack import Stack
from tests.conftest import AUTH, PRIVACY_OFF_KEY
from tests.reliability.test_rate_limits import (
    TOKENS_AUTH,
    TPM,
    WINDOW_S,
    Sent,
    achieved_after_first_refusal,
    assert_refusals_are_well_formed,
)
from tests.support.extra_processes import extra_ingress

# Below ~600 rpm (a few requests a window) a 10-s run cannot tell 5% from its edges.
RATES = (600, 900, 1200)
# Requests offered, as a multiple of the rate.
OFFERED = 3
# LLOOMA_RATE_LIMIT_BURST_S's default: each window's allowance is one second of the rate.
BURST_S = 1.0


def ingresses_env(rpm: int) -> dict[str, str]:
    return {
        # The default (LLOOMA_RATE_LIMITS_SHARED) is what is tested.
        "LLOOMA_RATE_LIMIT_RPM": str(rpm),
        "LLOOMA_RATE_LIMITS_BY_KEY": orjson.dumps(
            {PRIVACY_OFF_KEY: {"rpm": 0, "tpm": TPM}}
        ).decode(),
        "LLOOMA_ADMISSION_CAPACITY_FACTOR": "0",
    }


@pytest.fixture(scope="module", params=RATES, ids=lambda rpm: f"{rpm}rpm")
def two_ingresses(
    request: pytest.FixtureRequest, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, list[str]]]:
    rpm: int = request.param
    folder = tmp_path_factory.mktemp(f"shared-limits-{rpm}")
    env = ingresses_env(rpm)
    with extra_ingress(stack, folder, env) as first, extra_ingress(stack, folder, env) as second:
        yield rpm, [first, second]


@pytest.fixture(scope="module")
def two_token_limited_ingresses(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    folder = tmp_path_factory.mktemp("shared-token-limits")
    env = ingresses_env(0)
    with extra_ingress(stack, folder, env) as first, extra_ingress(stack, folder, env) as second:
        yield [first, second]


def test_a_window_holds_the_rate_exactly() -> None:
    assert window_for(600, 1.0) == Window(10, 1.0)
    assert window_for(2, 1.0) == Window(1, 30.0)
    window = window_for(48_000, 1.0)
    assert window.per_window / window.window_s * 60 == 48_000


async def offer_both(
    base_urls: list[str], headers: dict[str, str], body: dict[str, object], per_minute: int
) -> tuple[list[Sent], list[Sent]]:
    """Requests at `per_minute` for WINDOW_S, alternating between the ingresses, each sent on
    its own without waiting for the others' answers (an open loop): a closed loop of callers
    under load measured how fast its callers came back, not the limit."""
    sent: tuple[list[Sent], list[Sent]] = ([], [])

    async def post(client: httpx.AsyncClient, into: list[Sent]) -> None:
        at = time.monotonic()
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        payload = response.json()
        usage = payload.get("usage") or {}
        into.append(
            Sent(
                at,
                response.status_code,
                usage.get("total_tokens", 0),
                response.headers.get("retry-after"),
                payload.get("error"),
                time.monotonic(),
            )
        )

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(base_url=base_urls[0], timeout=30, limits=limits) as first,
        httpx.AsyncClient(base_url=base_urls[1], timeout=30, limits=limits) as second,
        asyncio.TaskGroup() as group,
    ):
        clients = (first, second)
        start = time.monotonic()
        count = 0
        while time.monotonic() < start + WINDOW_S:
            group.create_task(post(clients[count % 2], sent[count % 2]))
            count += 1
            await asyncio.sleep(max(0.0, start + count * 60 / per_minute - time.monotonic()))
    return sent


async def window_totals(
    nc: Client, scope: str, window: Window, start: float, end: float
) -> list[int]:
    """What the limiter counted in each of its windows wholly between `start` and `end` (wall
    clock): the windows' phase from the limits' bucket, the totals from their counters."""
    js = nc.jetstream()
    kv = await js.key_value(subjects.LIMIT_PHASES_BUCKET)
    phase = float((await kv.get(scope)).value or b"0")
    first = math.ceil((start - phase) / window.window_s)
    last = math.floor((end - phase) / window.window_s)
    totals = []
    for index in range(first, last):
        try:
            message = await js.get_last_msg(
                subjects.LIMITS_STREAM, subjects.limit_counter(scope, index)
            )
        except nats.js.errors.NotFoundError:
            totals.append(0)
        else:
            totals.append(int(orjson.loads(message.data or b"{}").get("val", 0)))
    return totals


async def offer_and_count(
    nc: Client,
    base_urls: list[str],
    headers: dict[str, str],
    body: dict[str, object],
    per_minute: int,
    scope: str,
    window: Window,
) -> tuple[list[Sent], list[Sent], list[int], int]:
    """Offer the requests; then what the limiter counted in each window of the steady state
    (the first window, still filling from idle, left out) and in all (to hold against what
    the clients got)."""
    started = time.time()
    sent_first, sent_second = await offer_both(base_urls, headers, body, per_minute)
    ended = time.time()
    # The last requests' usage corrections are sent in the background.
    await asyncio.sleep(1.0)
    steady = await window_totals(nc, scope, window, started + window.window_s, ended)
    everything = await window_totals(nc, scope, window, started - 2 * window.window_s, ended + 60)
    return sent_first, sent_second, steady, sum(everything)


async def test_two_ingresses_hold_one_keys_rpm_within_5_percent(
    two_ingresses: tuple[int, list[str]], nc: Client
) -> None:
    rpm, base_urls = two_ingresses
    body = {"model": "echo", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    window = window_for(rpm, BURST_S)
    sent_first, sent_second, steady, counted = await offer_and_count(
        nc, base_urls, AUTH, body, OFFERED * rpm, f"rpm.{api_key_id(DEV_API_KEY)}", window
    )
    sent = sorted(sent_first + sent_second, key=lambda s: s.at)
    assert_refusals_are_well_formed(sent, "rate_limit_exceeded")
    # Both ingresses admitted some: the limit is shared, not one ingress's alone.
    assert any(s.status == 200 for s in sent_first[5:])
    assert any(s.status == 200 for s in sent_second[5:])
    # The counters are what the clients got: every admitted request, nothing refused.
    assert counted == sum(s.status == 200 for s in sent)
    admitted = sum(steady) / len(steady) / window.per_window
    per_s, measured_s = achieved_after_first_refusal(sent, "requests", window.window_s)
    print(
        f"\ntwo ingresses: {rpm}/min ({window.per_window} a window), offered {len(sent)} in "
        f"{WINDOW_S:.0f} s; admitted per window {steady}: {admitted:.1%} of the limit; by the "
        f"clients' clocks {per_s * 60:.0f}/min over {measured_s:.1f} s"
    )
    assert len(steady) >= WINDOW_S / window.window_s - 3
    # Each ingress alone would have allowed twice the rate; a window takes up at most what
    # the one before left.
    assert max(steady) <= window.per_window * (1 + CARRY)
    assert abs(admitted - 1) <= 0.05


async def test_two_ingresses_hold_one_keys_tpm_within_5_percent_by_actual_usage(
    two_token_limited_ingresses: list[str], nc: Client
) -> None:
    base_urls = two_token_limited_ingresses
    prompt = " ".join(f"word{i}" for i in range(100))
    body = {"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}
    window = window_for(TPM, BURST_S)
    # About 108 tokens a request (the host's usage, not the 185 estimated).
    sent_first, sent_second, steady, counted = await offer_and_count(
        nc,
        base_urls,
        TOKENS_AUTH,
        body,
        OFFERED * TPM // 108,
        f"tpm.{api_key_id(PRIVACY_OFF_KEY)}",
        window,
    )
    sent = sorted(sent_first + sent_second, key=lambda s: s.at)
    assert_refusals_are_well_formed(sent, "rate_limit_exceeded")
    admitted_requests = [s for s in sent if s.status == 200]
    # Estimates corrected to the usage: the counters hold the tokens the clients got.
    assert counted == sum(s.tokens for s in admitted_requests)
    admitted = sum(steady) / len(steady) / window.per_window
    print(
        f"\ntwo ingresses: {TPM} tokens/min ({window.per_window} a window), "
        f"{len(admitted_requests)} requests of "
        f"{sum(s.tokens for s in admitted_requests) / len(admitted_requests):.0f} tokens; "
        f"admitted per window {steady}: {admitted:.1%} of the limit"
    )
    assert len(steady) >= WINDOW_S / window.window_s - 3
    assert abs(admitted - 1) <= 0.05
