"""Composition root of the dispatcher service."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from llooma import subjects
from llooma.ledger.stakes import StakeBook
from llooma.membership import HostDirectory
from llooma.service import Service, serve
from services.dispatcher.handlers import Dispatcher
from services.dispatcher.heartbeats import HostHeartbeatIntake
from services.dispatcher.quality import DuelQualityFeed

log = logging.getLogger(__name__)

SERVICE = "dispatcher"
# A day of duel results replays in well under a second; past this a stuck replay goes on in
# the background rather than keep the dispatcher from serving.
REPLAY_WAIT_S = 30.0


async def setup(service: Service) -> None:
    settings = service.settings
    hosts = HostDirectory(
        stale_after_s=settings.host_stale_after_s, min_version=settings.min_host_version
    )
    await hosts.start(service.nc, service.js)
    service.on_stop(hosts.stop)
    # Hosts' heartbeats, checked, into the hosts bucket (one replica takes each).
    intake = HostHeartbeatIntake(service.nc, hosts)
    await service.subscribe_queue(subjects.HOST_HEARTBEAT_ANY, "host-heartbeats", intake.handle)
    await service.subscribe_queue(
        subjects.HOSTS_DISCONNECTED, "host-disconnects", intake.disconnected
    )
    # Hosts are drawn by the stake they locked in the ledger, as accounting publishes it.
    stakes = StakeBook()
    await stakes.start(service.js)
    service.on_stop(stakes.stop)
    dispatcher = Dispatcher(settings, hosts, service.nc, service.js, service.instance_id, stakes)
    await service.subscribe(dispatcher.dag.done_subject, dispatcher.dag.on_node_done)
    # Every dispatcher replica learns from every race, so no queue group.
    await service.subscribe(subjects.RACE_EVENT, dispatcher.on_race_event)
    # Duel results make the host quality term of S(h); likewise every replica. Those of the
    # replay window are counted before this dispatcher takes a request.
    quality = DuelQualityFeed(dispatcher.stats, settings.duel_quality_replay_s)
    await quality.start(service.js)
    service.on_stop(quality.stop)
    if not await quality.wait_caught_up(REPLAY_WAIT_S):
        log.warning("duel quality replay unfinished after %.0f s; taking requests", REPLAY_WAIT_S)
    dag = dispatcher.dag
    # The aggregator takes a dispatcher running DAGs for dead after 2 missed busy beats.
    service.holds_work = dag.running

    async def on_request_cancel(msg: Msg) -> None:
        dag.on_request_cancel(subjects.request_cancel_request_id(msg.subject))

    await service.subscribe(subjects.REQUEST_CANCEL_ANY, on_request_cancel)
    await service.consume(
        subjects.PIPELINE_DISPATCHER, subjects.CONSUMER_DISPATCHER, dispatcher.handle
    )
    # Only a dispatcher that takes requests runs on the DAG of one that died.
    await service.subscribe_queue(subjects.DAG_RESUME, "dag-resume", dag.on_resume)


def main() -> None:
    serve(SERVICE, setup)
