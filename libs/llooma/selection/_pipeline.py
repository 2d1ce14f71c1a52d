"""The pipeline: filters narrow the hosts bucket to endpoints, scorers rank them, the picker
chooses. One `Selector` a process, built from settings; the stats are what it has observed."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping

from llooma.selection._capacity import capacity, independent_engines
from llooma.selection._filters import (
    HOST_FILTERS,
    MODEL_FILTERS,
    Ask,
    Endpoint,
    HostEntry,
    HostFilter,
    ModelFilter,
    Policy,
    as_host,
    endpoints,
    host_rejection,
)
from llooma.selection._picker import Candidate, ledger_stake, pick_hosts
from llooma.selection._scorers import (
    SCORERS,
    Context,
    NothingObserved,
    Observed,
    Scorer,
    score_terms,
    weighted,
    weights_from_settings,
)
from llooma.settings import Settings
from llooma.v1.host_pb2 import ModelCapability


class Selector:
    def __init__(
        self,
        policy: Policy,
        weights: Mapping[str, float],
        stats: Observed | None = None,
        *,
        host_filters: tuple[HostFilter, ...] = HOST_FILTERS,
        model_filters: tuple[ModelFilter, ...] = MODEL_FILTERS,
        scorers: Mapping[str, Scorer] = SCORERS,
        locked_stake: Callable[[str], int] | None = None,
    ) -> None:
        self.policy = policy
        # A host's stake locked in the ledger, micro-credits (the stakes bucket's view). Without
        # it the announced stake is taken as is: only the dispatcher's draw is by stake.
        self._locked_stake = locked_stake
        self.weights = dict(weights)
        self.context = Context(stats or NothingObserved(), policy)
        self._host_filters = host_filters
        self._model_filters = model_filters
        self._scorers = scorers

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        stats: Observed | None = None,
        locked_stake: Callable[[str], int] | None = None,
    ) -> Selector:
        return cls(
            Policy.from_settings(settings),
            weights_from_settings(settings),
            stats,
            locked_stake=locked_stake,
        )

    # -- filters -------------------------------------------------------------------------------

    def endpoints(
        self, entries: Iterable[HostEntry], ask: Ask, now: float | None = None
    ) -> list[Endpoint]:
        """The endpoints that may serve the request."""
        return endpoints(
            entries,
            ask,
            self.policy,
            time.monotonic() if now is None else now,
            host_filters=self._host_filters,
            model_filters=self._model_filters,
        )

    def rejection(self, entry: HostEntry, now: float | None = None) -> str | None:
        """Which host filter turns this host away whatever it is asked (None: none does)."""
        host = as_host(entry, time.monotonic() if now is None else now)
        return host_rejection(host, Ask(self.policy.orchestrated_model), self.policy)

    # -- scorers -------------------------------------------------------------------------------

    def terms(self, endpoint: Endpoint, ask: Ask) -> dict[str, float]:
        return score_terms(endpoint, ask, self.context, self._scorers)

    def host_terms(
        self, entry: HostEntry, deadline_ms: int, now: float | None = None
    ) -> dict[str, float]:
        """The terms of a host whatever model it is asked for (the metrics' host table)."""
        host = as_host(entry, time.monotonic() if now is None else now)
        ask = Ask(self.policy.orchestrated_model, deadline_ms=deadline_ms)
        return self.terms(Endpoint(host, ModelCapability()), ask)

    def score(self, endpoint: Endpoint, ask: Ask) -> float:
        """S(h), lower is better."""
        return weighted(self.terms(endpoint, ask), self.weights)

    def candidates(
        self, entries: Iterable[HostEntry], ask: Ask, now: float | None = None
    ) -> list[Candidate]:
        """Every endpoint that may serve the request, with its S(h) and stake."""
        return [
            Candidate(
                e.host_id,
                e.model.name,
                self.score(e, ask),
                self.stake(e.host_id, e.model.stake),
                e.model.features.assistant_prefill,
            )
            for e in self.endpoints(entries, ask, now)
        ]

    def stake(self, host_id: str, announced: float) -> float:
        if self._locked_stake is None:
            return announced
        return ledger_stake(announced, self._locked_stake(host_id), self.policy.unstaked_stake)

    # -- picker and capacity -------------------------------------------------------------------

    @staticmethod
    def pick(
        candidates: list[Candidate], *, k: int, bucket_size: int, rng: random.Random
    ) -> list[Candidate]:
        return pick_hosts(candidates, k=k, bucket_size=bucket_size, rng=rng)

    def capacity(self, entries: Iterable[HostEntry], ask: Ask, *, per_host_max: int) -> int:
        return capacity(self.endpoints(entries, ask), per_host_max=per_host_max)

    def engines(self, entries: Iterable[HostEntry], ask: Ask) -> int:
        return independent_engines(self.endpoints(entries, ask))
