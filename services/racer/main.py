"""Composition root of the racer service."""

from __future__ import annotations

from nats.aio.msg import Msg

from llooma import subjects
from llooma.ledger.stakes import StakeBook
from llooma.membership import HostDirectory
from llooma.service import Service, serve
from llooma.v1.pipeline_pb2 import RaceResume, TaskAssignment
from services.racer.duel import Duels
from services.racer.race import Racer

SERVICE = "racer"
# Each race holds a slot for its whole stream, so this bounds concurrent races per process.
MAX_CONCURRENT_RACES = 1024


async def setup(service: Service) -> None:
    settings = service.settings
    duels = None
    if settings.duel_fraction > 0:
        # Judges are drawn from the live hosts, so the racer watches them too.
        hosts = HostDirectory(
            stale_after_s=settings.host_stale_after_s, min_version=settings.min_host_version
        )
        await hosts.start(service.nc, service.js)
        service.on_stop(hosts.stop)
        stakes = StakeBook()
        await stakes.start(service.js)
        service.on_stop(stakes.stop)
        duels = Duels(service.nc, service.js, service.instance_id, hosts, settings, stakes=stakes)
        service.on_stop(duels.stop)
    racer = Racer(
        service.instance_id,
        max_continuations=settings.max_continuations,
        fallback_first_token_ms=settings.fallback_first_token_ms,
        duels=duels,
        silence_probe_fraction=settings.silence_probe_fraction,
    )
    await racer.start(service)

    async def race(msg: Msg) -> None:
        await racer.run_choices(TaskAssignment.FromString(msg.data), lambda: service.claim(msg))

    async def resume(msg: Msg) -> None:
        await racer.resume(RaceResume.FromString(msg.data), lambda: service.claim(msg))

    # Claimed once recorded (a race's record, a resume's claim on the dead race's record): a
    # racer that dies before has it redelivered to a replica, one that dies after has it
    # resumed by the ingress or aggregator from the record. Never replayed once claimed: its
    # client already has a stream in flight.
    await service.consume(
        subjects.PIPELINE_RACER,
        subjects.CONSUMER_RACER,
        race,
        max_concurrency=MAX_CONCURRENT_RACES,
        claims=True,
    )
    await service.consume(
        subjects.PIPELINE_RESUME,
        subjects.CONSUMER_RACER_RESUME,
        resume,
        max_concurrency=MAX_CONCURRENT_RACES,
        claims=True,
    )


def main() -> None:
    serve(SERVICE, setup)
