"""The x-ratelimit-* headers' values, as OpenAI writes them."""

from __future__ import annotations

import pytest

from services.ingress.limits import KeyBuckets, TokenBucket, bucket_headers, duration


@pytest.mark.parametrize(
    ("seconds", "written"),
    [
        (0.0, "0ms"),
        (0.0204, "20ms"),
        (0.9996, "1s"),
        (1.5, "1.5s"),
        (10.0, "10s"),
        (60.0, "1m0s"),
        (360.0, "6m0s"),
        (3725.25, "1h2m5.25s"),
    ],
)
def test_durations_are_written_as_openai_writes_them(seconds: float, written: str) -> None:
    assert duration(seconds) == written


def test_headers_follow_the_buckets() -> None:
    requests = TokenBucket(per_minute=60, depth=1.0)
    tokens = TokenBucket(per_minute=6000, depth=100.0)
    now = requests.updated
    tokens.updated = now
    requests.take(1)
    tokens.take(40)
    headers = bucket_headers(KeyBuckets(requests, tokens), now + 0.25)
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "750ms",
        "x-ratelimit-limit-tokens": "6000",
        # 25 of the 40 taken are back after a quarter of a second at 100 a second.
        "x-ratelimit-remaining-tokens": "85",
        "x-ratelimit-reset-tokens": "150ms",
    }
    # Without a token limit, no token headers.
    assert set(bucket_headers(KeyBuckets(requests, None), now + 1)) == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }
