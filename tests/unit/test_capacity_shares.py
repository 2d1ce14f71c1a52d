"""The capacity gate counts every ingress: its own requests live, the others' as they last
reported them in their heartbeats, a stopped one's only while its heartbeat is fresh."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping

from llooma.membership import HostDirectory, ServiceDirectory
from llooma.runtime import ServiceHeartbeater
from llooma.settings import ORCHESTRATED_MODEL, VERSION, Settings
from llooma.v1.host_pb2 import HostHeartbeat, ModelCapability
from llooma.v1.service_pb2 import ServiceHeartbeat
from services.ingress.capacity import RESUM_S, PeerInFlight, cluster_in_flight, fill_report
from services.ingress.limits import Limits, Ticket
from services.ingress.schema import ChatCompletionRequest
from tests.unit.test_service_heartbeats import RecordingConnection


def hosts_announcing(capacities: dict[str, int]) -> HostDirectory:
    directory = HostDirectory(stale_after_s=5.0, min_version="0.1.0")
    beat = HostHeartbeat(
        version=VERSION,
        models=[ModelCapability(name=n, capacity=c) for n, c in capacities.items()],
    )
    directory.members._apply("host-1", beat.SerializeToString(), "PUT", time.time())
    return directory


def request(model: str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    )


def admit_all(limits: Limits, model: str, count: int) -> list[Ticket]:
    tickets = []
    for _ in range(count):
        answer = limits.admit("key", request(model))
        if isinstance(answer, Ticket):
            tickets.append(answer)
        else:
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
    return tickets


def limits_with_peers(
    capacities: dict[str, int], peers: list[Mapping[str, int]], factor: float = 1.0
) -> Limits:
    settings = Settings(max_waiting_first_token=0, admission_capacity_factor=factor)
    limits = Limits(settings, hosts_announcing(capacities))
    limits.peer_in_flight = lambda: cluster_in_flight({}, peers)
    return limits


def test_the_cluster_count_is_the_own_live_count_plus_each_peers_report() -> None:
    total = cluster_in_flight(Counter(m=2), [{"m": 3, "n": 1}, {"n": 4}])
    assert total == Counter(m=5, n=5)
    assert cluster_in_flight({}, []) == Counter()


def test_what_other_ingresses_hold_is_not_admitted_again() -> None:
    peers: list[Mapping[str, int]] = [{"m": 3}, {"m": 2}]
    limits = limits_with_peers({"m": 8}, peers)
    assert len(admit_all(limits, "m", 10)) == 3
    assert limits.shed == 7
    # A peer's requests end (its next report says so): room again, for exactly that many.
    peers[1] = {}
    assert len(admit_all(limits, "m", 10)) == 2
    # The factor applies to the cluster's count as it did to one ingress's.
    doubled = limits_with_peers({"m": 8}, [{"m": 10}], factor=2.0)
    assert len(admit_all(doubled, "m", 10)) == 6


def test_other_models_and_the_orchestrated_pool_count_peers_too() -> None:
    peers: list[Mapping[str, int]] = [{"other": 50, ORCHESTRATED_MODEL: 1}]
    limits = limits_with_peers({"m": 2, "n": 2}, peers)
    # Another model's requests take nothing from m's capacity ...
    assert len(admit_all(limits, "m", 5)) == 2
    # ... but the pool (m and n) holds a peer's orchestrated request and this ingress's two.
    assert len(admit_all(limits, "n", 5)) == 1
    assert admit_all(limits, ORCHESTRATED_MODEL, 1) == []


def test_every_admission_and_release_asks_for_an_early_report() -> None:
    limits = limits_with_peers({"m": 4}, [])
    changes: list[int] = []
    limits.on_change = lambda: changes.append(limits.in_flight_by_model["m"])
    tickets = admit_all(limits, "m", 2)
    tickets[0].release()
    tickets[0].release()
    assert changes == [1, 2, 1]
    beat = ServiceHeartbeat()
    fill_report(beat, limits.in_flight_by_model, limits.waiting_first_token)
    assert dict(beat.in_flight_by_model) == {"m": 1}
    assert beat.waiting_first_token == 1


def beat(service: str, counts: dict[str, int], next_beat_ms: int = 1000) -> bytes:
    heartbeat = ServiceHeartbeat(service=service, next_beat_ms=next_beat_ms, ready=True)
    heartbeat.in_flight_by_model.update(counts)
    return heartbeat.SerializeToString()


def test_only_other_live_ingresses_reports_count() -> None:
    services = ServiceDirectory(stale_after_s=3.0)
    members = services.members
    now = time.time()
    members._apply("ingress-self", beat("ingress", {"m": 9}), "PUT", now)
    members._apply("ingress-peer", beat("ingress", {"m": 2}), "PUT", now - 1.0)
    members._apply("racer-1", beat("racer", {"m": 7}), "PUT", now)
    # Killed 4 s ago while busy (it promised a beat a second): past three missed beats.
    members._apply("ingress-dead", beat("ingress", {"m": 5}), "PUT", now - 4.0)
    # Stopped and withdrawn: nothing left to count.
    members._apply("ingress-gone", beat("ingress", {"m": 6}), "PUT", now)
    members._apply("ingress-gone", None, "DEL", now)
    peers = PeerInFlight(services, "ingress", "ingress-self")
    assert peers() == {"m": 2}
    # A beat heard is counted at the next admission, however soon.
    members._apply("ingress-peer", beat("ingress", {"m": 3, "n": 1}), "PUT", time.time())
    assert peers() == {"m": 3, "n": 1}


async def test_a_peer_that_stops_beating_leaves_the_sum_on_time_with_no_beat_heard() -> None:
    services = ServiceDirectory(stale_after_s=3.0)
    # Its last beat is about to be three busy intervals old.
    last_beat = time.time() - 3.0 + 2 * RESUM_S
    services.members._apply("ingress-peer", beat("ingress", {"m": 4}), "PUT", last_beat)
    peers = PeerInFlight(services, "ingress", "ingress-self")
    assert peers() == {"m": 4}
    await asyncio.sleep(4 * RESUM_S)
    assert peers() == {}


async def test_an_early_report_goes_out_at_once_and_at_most_once_a_gap() -> None:
    nc = RecordingConnection()
    in_flight: Counter[str] = Counter()

    def report(heartbeat: ServiceHeartbeat) -> None:
        fill_report(heartbeat, in_flight, 0)

    beater = ServiceHeartbeater(
        nc,  # type: ignore[arg-type]
        "racer",
        "racer-1",
        busy_s=5.0,
        idle_s=5.0,
        report=report,
    )
    await beater.start()
    try:
        assert dict(nc.beats[0][1].in_flight_by_model) == {}
        loop = asyncio.get_running_loop()
        in_flight["m"] = 1
        asked_at = loop.time()
        beater.beat_early(0.3)
        first = await nc.next_beat()
        # The start's beat was just sent: the report waits out the rest of the gap, no more.
        assert dict(first.in_flight_by_model) == {"m": 1}
        assert nc.beats[-1][0] - asked_at < 0.5
        # Many changes within one gap: one beat, a gap after the last, with the newest count.
        for _ in range(10):
            in_flight["m"] += 1
            beater.beat_early(0.3)
            await asyncio.sleep(0.01)
        second = await nc.next_beat()
        assert dict(second.in_flight_by_model) == {"m": 11}
        assert nc.beats[-1][0] - nc.beats[-2][0] >= 0.29
        await asyncio.sleep(0.4)
        assert len(nc.beats) == 3
    finally:
        await beater.stop()
