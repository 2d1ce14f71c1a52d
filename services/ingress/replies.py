"""Routes ClientEvent messages from one wildcard subscription to the request waiting for them."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects


class ReplyRouter:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._waiting: dict[str, asyncio.Queue[bytes]] = {}

    async def start(self, nc: Client) -> None:
        prefix = subjects.client_reply_prefix(self.instance_id)
        await nc.subscribe(f"{prefix}.*", cb=self._route)

    def subject_for(self, request_id: str) -> str:
        return subjects.client_reply(self.instance_id, request_id)

    def open(self, request_id: str) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def close(self, request_id: str) -> bool:
        """Stop routing to the request; True if it was still open."""
        return self._waiting.pop(request_id, None) is not None

    async def _route(self, msg: Msg) -> None:
        queue = self._waiting.get(subjects.client_reply_request_id(msg.subject))
        if queue is not None:
            queue.put_nowait(msg.data)
