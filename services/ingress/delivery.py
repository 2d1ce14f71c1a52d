"""What each request's client received, reported to accounting (`DeliveryReport` on the
settlements stream), so a request is billed for that, whichever process died: a report when
the request starts (nothing delivered yet), one a `CHECKPOINT_S` while a stream runs, and a
final one when it ends. A batch of deltas counts as delivered once the response has taken it
and asked for the next (for a stream: its bytes were sent)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.ledger.deliveries import CHECKPOINT_S
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent
from llooma.v1.settlement_pb2 import DeliveryReport


class DeliveryReporter:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._sending: set[asyncio.Task[None]] = set()

    def _send(self, report: DeliveryReport, sequence: int) -> None:
        """Off the response's path; a lost report bills the request as its last one said."""
        report.sent_unix_nanos = time.time_ns()
        task = asyncio.create_task(
            bus.hand_off(
                self._js,
                subjects.SETTLEMENT_DELIVERY,
                report.SerializeToString(),
                f"{report.request_id}.delivery.{sequence}",
            )
        )
        bus.keep_task(self._sending, task, "delivery report")

    def nothing_delivered(self, chat: ChatRequest) -> None:
        """The request failed before its first token: the client got nothing."""
        report = DeliveryReport(
            request_id=chat.request_id,
            api_key_id=chat.api_key_id,
            stream=chat.stream,
            final=True,
            failed=True,
        )
        self._send(report, 0)

    def watch(
        self, chat: ChatRequest, batches: AsyncGenerator[list[ClientEvent]]
    ) -> AsyncGenerator[list[ClientEvent]]:
        """Pass the request's events through, reporting what the response took of them."""
        return self._watch(chat, batches)

    async def _watch(
        self, chat: ChatRequest, batches: AsyncGenerator[list[ClientEvent]]
    ) -> AsyncGenerator[list[ClientEvent]]:
        report = DeliveryReport(
            request_id=chat.request_id, api_key_id=chat.api_key_id, stream=chat.stream
        )
        sequence = 0
        self._send(report, sequence)
        checkpoint_at = time.monotonic() + CHECKPOINT_S
        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    # A whole answer is the client's once the JSON body is built from it; a
                    # stream's batch once the response asks for the next (its bytes were sent).
                    if not chat.stream:
                        _count(report, batch)
                    yield batch
                    if chat.stream:
                        _count(report, batch)
                    if time.monotonic() >= checkpoint_at:
                        sequence += 1
                        checkpoint = DeliveryReport()
                        checkpoint.CopyFrom(report)
                        self._send(checkpoint, sequence)
                        checkpoint_at = time.monotonic() + CHECKPOINT_S
        finally:
            report.final = True
            self._send(report, sequence + 1)


def _count(report: DeliveryReport, batch: list[ClientEvent]) -> None:
    for event in batch:
        kind = event.WhichOneof("event")
        if kind == "delta":
            report.delivered_tokens += 1
        elif kind == "finished":
            report.complete = True
        elif kind == "failed":
            report.failed = True
