"""What the cluster-wide capacity gate adds to one admission: `Limits.admit` and the ticket's
release with the gate counting this ingress alone (as before) and counting every ingress
(peers' reports from a service directory, an early heartbeat asked on each change), side by
side in one process, alternating rounds.

    .venv/bin/python -m tests.support.capacity_gate_cost --admissions 20000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from llooma.membership import ServiceDirectory
from llooma.runtime import ServiceHeartbeater
from llooma.settings import Settings
from llooma.v1.service_pb2 import ServiceHeartbeat
from services.ingress.capacity import PeerInFlight, fill_report
from services.ingress.limits import Limits, Ticket
from tests.unit.test_capacity_shares import hosts_announcing, request

MODEL = "m"
OTHER_SERVICES = ("privacy", "planner", "dispatcher", "racer", "aggregator", "accounting")


class Discard:
    async def publish(self, subject: str, payload: bytes) -> None:
        return None

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109 (the client's signature)
        return None


def directory(peers: int) -> ServiceDirectory:
    """`peers` other ingresses holding requests, and two replicas of every other service."""
    services = ServiceDirectory(stale_after_s=3.0)
    now = time.time()
    for index in range(peers):
        beat = ServiceHeartbeat(service="ingress", next_beat_ms=1000, ready=True)
        beat.in_flight_by_model.update({MODEL: 10, "other": 3})
        services.members._apply(f"ingress-{index}", beat.SerializeToString(), "PUT", now)
    for name in OTHER_SERVICES:
        for replica in range(2):
            beat = ServiceHeartbeat(service=name, next_beat_ms=1000, ready=True)
            services.members._apply(f"{name}-{replica}", beat.SerializeToString(), "PUT", now)
    return services


def per_admission_us(limits: Limits, admissions: int) -> float:
    ask = request(MODEL)
    started = time.perf_counter()
    for _ in range(admissions):
        ticket = limits.admit("key", ask)
        assert isinstance(ticket, Ticket)
        ticket.release()
    return (time.perf_counter() - started) / admissions * 1e6


async def main(admissions: int, rounds: int, peers: int) -> None:
    settings = Settings(max_waiting_first_token=0)
    hosts = hosts_announcing({MODEL: 10_000})
    alone = Limits(settings, hosts)
    cluster = Limits(settings, hosts)
    cluster.peer_in_flight = PeerInFlight(directory(peers), "ingress", "ingress-self")
    beater = ServiceHeartbeater(
        Discard(),  # type: ignore[arg-type]
        "ingress",
        "ingress-self",
        busy_s=1.0,
        idle_s=5.0,
        report=lambda beat: fill_report(beat, cluster.in_flight_by_model, 0),
    )
    await beater.start()
    cluster.on_change = lambda: beater.beat_early(settings.capacity_report_gap_s)
    figures: dict[str, list[float]] = {"alone": [], "cluster": []}
    for _ in range(rounds):
        figures["alone"].append(per_admission_us(alone, admissions))
        figures["cluster"].append(per_admission_us(cluster, admissions))
        await asyncio.sleep(0)
    await beater.stop()
    before, after = (statistics.median(figures[k]) for k in ("alone", "cluster"))
    print(
        f"admit + release, median of {rounds} rounds of {admissions}: this ingress alone "
        f"{before:.2f} us, every ingress ({peers} peers, {2 * len(OTHER_SERVICES)} other "
        f"services in the directory) {after:.2f} us: {after - before:+.2f} us"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--admissions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--peers", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.admissions, args.rounds, args.peers))
