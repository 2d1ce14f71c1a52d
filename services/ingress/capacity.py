"""The capacity gate's count held across every ingress: a model's requests in flight are this
ingress's own, counted live, plus what every other live ingress last reported in its service
heartbeat (`ServiceHeartbeat.in_flight_by_model`).

Why heartbeats and not a shared counter (`llooma.limiter`'s `Nats-Incr`): admission stays free
of round trips, and a dead ingress's share leaves with its heartbeat (`service_stale_after_s`
after its last beat) where a counter would keep what a crashed process never took back. The
price is staleness: an ingress beats as soon as its count moves (at most once every
`capacity_report_gap_s`), so the others may admit what arrives within one gap and one hop
before they hear it. Per-process protections (`max_in_flight`, `max_waiting_first_token`)
stay with the process they protect.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from llooma.membership import ServiceDirectory
from llooma.v1.service_pb2 import ServiceHeartbeat

# The peers' reports are summed again at least this often even when no beat was heard, so a
# stopped peer's share leaves on time (its staleness cutoff is seconds).
RESUM_S = 0.1


def cluster_in_flight(own: Mapping[str, int], peers: Iterable[Mapping[str, int]]) -> Counter[str]:
    """Requests in flight by model across the cluster: this ingress's own live count plus each
    other ingress's last report."""
    total: Counter[str] = Counter(own)
    for report in peers:
        total.update(dict(report))
    return total


class PeerInFlight:
    """What every other instance of `service` that still beats reported, summed by model; a
    stopped one's report is gone once its heartbeat is stale (as `ServiceDirectory` judges
    it). Summed again only when a beat was heard or `RESUM_S` passed: admission reads it."""

    def __init__(
        self,
        services: ServiceDirectory,
        service: str,
        own_instance_id: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._services = services
        self._service = service
        self._own = own_instance_id
        self._clock = clock
        self._heard = -1
        self._summed_at = 0.0
        self._total: Counter[str] = Counter()

    def __call__(self) -> Mapping[str, int]:
        heard = self._services.members.heard
        now = self._clock()
        if heard != self._heard or now - self._summed_at >= RESUM_S:
            self._heard, self._summed_at = heard, now
            self._total = cluster_in_flight({}, self.reports())
        return self._total

    def reports(self) -> list[Mapping[str, int]]:
        return [
            member.heartbeat.in_flight_by_model
            for member in self._services.fresh()
            if member.heartbeat.service == self._service and member.key != self._own
        ]


def fill_report(
    beat: ServiceHeartbeat, in_flight_by_model: Mapping[str, int], waiting: int
) -> None:
    beat.in_flight_by_model.clear()
    beat.in_flight_by_model.update(in_flight_by_model)
    beat.waiting_first_token = max(0, waiting)
