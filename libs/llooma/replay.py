"""Replay, then follow: one ordered JetStream consumer that delivers a subject's messages of
the last `replay_s` seconds (0: none), then live ones, each decoded and handed to a callback.

Replay and live traffic come through the same consumer, in stream order, so a message
published between the two is neither missed nor counted twice. Ordered consumers need no
acks and keep no durable state; after a gap nats-py resumes after the last stream sequence
it delivered. The dispatcher's duel quality and the ingress's metrics both start this way."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class Replay(Generic[M]):
    def __init__(
        self,
        subject: str,
        stream: str,
        parse: Callable[[bytes], M],
        handle: Callable[[M], None],
        replay_s: float,
    ) -> None:
        self._subject = subject
        self._stream = stream
        self._parse = parse
        self._handle = handle
        self._replay_s = replay_s
        self._delivered = 0
        self._subscription: JetStreamContext.PushSubscription | None = None
        self.caught_up = asyncio.Event()

    async def _on_message(self, msg: Msg) -> None:
        self._delivered += 1
        try:
            message = self._parse(msg.data)
        except DecodeError:
            log.warning("undecodable message on %s", msg.subject)
        else:
            self._handle(message)
        # Once caught up, live messages skip the metadata parse.
        if not self.caught_up.is_set() and msg.metadata.num_pending == 0:
            self.caught_up.set()

    async def start(self, js: JetStreamContext) -> None:
        replay = self._replay_s > 0
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=self._replay_s)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME if replay else api.DeliverPolicy.NEW,
            opt_start_time=since if replay else None,
        )
        self._subscription = await js.subscribe(
            self._subject,
            stream=self._stream,
            cb=self._on_message,
            ordered_consumer=True,
            config=config,
        )
        info = await self._subscription.consumer_info()
        # Nothing left to deliver and all that was delivered already handled: the last
        # delivered message (num_pending 0) sets the event otherwise.
        if info.num_pending == 0 and (
            info.delivered is None or (info.delivered.consumer_seq or 0) <= self._delivered
        ):
            self.caught_up.set()

    async def wait_caught_up(self, timeout_s: float) -> bool:
        """True once every message of the window is handled; False if `timeout_s` passed."""
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
