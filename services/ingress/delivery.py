"""What each request's client received, reported to accounting (`DeliveryReport` on the
settlements stream), so a request is billed for that, whichever process died: a report when
the request starts (nothing delivered yet), one a `CHECKPOINT_S` while a stream runs, and a
final one when it ends. A batch of deltas counts as delivered once the response has taken it
and asked for the next (for a stream: its bytes were sent).

The reports of all the ingress's requests go out together: at most one `DeliveryReports`
message every `GATHER_S`, carrying every report made meanwhile (one stream write, fsync and
ack, one message for accounting to take, instead of one for each report); one message is in
flight at a time. A report is off the response's path, and a lost one bills its request as its
last report said, so the 20 ms cost nothing a client sees; an ingress killed within them
loses its last 20 ms of reports, as it loses those in flight."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator

from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.ledger.deliveries import CHECKPOINT_S
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent
from llooma.v1.settlement_pb2 import DeliveryReport, DeliveryReports

log = logging.getLogger(__name__)

GATHER_S = 0.02
MAX_BATCH = 256
# NATS unreachable for long (requests are refused then, but streams under way still report):
# beyond this many waiting reports the oldest are dropped, each request then billed as its
# last report that went out said.
MAX_WAITING = 20_000
# At a stop, the reports still waiting get this long to go out.
CLOSE_S = 5.0


class DeliveryReporter:
    def __init__(self, js: JetStreamContext, instance_id: str) -> None:
        self._js = js
        self._instance_id = instance_id
        self._waiting: deque[DeliveryReport] = deque()
        self._sending: asyncio.Task[None] | None = None
        self._batches = itertools.count()
        self.dropped = 0

    def _send(self, report: DeliveryReport) -> None:
        report.sent_unix_nanos = time.time_ns()
        if len(self._waiting) >= MAX_WAITING:
            self._waiting.popleft()
            self.dropped += 1
        self._waiting.append(report)
        if self._sending is None:
            self._sending = asyncio.create_task(self._send_waiting(), name="delivery-reports")

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                # Before every message, not only a burst's first: under steady load a message
                # sent at once after the last would carry the one report made meanwhile.
                await asyncio.sleep(GATHER_S)
                count = min(MAX_BATCH, len(self._waiting))
                batch = DeliveryReports(reports=[self._waiting.popleft() for _ in range(count)])
                msg_id = f"{self._instance_id}.deliveries.{next(self._batches)}"
                try:
                    await bus.hand_off(
                        self._js, subjects.SETTLEMENT_DELIVERIES, batch.SerializeToString(), msg_id
                    )
                except Exception:
                    log.warning("%d delivery reports not sent", count, exc_info=True)
        finally:
            self._sending = None

    async def close(self) -> None:
        """Send the reports still waiting (a stop: its last requests' final reports)."""
        if self._sending is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._sending), CLOSE_S)
        if self.dropped:
            log.warning("%d delivery reports were dropped while NATS was away", self.dropped)

    def nothing_delivered(self, chat: ChatRequest) -> None:
        """The request failed before its first token: the client got nothing."""
        report = DeliveryReport(
            request_id=chat.request_id,
            api_key_id=chat.api_key_id,
            stream=chat.stream,
            final=True,
            failed=True,
        )
        self._send(report)

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
        self._send(_copy(report))
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
                        self._send(_copy(report))
                        checkpoint_at = time.monotonic() + CHECKPOINT_S
        finally:
            report.final = True
            self._send(report)


def _copy(report: DeliveryReport) -> DeliveryReport:
    """The report as it is now: it waits to be sent while the request runs on."""
    copy = DeliveryReport()
    copy.CopyFrom(report)
    return copy


def _count(report: DeliveryReport, batch: list[ClientEvent]) -> None:
    for event in batch:
        kind = event.WhichOneof("event")
        if kind == "delta":
            report.delivered_tokens += 1
        elif kind == "finished":
            report.complete = True
        elif kind == "failed":
            report.failed = True
