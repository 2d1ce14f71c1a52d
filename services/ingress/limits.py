"""Admission control: per-key rate limits and load shedding, decided before anything
reaches NATS.

Rate limits are token buckets per API key (requests and tokens per minute). A request is
charged its estimate (prompt characters / 4 + max_tokens) when admitted, and the difference
to its real usage when it ends. Load shedding turns requests away with 503 when this ingress
already has too many in flight, too many still waiting for a first token, or more in flight
for a model than the hosts the selection pipeline would race it on announced capacity for
(each host believed up to `admission_max_host_capacity`, an engine shared by several models or
hosts counted once; orchestrated requests and direct ones on the models they can use also share
the pool's capacity). That last count is the cluster's: every other ingress's last reported
in-flight requests are added (services/ingress/capacity.py). The process's own limits
(`max_in_flight`, `max_waiting_first_token`) stay per process; the rate limits here are per
process only with `LLOOMA_RATE_LIMITS_SHARED` off (on, the default,
services/ingress/shared_limits.py holds them across ingresses).

Its size (~440 lines): the buckets, the shedding counts and the ticket that releases both when
a request ends are one admission decision and share its state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from llooma import selection
from llooma.membership import HostDirectory
from llooma.settings import ORCHESTRATED_MODEL, Settings, api_key_id
from llooma.v1.pipeline_pb2 import ClientEvent
from services.ingress.capacity import cluster_in_flight
from services.ingress.schema import ChatCompletionRequest, error_response

# How long a model's announced capacity is reused before the host directory is asked again.
CAPACITY_CACHE_S = 0.25
CHARS_PER_TOKEN = 4
# What each message costs beyond its text (role and separators), as chat templates do.
TOKENS_PER_MESSAGE = 4


def estimate_tokens(request: ChatCompletionRequest, default_max_tokens: int) -> int:
    """Prompt + completion tokens a request may use, known before it runs."""
    prompt_chars = sum(len(message.text()) for message in request.messages)
    prompt = math.ceil(prompt_chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(request.messages)
    completion = request.max_completion_tokens or request.max_tokens or default_max_tokens
    return prompt + request.n * completion


@dataclass
class TokenBucket:
    """`per_minute` units a minute, at most `depth` saved up; a cost above the depth is
    admitted from a full bucket and leaves it in debt, so the long-run rate still holds."""

    per_minute: int
    depth: float
    level: float = field(init=False)
    updated: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.depth

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until `cost` may be taken (0: now)."""
        self.level = min(self.depth, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now
        missing = min(cost, self.depth) - self.level
        return max(0.0, missing / self.rate_per_s)

    def take(self, cost: float) -> None:
        self.level -= cost

    def give_back(self, amount: float) -> None:
        self.level = min(self.depth, self.level + amount)


@dataclass
class KeyBuckets:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    rates: tuple[int, int] = (0, 0)


def _bucket(per_minute: int, burst_s: float, smallest: float) -> TokenBucket | None:
    if per_minute <= 0:
        return None
    return TokenBucket(per_minute, max(smallest, per_minute * burst_s / 60.0))


def _retry_after(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))


def duration(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it (Go's format): "20ms",
    "1s", "1.5s", "6m0s", "1h0m0s"."""
    millis = max(0, round(seconds * 1000))
    if millis < 1000:
        return f"{millis}ms"
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    text = f"{millis / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def rate_headers(kind: str, per_minute: int, remaining: float, reset_s: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-*-{requests,tokens} headers for one limit."""
    return {
        f"x-ratelimit-limit-{kind}": str(per_minute),
        f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(remaining))),
        f"x-ratelimit-reset-{kind}": duration(reset_s),
    }


def bucket_headers(buckets: KeyBuckets, now: float) -> dict[str, str]:
    """Where the key's buckets stand: remaining is what may be taken now, reset the time
    until the bucket is full again."""
    headers: dict[str, str] = {}
    for kind, bucket in (("requests", buckets.requests), ("tokens", buckets.tokens)):
        if bucket is not None:
            bucket.wait_s(0, now)
            reset_s = (bucket.depth - bucket.level) / bucket.rate_per_s
            headers.update(rate_headers(kind, bucket.per_minute, bucket.level, reset_s))
    return headers


def rate_limited(
    message: str,
    wait_s: float,
    code: str = "rate_limit_exceeded",
    headers: dict[str, str] | None = None,
) -> Response:
    return error_response(
        429,
        message,
        error_type="rate_limit_error",
        code=code,
        headers={**(headers or {}), "retry-after": _retry_after(wait_s)},
    )


def overloaded(message: str, retry_after_s: int) -> Response:
    return error_response(
        503,
        message,
        error_type="server_error",
        code="overloaded",
        headers={"retry-after": str(retry_after_s)},
    )


class Limits:
    """The ingress's admission state: one instance per process."""

    def __init__(
        self,
        settings: Settings,
        hosts: HostDirectory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.hosts = hosts
        self.clock = clock
        self.in_flight = 0
        self.waiting_first_token = 0
        self.in_flight_by_model: Counter[str] = Counter()
        self.shed = 0
        self.rate_limited = 0
        self.selector = selection.Selector.from_settings(settings)
        # The other ingresses' in-flight counts as last reported (services.ingress.capacity),
        # and what to call when this one's moved (its heartbeat reports them early).
        self.peer_in_flight: Callable[[], Mapping[str, int]] = dict
        self.on_change: Callable[[], None] = lambda: None
        # Per-key rates are held by the shared counters, not by buckets in this process.
        self.rates_shared = False
        self._buckets: dict[str, KeyBuckets] = {}
        self._overrides = {
            api_key_id(key): limits for key, limits in settings.rate_limits_by_key.items()
        }
        # Per model: when computed, the capacity, and the models whose hosts it counted.
        self._capacity: dict[str, tuple[float, int, frozenset[str]]] = {}

    # -- load shedding -----------------------------------------------------------------------

    def shed_early(self) -> Response | None:
        """Before the body is read: is this ingress already past what it can serve? (Asked
        again at admission, since requests whose bodies are still arriving are not counted.)"""
        settings = self.settings
        if settings.max_in_flight and self.in_flight >= settings.max_in_flight:
            self.shed += 1
            return overloaded(
                f"overloaded: {self.in_flight} requests in flight", settings.shed_retry_after_s
            )
        waiting_limit = settings.max_waiting_first_token
        if waiting_limit and self.waiting_first_token >= waiting_limit:
            self.shed += 1
            return overloaded(
                f"overloaded: {self.waiting_first_token} requests waiting for a first token",
                settings.shed_retry_after_s,
            )
        return None

    def model_capacity(self, model: str) -> int:
        """Tasks the model's eligible hosts say they take at once (0: none announced), each
        host counted for at most `admission_max_host_capacity`."""
        return self._capacity_of(model)[0]

    def _capacity_of(self, model: str) -> tuple[int, frozenset[str]]:
        now = self.clock()
        cached = self._capacity.get(model)
        if cached is not None and now - cached[0] < CAPACITY_CACHE_S:
            return cached[1], cached[2]
        # The hosts that may serve it, as the dispatcher would pick them (not suspended, engine
        # reachable, ...); an engine shared by several models or hosts counts once.
        served = self.selector.endpoints(self.hosts.members.all(), selection.Ask(model))
        total = selection.capacity(served, per_host_max=self.settings.admission_max_host_capacity)
        models = {endpoint.model.name for endpoint in served}
        self._capacity[model] = (now, total, frozenset(models))
        return total, frozenset(models)

    def cluster_in_flight(self) -> Counter[str]:
        """Requests in flight by model on every live ingress, this one's counted live."""
        return cluster_in_flight(self.in_flight_by_model, [self.peer_in_flight()])

    def _over_capacity(self, model: str) -> Response | None:
        """Past the model's capacity, or past the orchestrated pool's: an orchestrated request
        runs on the same hosts as direct ones, so both count against the pool, and direct
        plus orchestrated cannot admit twice what the hosts take."""
        factor = self.settings.admission_capacity_factor
        if not factor:
            return None
        own, peers = self.in_flight_by_model, self.peer_in_flight()

        def in_flight(name: str) -> int:
            return own[name] + peers.get(name, 0)

        checks = []
        if model != ORCHESTRATED_MODEL:
            checks.append((repr(model), self.model_capacity(model), in_flight(model)))
        pool_capacity, pool_models = self._capacity_of(ORCHESTRATED_MODEL)
        if model == ORCHESTRATED_MODEL or model in pool_models:
            pool_in_flight = in_flight(ORCHESTRATED_MODEL) + sum(
                in_flight(name) for name in pool_models
            )
            checks.append(("the orchestrated pool", pool_capacity, pool_in_flight))
        for name, capacity, count in checks:
            # No capacity announced: the pipeline answers no_eligible_host itself.
            limit = max(1, int(capacity * factor)) if capacity else 0
            if limit and count >= limit:
                self.shed += 1
                return overloaded(
                    f"overloaded: {name} has {count} requests in flight for a capacity of "
                    f"{capacity}",
                    self.settings.shed_retry_after_s,
                )
        return None

    # -- rate limits -------------------------------------------------------------------------

    def _buckets_for(self, key_id: str, rates: tuple[int, int] | None = None) -> KeyBuckets:
        """`rates`: a managed key's own (rpm, tpm), 0 for the default; a change rebuilds."""
        settings = self.settings
        if self.rates_shared:
            # Held across every ingress instead (services.ingress.shared_limits).
            return KeyBuckets(None, None)
        override = self._overrides.get(key_id, {})
        rpm = override.get("rpm", settings.rate_limit_rpm)
        tpm = override.get("tpm", settings.rate_limit_tpm)
        if rates is not None:
            rpm, tpm = rates[0] or rpm, rates[1] or tpm
        buckets = self._buckets.get(key_id)
        if buckets is None or buckets.rates != (rpm, tpm):
            burst_s = settings.rate_limit_burst_s
            buckets = KeyBuckets(
                _bucket(rpm, burst_s, 1.0), _bucket(tpm, burst_s, 0.0), rates=(rpm, tpm)
            )
            self._buckets[key_id] = buckets
        return buckets

    def _over_rate(self, buckets: KeyBuckets, estimate: int) -> Response | None:
        now = self.clock()
        requests, tokens = buckets.requests, buckets.tokens
        if tokens is not None and estimate > tokens.per_minute:
            self.rate_limited += 1
            # Waiting never helps, so not 429 (which clients retry): 413, as for a body too large.
            return error_response(
                413,
                f"request too large: it may use {estimate} tokens, the key's limit is "
                f"{tokens.per_minute} tokens per minute; lower max_tokens or the prompt",
                error_type="invalid_request_error",
                code="tokens_exceed_limit",
                headers=bucket_headers(buckets, now),
            )
        if requests is not None and (wait_s := requests.wait_s(1, now)) > 0:
            self.rate_limited += 1
            return rate_limited(
                f"rate limit reached: {requests.per_minute} requests per minute",
                wait_s,
                headers=bucket_headers(buckets, now),
            )
        if tokens is not None and (wait_s := tokens.wait_s(estimate, now)) > 0:
            self.rate_limited += 1
            return rate_limited(
                f"rate limit reached: {tokens.per_minute} tokens per minute",
                wait_s,
                headers=bucket_headers(buckets, now),
            )
        return None

    # -- admission ---------------------------------------------------------------------------

    def admit(
        self,
        key_id: str,
        request: ChatCompletionRequest,
        rates: tuple[int, int] | None = None,
        on_release: Callable[[int], None] | None = None,
    ) -> Ticket | Response:
        """Rate limits first (the key's own doing: 429), then capacity (503); a request
        turned away is charged nothing."""
        buckets = self._buckets_for(key_id, rates)
        estimate = 0
        if buckets.tokens is not None:
            estimate = estimate_tokens(request, self.settings.rate_limit_default_max_tokens)
        refused = (
            self._over_rate(buckets, estimate)
            or self.shed_early()
            or self._over_capacity(request.model)
        )
        if refused is not None:
            return refused
        if buckets.requests is not None:
            buckets.requests.take(1)
        if buckets.tokens is not None:
            buckets.tokens.take(estimate)
        self.in_flight += 1
        self.waiting_first_token += 1
        self.in_flight_by_model[request.model] += 1
        self.on_change()
        ticket = Ticket(self, buckets.tokens, request.model, estimate, on_release)
        ticket.rate_headers = bucket_headers(buckets, self.clock())
        return ticket


class Ticket:
    """One admitted request's hold on the limits, released exactly once."""

    def __init__(
        self,
        limits: Limits,
        tokens: TokenBucket | None,
        model: str,
        estimate: int,
        on_release: Callable[[int], None] | None = None,
    ):
        self._limits = limits
        # Told the tokens the request used, once, when it is released (shared limits).
        self._on_release = on_release
        self._tokens = tokens
        self._model = model
        self._estimate = estimate
        # Tokens the request is charged when released: nothing unless it produced some.
        self._used = 0
        self._waiting = True
        self._released = False
        # The key's x-ratelimit-* headers as they stood once the request was admitted.
        self.rate_headers: dict[str, str] = {}

    def first_token(self) -> None:
        if self._waiting:
            self._waiting = False
            self._limits.waiting_first_token -= 1

    def release(self) -> None:
        """Give back the slot, and to the token bucket what the estimate overcharged (or
        take what it undercharged)."""
        if self._released:
            return
        self._released = True
        self.first_token()
        limits = self._limits
        limits.in_flight -= 1
        limits.in_flight_by_model[self._model] -= 1
        if not limits.in_flight_by_model[self._model]:
            del limits.in_flight_by_model[self._model]
        limits.on_change()
        if self._on_release is not None:
            self._on_release(self._used)
        if self._tokens is not None:
            difference = self._estimate - self._used
            if difference >= 0:
                self._tokens.give_back(difference)
            else:
                self._tokens.take(-difference)

    def watch(
        self, batches: AsyncGenerator[list[ClientEvent]]
    ) -> AsyncGenerator[list[ClientEvent]]:
        """Called once the first token is there: pass the events through, and release with
        the usage the finishing event reports (the estimate, if the stream broke)."""
        self.first_token()
        self._used = self._estimate
        return self._watch(batches)

    async def _watch(
        self, batches: AsyncGenerator[list[ClientEvent]]
    ) -> AsyncGenerator[list[ClientEvent]]:
        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    last = batch[-1]
                    if last.WhichOneof("event") == "finished":
                        usage = last.finished.usage
                        self._used = usage.input_tokens + usage.output_tokens
                        # Now: a consumer that stops at the last batch may never close us.
                        self.release()
                    yield batch
        finally:
            self.release()

    async def _release_after_response(self) -> None:
        self.release()

    async def serve(self, answer: Awaitable[Response]) -> Response:
        """Await the answer; release now unless a stream still runs, which releases when
        it ends (or, if the client left before it began, when the response is done)."""
        try:
            response = await answer
        except BaseException:
            self.release()
            raise
        if isinstance(response, StreamingResponse):
            # A coroutine: Starlette runs a plain function's background task on a thread.
            response.background = BackgroundTask(self._release_after_response)
        else:
            self.release()
        return response
