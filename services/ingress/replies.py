"""Routes ClientEvent messages from one wildcard subscription to the request waiting for them."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects
from llooma.v1.common_pb2 import ERROR_CODE_CONTROL_PLANE_UNAVAILABLE, ErrorDetail
from llooma.v1.pipeline_pb2 import ClientEvent

# What every open request is told when the connection that brings its events breaks: events
# published to it until the reconnect are gone, so waiting on would end in a slow timeout, and
# going on after a gap would hand the client an answer with a hole in it.
CONNECTION_LOST = ClientEvent(
    failed=ErrorDetail(
        code=ERROR_CODE_CONTROL_PLANE_UNAVAILABLE,
        message="the ingress lost its connection to the control plane; retry the request",
    )
).SerializeToString()


class ReplyRouter:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._waiting: dict[str, asyncio.Queue[bytes]] = {}
        # A resumed request hears only its latest racer (subjects.client_reply's generation).
        self._generation: dict[str, int] = {}

    async def start(self, nc: Client) -> None:
        prefix = subjects.client_reply_prefix(self.instance_id)
        await nc.subscribe(f"{prefix}.*", cb=self._route)

    def subject_for(self, request_id: str) -> str:
        return subjects.client_reply(self.instance_id, request_id)

    def open(self, request_id: str) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def reroute(self, request_id: str) -> str:
        """A new reply subject for an open request, whose racer is being replaced: from now
        on events on the old one are dropped (that racer, if only slow, no longer speaks to
        the client), and those already queued from it are discarded."""
        generation = self._generation.get(request_id, 0) + 1
        self._generation[request_id] = generation
        queue = self._waiting[request_id]
        while not queue.empty():
            queue.get_nowait()
        return subjects.client_reply(self.instance_id, request_id, generation)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def close(self, request_id: str) -> bool:
        """Stop routing to the request; True if it was still open."""
        self._generation.pop(request_id, None)
        return self._waiting.pop(request_id, None) is not None

    def connection_lost(self) -> int:
        """End every open request (nats-py's disconnect callback); how many were open."""
        for queue in self._waiting.values():
            queue.put_nowait(CONNECTION_LOST)
        return len(self._waiting)

    async def _route(self, msg: Msg) -> None:
        request_id, generation = subjects.client_reply_route(msg.subject)
        queue = self._waiting.get(request_id)
        if queue is not None and generation == self._generation.get(request_id, 0):
            queue.put_nowait(msg.data)
