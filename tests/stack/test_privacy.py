"""The privacy mediator end to end: no host sees the user's identifiers, the user gets them."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects
from llooma.stack import Stack
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.pipeline_pb2 import ClientEvent
from tests.conftest import AUTH, PRIVACY_OFF_KEY
from tests.stack.test_race import wait_listed
from tests.support.scripted_host import Reply, ScriptedHost

PII = {
    "name": "John Smith",
    "email": "john.smith@example.com",
    "phone": "+1 415-555-2671",
    "card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ssn": "536-22-1187",
    "ip": "203.0.113.42",
    "key": "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
}
PROMPT = (
    f"Hello, my name is {PII['name']}. Write to {PII['email']} or call {PII['phone']}. "
    f"Charge card {PII['card']}, or wire to {PII['iban']}. My SSN is {PII['ssn']}; "
    f"I log in from {PII['ip']} with the key {PII['key']}."
)
HOST_BOUND = (
    f"{subjects.PREFIX}.cap.",
    f"{subjects.PREFIX}.host.",
    subjects.PIPELINE_PLANNER,
    subjects.PIPELINE_DISPATCHER,
    subjects.PIPELINE_RACER,
    subjects.SETTLEMENT_TASK,
    subjects.RACE_EVENT,
)


class Observer:
    def __init__(self) -> None:
        self.host_bound: list[tuple[str, bytes]] = []

    async def on_message(self, msg: Msg) -> None:
        if msg.subject.startswith(HOST_BOUND):
            self.host_bound.append((msg.subject, msg.data))

    def leaks(self) -> list[str]:
        return [
            f"{kind} on {subject}"
            for subject, data in self.host_bound
            for kind, value in PII.items()
            if value.encode() in data
        ]


@pytest.fixture
async def observer(nc: Client) -> Observer:
    watching = Observer()
    await nc.subscribe(">", cb=watching.on_message)
    await nc.flush()
    return watching


async def streamed(http: httpx.AsyncClient, headers: dict[str, str]) -> str:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    pieces = []
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        import orjson

        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                if event.get("choices"):
                    pieces.append(event["choices"][0]["delta"].get("content", ""))
    return "".join(pieces)


async def test_no_identifier_reaches_a_host_and_the_client_gets_them_all_back(
    http: httpx.AsyncClient, observer: Observer
) -> None:
    assert await streamed(http, AUTH) == PROMPT
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": PROMPT}]},
        headers=AUTH,
    )
    assert response.json()["choices"][0]["message"]["content"] == PROMPT
    await asyncio.sleep(0.3)
    tasks = [data for subject, data in observer.host_bound if ".cap." in subject]
    assert tasks, "the observer saw the tasks the hosts were sent"
    assert any(b"[EMAIL_1]" in data for data in tasks), "hosts got placeholders"
    assert observer.leaks() == []


async def test_strict_mode_also_hides_quasi_identifiers(
    http: httpx.AsyncClient, observer: Observer
) -> None:
    prompt = "I am 42 years old and I work at Initech. " + PROMPT
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": prompt}]},
        headers={**AUTH, "x-llooma-privacy": "strict"},
    )
    assert response.json()["choices"][0]["message"]["content"] == prompt
    await asyncio.sleep(0.3)
    tasks = [data for subject, data in observer.host_bound if ".cap." in subject]
    assert any(b"[AGE_1]" in data for data in tasks)
    assert not any(b"Initech" in data for data in tasks)


async def test_a_key_with_privacy_off_sends_text_as_is(
    http: httpx.AsyncClient, observer: Observer, stack: Stack
) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": PROMPT}]},
        headers={"Authorization": f"Bearer {PRIVACY_OFF_KEY}"},
    )
    assert response.json()["choices"][0]["message"]["content"] == PROMPT
    await asyncio.sleep(0.3)
    tasks = [data for subject, data in observer.host_bound if ".cap." in subject]
    assert any(PII["email"].encode() in data for data in tasks)


async def test_nul_and_typed_placeholders_round_trip_exactly(
    http: httpx.AsyncClient, observer: Observer
) -> None:
    # NUL reaches the host and comes back (the racer strips terminal controls, not NUL); a
    # placeholder the user typed comes back as typed, not as someone's value or a neutral word.
    prompt = "a\x00b, the template says [EMAIL_1] and [NAME_2]; mine is jo@example.com\x00"
    for stream in (False, True):
        body: dict[str, object] = {
            "model": "echo",
            "messages": [{"role": "user", "content": prompt}],
        }
        if stream:
            assert await streamed_body(http, body) == prompt
        else:
            response = await http.post("/v1/chat/completions", json=body, headers=AUTH)
            assert response.json()["choices"][0]["message"]["content"] == prompt
    await asyncio.sleep(0.3)
    tasks = [data for subject, data in observer.host_bound if ".cap." in subject]
    assert any(b"a\x00b" in data and b"[EMAIL_2]" in data for data in tasks)
    assert not any(b"jo@example.com" in data for data in tasks)


async def streamed_body(http: httpx.AsyncClient, body: dict[str, object]) -> str:
    import orjson

    pieces = []
    async with http.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                if event.get("choices"):
                    pieces.append(event["choices"][0]["delta"].get("content", ""))
    return "".join(pieces)


async def test_a_repeated_mapping_neither_fails_nor_breaks_the_answer(
    http: httpx.AsyncClient, nc: Client
) -> None:
    """Privacy's hand-off redelivered (its ack lost in a node kill) sends the mapping again:
    before `started` that was a 500, after it an error event in the stream."""
    model = f"repeat-{uuid.uuid4().hex[:6]}"
    words = ["Dear", " John", " Smith,", " thanks", " for", " writing."]

    async def slow_answer(task: HostTask, reply: Reply) -> None:
        await asyncio.sleep(0.6)  # the first repeat lands before `started`
        for word in words:
            await reply(HostChunk(token=HostToken(text=word)))
            await asyncio.sleep(0.15)  # the second lands mid-stream
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    mappings: asyncio.Queue[Msg] = asyncio.Queue()

    async def watch(msg: Msg) -> None:
        if ClientEvent.FromString(msg.data).WhichOneof("event") == "mapping":
            mappings.put_nowait(msg)

    subscription = await nc.subscribe(f"{subjects.PREFIX}.reply.>", cb=watch)
    try:
        async with ScriptedHost(nc, f"host-{model}", model, slow_answer, accept=True):
            await wait_listed(http, model)
            body = {
                "model": model,
                "stream": True,
                "messages": [{"role": "user", "content": "I am John Smith, hello."}],
            }
            lines: list[str] = []

            async def read() -> int:
                async with http.stream(
                    "POST", "/v1/chat/completions", json=body, headers=AUTH
                ) as reply:
                    lines.extend([line async for line in reply.aiter_lines() if line])
                    return reply.status_code

            reading = asyncio.create_task(read())
            first = await asyncio.wait_for(mappings.get(), timeout=10)
            await nc.publish(first.subject, first.data)
            await asyncio.sleep(0.9)
            await nc.publish(first.subject, first.data)
            status = await asyncio.wait_for(reading, timeout=20)
    finally:
        await subscription.unsubscribe()
    assert status == 200, lines
    assert lines[-1] == "data: [DONE]", lines
    assert not [line for line in lines if '"error"' in line], lines
    text = "".join(
        orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in lines[:-1]
        if orjson.loads(line[6:])["choices"]
    )
    assert text == "".join(words)


async def test_nothing_redacted_sends_no_mapping_and_invented_placeholders_still_go(
    http: httpx.AsyncClient, nc: Client
) -> None:
    """A prompt with nothing to redact costs the ingress no mapping message on the request's
    path; a placeholder the model makes up still becomes a neutral word (with privacy on)."""
    model = f"invent-{uuid.uuid4().hex[:6]}"

    async def invent(task: HostTask, reply: Reply) -> None:
        await reply(HostChunk(token=HostToken(text="[NAME_1] said hi")))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    mappings: list[bytes] = []

    async def watch(msg: Msg) -> None:
        if ClientEvent.FromString(msg.data).WhichOneof("event") == "mapping":
            mappings.append(msg.data)

    subscription = await nc.subscribe(f"{subjects.PREFIX}.reply.>", cb=watch)
    try:
        async with ScriptedHost(nc, f"host-{model}", model, invent, accept=True):
            await wait_listed(http, model)
            body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
            texts = {}
            for name, headers in (
                ("on", AUTH),
                ("off", {"Authorization": f"Bearer {PRIVACY_OFF_KEY}"}),
            ):
                for stream in (False, True):
                    response = await http.post(
                        "/v1/chat/completions", json={**body, "stream": stream}, headers=headers
                    )
                    assert response.status_code == 200, response.text
                    if stream:
                        events = [
                            orjson.loads(line[6:])
                            for line in response.text.splitlines()
                            if line.startswith("data: {")
                        ]
                        text = "".join(
                            e["choices"][0]["delta"].get("content") or ""
                            for e in events
                            if e["choices"]
                        )
                    else:
                        text = response.json()["choices"][0]["message"]["content"]
                    texts[name, stream] = text
            await nc.flush()
    finally:
        await subscription.unsubscribe()
    assert texts == {
        ("on", False): "Someone said hi",
        ("on", True): "Someone said hi",
        ("off", False): "[NAME_1] said hi",
        ("off", True): "[NAME_1] said hi",
    }
    assert mappings == []
