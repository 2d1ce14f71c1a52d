"""Duel quality that survives a dispatcher restart: one ordered consumer on the settlements
stream replays the duel results of the last `duel_quality_replay_s`, then follows live ones.

Replay and live traffic come through the same consumer, in stream order, so a result
published between the two is neither missed nor counted twice."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from llooma import subjects
from llooma.host_stats import HostStats
from llooma.v1.duel_pb2 import DuelResult

log = logging.getLogger(__name__)


class DuelQualityFeed:
    def __init__(self, stats: HostStats, replay_s: float) -> None:
        self._stats = stats
        self._replay_s = replay_s
        self._delivered = 0
        self._subscription: JetStreamContext.PushSubscription | None = None
        self.caught_up = asyncio.Event()

    async def _on_duel(self, msg: Msg) -> None:
        self._delivered += 1
        try:
            self._stats.record_duel(DuelResult.FromString(msg.data))
        except DecodeError:
            log.warning("undecodable duel result on %s", msg.subject)
        # Once caught up, live results skip the metadata parse.
        if not self.caught_up.is_set() and msg.metadata.num_pending == 0:
            self.caught_up.set()

    async def start(self, js: JetStreamContext) -> None:
        replay = self._replay_s > 0
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=self._replay_s)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME if replay else api.DeliverPolicy.NEW,
            opt_start_time=since if replay else None,
        )
        # Ordered: no acks, no durable state, and a gap makes nats-py resume after the last
        # stream sequence it delivered.
        self._subscription = await js.subscribe(
            subjects.SETTLEMENT_DUEL,
            stream=subjects.SETTLEMENT_STREAM,
            cb=self._on_duel,
            ordered_consumer=True,
            config=config,
        )
        info = await self._subscription.consumer_info()
        # Nothing left to deliver and all that was delivered already counted: the last
        # delivered message (num_pending 0) sets the event otherwise.
        if info.num_pending == 0 and (
            info.delivered is None or (info.delivered.consumer_seq or 0) <= self._delivered
        ):
            self.caught_up.set()

    async def wait_caught_up(self, timeout_s: float) -> bool:
        """True once every result of the window is counted; False if `timeout_s` passed."""
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
