"""A race is settled however its client's cancel lands (services/racer/race.py over an in-memory
RaceIO): the ingress cancels a failed request the moment it reads the failure, which can be
while the racer is still sending the race's last commands, before its `Settle`."""

from __future__ import annotations

import asyncio
from typing import cast

from nats.aio.msg import Msg

from llooma import subjects
from llooma.v1.common_pb2 import ERROR_CODE_HOST_FAILED, ErrorDetail
from llooma.v1.host_pb2 import HostAccepted, HostChunk, HostTask, HostToken
from llooma.v1.pipeline_pb2 import ClientEvent
from llooma.v1.settlement_pb2 import TaskSettlement
from services.racer.race import Racer
from tests.unit.race_sim import Reply, assignment

REQUEST_ID = assignment(["h"]).request.request_id


class ClientCancelsOnFailure:
    """Hosts answer one token, then fail; the client's cancel lands while the failure is
    emitted, as the ingress's does when it reads the failure at once."""

    def __init__(self) -> None:
        self.racer: Racer | None = None
        self.published: dict[str, list[bytes]] = {}
        self.cancelled: list[str] = []

    async def launch(self, host_id: str, task: HostTask, headers: dict[str, str] | None) -> None:
        assert self.racer is not None
        racer = self.racer
        reply = subjects.host_reply("unit", task.attempt_id)

        async def answer() -> None:
            for chunk in (
                HostChunk(seq=0, accepted=HostAccepted()),
                HostChunk(seq=1, token=HostToken(text="one")),
                HostChunk(seq=2, failed=ErrorDetail(code=ERROR_CODE_HOST_FAILED, message="oom")),
            ):
                await racer._on_host_chunk(cast(Msg, Reply(reply, chunk.SerializeToString())))
                await asyncio.sleep(0.01)

        asyncio.get_running_loop().create_task(answer())

    async def cancel(self, host_id: str, attempt_id: str) -> None:
        self.cancelled.append(attempt_id)

    async def emit(self, reply: str, event: ClientEvent) -> None:
        assert self.racer is not None
        if event.HasField("failed"):
            cancel = subjects.request_cancel(REQUEST_ID)
            await self.racer._on_request_cancel(cast(Msg, Reply(cancel, b"")))
            await asyncio.sleep(0)  # the cancel is delivered here, before the race's Settle

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        self.published.setdefault(subject, []).append(payload)


async def test_a_cancel_landing_while_the_failure_is_emitted_does_not_skip_the_settlement() -> None:
    io = ClientCancelsOnFailure()
    racer = Racer("unit", io=io)
    io.racer = racer
    # Its own task, as the racer's consumer runs it: the client's cancel cancels that task.
    await asyncio.wait_for(asyncio.create_task(racer.run(assignment(["h"]))), timeout=10)
    settled = [TaskSettlement.FromString(p) for p in io.published.get(subjects.SETTLEMENT_TASK, [])]
    assert [(s.host_id, s.usage.output_tokens) for s in settled] == [("h", 1)]
    assert len(io.published[subjects.RACE_EVENT]) == 1
