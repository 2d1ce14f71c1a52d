"""A host that follows a script over real NATS: for faults no honest worker would produce."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from llooma import subjects
from llooma.settings import VERSION
from llooma.v1.host_pb2 import (
    HostAccepted,
    HostChunk,
    HostHeartbeat,
    HostTask,
    ModelCapability,
)

Reply = Callable[[HostChunk], Awaitable[None]]
Script = Callable[[HostTask, Reply], Coroutine[Any, Any, None]]


class ScriptedHost:
    def __init__(
        self,
        nc: Client,
        host_id: str,
        model: str,
        script: Script,
        *,
        stake: float = 1.0,
        accept: bool = False,
    ) -> None:
        self.stake = stake
        # Send `accepted` before the script's first chunk, as a real HostWorker does.
        self.accept = accept
        self.nc = nc
        self.host_id = host_id
        self.model = model
        self.script = script
        self.received: list[HostTask] = []
        self.draining = False
        self._subscription: Subscription | None = None
        self._beat: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ScriptedHost:
        self._subscription = await self.nc.subscribe(
            subjects.host_task(self.model, self.host_id), cb=self._on_task
        )
        await self.heartbeat()
        self._beat = asyncio.create_task(self._beat_loop())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        if self._subscription is not None:
            await self._subscription.unsubscribe()
        await self.nc.publish(subjects.kv_put_subject(subjects.HOSTS_BUCKET, self.host_id), b"")

    async def heartbeat(self) -> None:
        beat = HostHeartbeat(
            version=VERSION,
            models=[ModelCapability(name=self.model, capacity=64, stake=self.stake)],
            stake=1.0,
            sent_unix_nanos=time.time_ns(),
            draining=self.draining,
        )
        await self.nc.publish(
            subjects.kv_put_subject(subjects.HOSTS_BUCKET, self.host_id), beat.SerializeToString()
        )
        await self.nc.flush()

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(0.3)
            await self.heartbeat()

    async def _on_task(self, msg: Msg) -> None:
        task = HostTask.FromString(msg.data)
        self.received.append(task)
        reply_subject = msg.reply

        async def reply(chunk: HostChunk) -> None:
            await self.nc.publish(reply_subject, chunk.SerializeToString())

        if self.accept:
            await reply(HostChunk(seq=0, accepted=HostAccepted()))
        running: asyncio.Task[None] = asyncio.create_task(self.script(task, reply))
        self._running.add(running)
        running.add_done_callback(self._running.discard)
