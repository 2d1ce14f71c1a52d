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

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from llooma.membership import ServiceDirectory
from llooma.v1.service_pb2 import ServiceHeartbeat

Reports = Callable[[], Iterable[Mapping[str, int]]]


def cluster_in_flight(own: Mapping[str, int], peers: Iterable[Mapping[str, int]]) -> Counter[str]:
    """Requests in flight by model across the cluster: this ingress's own live count plus each
    other ingress's last report."""
    total: Counter[str] = Counter(own)
    for report in peers:
        total.update(report)
    return total


def peer_reports(services: ServiceDirectory, service: str, own_instance_id: str) -> Reports:
    """What every other instance of `service` that still beats reported; a stopped one's
    report is gone once its heartbeat is stale (as `ServiceDirectory` judges it)."""

    def reports() -> list[Mapping[str, int]]:
        return [
            member.heartbeat.in_flight_by_model
            for member in services.fresh()
            if member.heartbeat.service == service and member.key != own_instance_id
        ]

    return reports


def fill_report(
    beat: ServiceHeartbeat, in_flight_by_model: Mapping[str, int], waiting: int
) -> None:
    beat.in_flight_by_model.clear()
    beat.in_flight_by_model.update(in_flight_by_model)
    beat.waiting_first_token = max(0, waiting)
