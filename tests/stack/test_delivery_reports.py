"""The ingress's delivery reports go out together (`services/ingress/delivery.py`): the
reports made within the gathering window travel as one `DeliveryReports` message on the
settlements stream, in order, at most `MAX_BATCH` a message; a stop sends what is waiting."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import bus, subjects
from llooma.v1.pipeline_pb2 import ChatRequest, ClientDelta, ClientEvent, ClientFinished
from llooma.v1.settlement_pb2 import DeliveryReport, DeliveryReports
from services.ingress.delivery import MAX_BATCH, DeliveryReporter


class Heard:
    """The batches on the subject whose reports belong to this test's requests."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.batches: list[list[DeliveryReport]] = []

    async def on_message(self, msg: Msg) -> None:
        reports = list(DeliveryReports.FromString(msg.data).reports)
        if reports and reports[0].request_id.startswith(self.run):
            self.batches.append(reports)

    async def until(self, count: int) -> list[list[DeliveryReport]]:
        for _ in range(100):
            if sum(len(batch) for batch in self.batches) >= count:
                break
            await asyncio.sleep(0.05)
        return self.batches


@pytest.fixture
async def heard(nc: Client) -> AsyncIterator[Heard]:
    await bus.ensure_topology(nc.jetstream())
    found = Heard(uuid.uuid4().hex[:8])
    sub = await nc.subscribe(subjects.SETTLEMENT_DELIVERIES, cb=found.on_message)
    yield found
    await sub.unsubscribe()


def chat(run: str, n: int) -> ChatRequest:
    return ChatRequest(request_id=f"{run}-{n:04d}", api_key_id="k", stream=True)


async def test_reports_made_together_go_as_one_message_in_order(nc: Client, heard: Heard) -> None:
    reporter = DeliveryReporter(nc.jetstream(), "ingress-test")
    for n in range(50):
        reporter.nothing_delivered(chat(heard.run, n))
    batches = await heard.until(50)
    assert len(batches) == 1
    assert [r.request_id for r in batches[0]] == [f"{heard.run}-{n:04d}" for n in range(50)]
    assert all(r.final and r.failed and r.sent_unix_nanos for r in batches[0])


async def test_a_burst_larger_than_a_message_goes_in_several(nc: Client, heard: Heard) -> None:
    reporter = DeliveryReporter(nc.jetstream(), "ingress-test")
    for n in range(MAX_BATCH + 10):
        reporter.nothing_delivered(chat(heard.run, n))
    batches = await heard.until(MAX_BATCH + 10)
    assert [len(batch) for batch in batches] == [MAX_BATCH, 10]


async def test_a_stream_reports_its_start_and_what_it_delivered_and_a_stop_sends_it(
    nc: Client, heard: Heard
) -> None:
    reporter = DeliveryReporter(nc.jetstream(), "ingress-test")

    async def events() -> AsyncGenerator[list[ClientEvent]]:
        yield [ClientEvent(delta=ClientDelta(text="a")), ClientEvent(delta=ClientDelta(text="b"))]
        yield [ClientEvent(finished=ClientFinished())]

    async for _ in reporter.watch(chat(heard.run, 0), events()):
        pass
    # Stopped before the gathering window ends: the stop sends both reports.
    await reporter.close()
    batches = await heard.until(2)
    assert len(batches) == 1
    start, final = batches[0]
    assert (start.delivered_tokens, start.final) == (0, False)
    assert (final.delivered_tokens, final.final, final.complete) == (2, True, True)
