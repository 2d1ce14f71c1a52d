"""Per-key rate limits held across every ingress (`llooma.limiter` counters on NATS), instead
of each ingress's own token buckets: with N ingresses a key still gets its rpm and tpm, not N
times them. The same checks and answers as the local limits: 413 for a request larger than
the key's whole minute, 429 with Retry-After past the rate; a request is charged its estimate
when admitted and corrected to its real usage when it ends."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response

from llooma.limiter import SharedCounters, window_for
from llooma.settings import Settings, api_key_id
from services.ingress.limits import estimate_tokens, rate_headers, rate_limited
from services.ingress.schema import ChatCompletionRequest, error_response

Release = Callable[[int], None]
# How much each request's usage moves its key's average share of the estimate used.
USED_SHARE_WEIGHT = 0.2
MAX_USED_SHARE = 2.0


class SharedRateLimits:
    def __init__(self, settings: Settings, counters: SharedCounters) -> None:
        self.settings = settings
        self.counters = counters
        self.rate_limited = 0
        self._overrides = {
            api_key_id(key): limits for key, limits in settings.rate_limits_by_key.items()
        }
        # Per key: what its requests used of their token estimates lately (a moving average).
        self._used_share: dict[str, float] = {}

    def rates(self, key_id: str, rates: tuple[int, int] | None) -> tuple[int, int]:
        """A managed key's own (rpm, tpm), else the per-key override, else the default."""
        override = self._overrides.get(key_id, {})
        rpm = override.get("rpm", self.settings.rate_limit_rpm)
        tpm = override.get("tpm", self.settings.rate_limit_tpm)
        if rates is not None:
            rpm, tpm = rates[0] or rpm, rates[1] or tpm
        return rpm, tpm

    def headers(self, key_id: str, rates: tuple[int, int] | None) -> dict[str, str]:
        """The key's x-ratelimit-* headers: what is left of the sliding window, and when the
        current window ends, as this ingress last saw the shared counters."""
        rpm, tpm = self.rates(key_id, rates)
        burst_s = self.settings.rate_limit_burst_s
        headers: dict[str, str] = {}
        for kind, scope, per_minute in (("requests", "rpm", rpm), ("tokens", "tpm", tpm)):
            if per_minute:
                window = window_for(per_minute, burst_s)
                remaining, reset_s = self.counters.standing(f"{scope}.{key_id}", window)
                headers.update(rate_headers(kind, per_minute, remaining, reset_s))
        return headers

    async def admit(
        self, key_id: str, request: ChatCompletionRequest, rates: tuple[int, int] | None
    ) -> Response | Release | None:
        """A refusal; or, for a key with a token limit, what to call with the tokens the
        request used when it ends; or None (admitted, nothing to correct)."""
        rpm, tpm = self.rates(key_id, rates)
        if not rpm and not tpm:
            return None
        burst_s = self.settings.rate_limit_burst_s
        estimate = 0
        if tpm:
            estimate = estimate_tokens(request, self.settings.rate_limit_default_max_tokens)
            if estimate > tpm:
                self.rate_limited += 1
                return error_response(
                    413,
                    f"request too large: it may use {estimate} tokens, the key's limit is "
                    f"{tpm} tokens per minute; lower max_tokens or the prompt",
                    error_type="invalid_request_error",
                    code="tokens_exceed_limit",
                    headers=self.headers(key_id, rates),
                )
        requests = window_for(rpm, burst_s) if rpm else None
        if requests is not None:
            wait_s = await self.counters.take(f"rpm.{key_id}", 1, requests)
            if wait_s:
                self.rate_limited += 1
                return rate_limited(
                    f"rate limit reached: {rpm} requests per minute",
                    wait_s,
                    headers=self.headers(key_id, rates),
                )
        if not tpm:
            return None
        tokens = window_for(tpm, burst_s)
        share = self._used_share.get(key_id, 1.0)
        wait_s = await self.counters.take(f"tpm.{key_id}", estimate, tokens, estimate * share)
        if wait_s:
            if requests is not None:
                self.counters.adjust(f"rpm.{key_id}", -1, requests)
            self.rate_limited += 1
            return rate_limited(
                f"rate limit reached: {tpm} tokens per minute",
                wait_s,
                headers=self.headers(key_id, rates),
            )

        def release(used: int) -> None:
            self.counters.adjust(f"tpm.{key_id}", used - estimate, tokens)
            if used:
                # Not a refused or failed request's 0: it says nothing of the key's usage.
                seen = min(used / estimate, MAX_USED_SHARE)
                share = self._used_share.get(key_id, 1.0)
                self._used_share[key_id] = share + USED_SHARE_WEIGHT * (seen - share)

        return release
