"""Per-API-key rate limits held by one ingress alone (`LLOOMA_RATE_LIMITS_SHARED` off): the rate
a key achieves against the one configured (within 5%).

An ingress of its own gives the dev key 600 requests per minute and the second key (by a
per-key override) 48000 tokens per minute. Clients hammer it well past both; the achieved
rate is counted from the first 429 on (when the burst allowance is spent) to the end.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from llooma.stack import Stack
from services.ingress.limits import TokenBucket
from tests.conftest import AUTH, PRIVACY_OFF_KEY
from tests.support.extra_processes import extra_ingress

RPM = 600
TPM = 48_000
WINDOW_S = 10.0
TOKENS_AUTH = {"Authorization": f"Bearer {PRIVACY_OFF_KEY}"}


@dataclass
class Sent:
    at: float
    status: int
    tokens: int
    retry_after: str | None
    error: dict[str, str] | None
    done: float


@pytest.fixture(scope="module")
def limited_ingress(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        # The buckets of one ingress (tests/reliability/test_shared_limits.py: the default).
        "LLOOMA_RATE_LIMITS_SHARED": "false",
        "LLOOMA_RATE_LIMIT_RPM": str(RPM),
        "LLOOMA_RATE_LIMITS_BY_KEY": orjson.dumps(
            {PRIVACY_OFF_KEY: {"rpm": 0, "tpm": TPM}}
        ).decode(),
        # Only the rate limits decide here.
        "LLOOMA_ADMISSION_CAPACITY_FACTOR": "0",
    }
    with extra_ingress(stack, tmp_path_factory.mktemp("rate-limits"), env) as base_url:
        yield base_url


async def hammer(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, object], clients: int
) -> list[Sent]:
    """`clients` callers in a closed loop for WINDOW_S, ignoring Retry-After on purpose."""
    stop_at = time.monotonic() + WINDOW_S
    sent: list[Sent] = []

    async def caller() -> None:
        while time.monotonic() < stop_at:
            at = time.monotonic()
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            payload = response.json()
            usage = payload.get("usage") or {}
            sent.append(
                Sent(
                    at,
                    response.status_code,
                    usage.get("total_tokens", 0),
                    response.headers.get("retry-after"),
                    payload.get("error"),
                    time.monotonic(),
                )
            )
            if response.status_code == 429:
                # Not a busy loop: the ingress should not spend the test's CPU on refusals.
                await asyncio.sleep(0.02)

    await asyncio.gather(*(caller() for _ in range(clients)))
    return sent


def achieved_after_first_refusal(
    sent: list[Sent], amount: str, period_s: float = 0.0
) -> tuple[float, float]:
    """(admitted units per second, seconds measured) in the steady state: from the first
    429 (the burst allowance is spent) or, if later, from when the requests admitted before
    it have ended (their usage corrections, credited then, belong to the burst) to the end,
    or to the end of the last whole `period_s` (shared counters admit a window's allowance
    each window, so they are measured over whole windows; a bucket needs no period)."""
    first_refusal = min(s.at for s in sent if s.status == 429)
    # Admission is not in the order of sending (a shared limit's round trips): a request
    # sent first may be the first refused.
    burst_done = max(
        (s.done for s in sent if s.status == 200 and s.at < first_refusal),
        default=first_refusal,
    )
    start = max(first_refusal, burst_done)
    end = max(s.at for s in sent)
    if period_s:
        end = start + period_s * math.floor((end - start) / period_s)
    else:
        # A bucket is corrected when each admitted request ends: a request in flight at
        # the window's start brings in credit it was charged for before it, one in flight
        # at its end takes credit out. Bounded where nothing admitted is in flight, the
        # window holds exactly what the bucket let through in it.
        quiet = quiet_moments(sent)
        start = min((t for t in quiet if t >= start), default=start)
        end = max((t for t in quiet if t <= end), default=end)
    admitted = [s for s in sent if s.status == 200 and start <= s.at <= end]
    units = len(admitted) if amount == "requests" else sum(s.tokens for s in admitted)
    return units / (end - start), end - start


def quiet_moments(sent: list[Sent]) -> list[float]:
    """The instants when an admitted request ended and none other was in flight."""
    admitted = [s for s in sent if s.status == 200]
    return sorted(s.done for s in admitted if not any(o.at < s.done < o.done for o in admitted))


def assert_refusals_are_well_formed(sent: list[Sent], code: str) -> None:
    refused = [s for s in sent if s.status == 429]
    assert refused
    assert all(s.retry_after is not None and int(s.retry_after) >= 1 for s in refused)
    assert all(s.error is not None and s.error["type"] == "rate_limit_error" for s in refused)
    assert all(s.error is not None and s.error["code"] == code for s in refused)
    assert all(s.status in (200, 429) for s in sent), {s.status for s in sent}


async def test_requests_per_minute_enforced_within_5_percent(limited_ingress: str) -> None:
    body = {"model": "echo", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=limited_ingress, timeout=30) as client:
        sent = await hammer(client, AUTH, body, clients=6)
    assert_refusals_are_well_formed(sent, "rate_limit_exceeded")
    per_s, measured_s = achieved_after_first_refusal(sent, "requests")
    offered = len(sent) / WINDOW_S
    print(
        f"\nrequests: configured {RPM}/min, offered {offered * 60:.0f}/min, achieved "
        f"{per_s * 60:.0f}/min over {measured_s:.1f} s ({per_s * 60 / RPM - 1:+.1%})"
    )
    assert offered * 60 > 2 * RPM, "the test must offer well past the limit"
    assert abs(per_s * 60 / RPM - 1) <= 0.05


async def test_tokens_per_minute_enforced_within_5_percent_by_actual_usage(
    limited_ingress: str,
) -> None:
    # The estimate (characters / 4 + max_tokens) overshoots what the host reports (words in,
    # tokens out) by about 70%: the correction after each request is what holds the rate.
    prompt = " ".join(f"word{i}" for i in range(100))
    body = {"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}
    async with httpx.AsyncClient(base_url=limited_ingress, timeout=30) as client:
        sent = await hammer(client, TOKENS_AUTH, body, clients=6)
    assert_refusals_are_well_formed(sent, "rate_limit_exceeded")
    per_s, measured_s = achieved_after_first_refusal(sent, "tokens")
    admitted = [s for s in sent if s.status == 200]
    print(
        f"\ntokens: configured {TPM}/min, achieved {per_s * 60:.0f}/min over {measured_s:.1f} s "
        f"({per_s * 60 / TPM - 1:+.1%}); {len(admitted)} requests of "
        f"{sum(s.tokens for s in admitted) / len(admitted):.0f} tokens each"
    )
    assert abs(per_s * 60 / TPM - 1) <= 0.05


async def test_a_request_larger_than_the_minute_allows_is_refused_at_once(
    limited_ingress: str,
) -> None:
    body = {"model": "echo", "max_tokens": TPM + 1, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=limited_ingress, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=TOKENS_AUTH)
    # Waiting never helps: a status clients do not retry, and no Retry-After.
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "tokens_exceed_limit"
    assert "retry-after" not in response.headers


async def test_one_keys_spent_budget_leaves_another_key_alone(limited_ingress: str) -> None:
    body = {"model": "echo", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=limited_ingress, timeout=30) as client:
        # At once: one at a time, under load, they may come no faster than the rate.
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=AUTH) for _ in range(30))
        )
        statuses = [response.status_code for response in responses]
        other = await client.post("/v1/chat/completions", json=body, headers=TOKENS_AUTH)
    assert 429 in statuses
    assert other.status_code == 200


def test_bucket_refills_at_the_configured_rate_and_debt_is_repaid() -> None:
    bucket = TokenBucket(per_minute=60, depth=2.0)
    start = bucket.updated
    assert bucket.wait_s(1, start) == 0
    bucket.take(1)
    bucket.take(1)
    assert bucket.wait_s(1, start) == pytest.approx(1.0)
    # A cost above the depth waits for a full bucket, then leaves it in debt.
    assert bucket.wait_s(5, start + 2.0) == 0
    bucket.take(5)
    assert bucket.wait_s(1, start + 2.0) == pytest.approx(4.0)
    bucket.give_back(100)
    assert bucket.level == 2.0
