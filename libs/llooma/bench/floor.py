"""The floor: the request path's process crossings with no logic in them, to learn what the
design's shape costs before any of LLooMA's own work.

The same processes and hops as a directly routed, streamed request through the stack at race
width 1 (docs/ARCHITECTURE.md, "Direct path"), each doing only what it cannot leave out:

- ingress: Starlette on uvicorn (uvloop, httptools) checks the bearer key, parses the body,
  hands the request on and writes each chunk of text it hears on its reply subject as an
  OpenAI SSE event;
- privacy, then dispatcher: each takes the request, hands it on and acks it. A hand-off
  (`HandOffs`) is the stack's, JetStream (memory work-queue stream, `Nats-Msg-Id`, the
  sender waits for the stream's ack; a durable push consumer with a deliver group and
  explicit acks), or, with `--hand-offs core`, core request-reply;
- racer: takes the task the same way; it sends the task to the host over core NATS with its tokens
  subject as the reply, relays each chunk of tokens to the ingress as it comes, and hands one
  settlement to a file stream (fsynced, as the stack's) with `Nats-Msg-Id`;
- host: a core subscription; it streams the chat completion from the upstream over the
  host's own keep-alive client (`llooma.host.http`), parses each SSE line and publishes the
  texts of one read as one message;
- accounting: a durable pull consumer that writes each batch of settlements to Postgres in
  one statement and acks them.

No redaction, planning, selection, race, duel, metrics, tracing, limits, delivery reports,
race records or ledger: the difference between a stack process and its floor process is the
cost of that work. `llooma.bench.peers` runs the floor beside LLooMA and the LiteLLM proxy.

Each role runs in its own process: `python -m llooma.bench.floor ROLE --nats URL ...`;
`Floor` starts them all, with a nats-server and a Postgres of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import nats
import orjson
import uvicorn
import uvloop
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llooma.embedded import EmbeddedNats, EmbeddedPostgres
from llooma.host.http import HttpPool
from llooma.host.ready import ready_batches
from llooma.processes import die_with_parent, free_port, wait_for_port

API_KEY = "sk-floor"
ROLES = ("ingress", "privacy", "dispatcher", "racer", "host", "accounting")
HAND_OFFS = ("jetstream", "core")
_PIPELINE = "floor.pipeline"
_SETTLEMENTS = "floor.settlement.task"
_NEXT = {"privacy": "dispatcher", "dispatcher": "racer"}
_END = b""  # the last message of a stream of chunks
_SSE_HEAD = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":'
_SSE_TAIL = b"}}]}\n\n"


async def _ready_chunks(queue: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
    """A stream's chunks (JSON arrays of texts) until its end, those already queued together
    joined into one array without parsing them, as the stack's racer and ingress coalesce."""
    while (chunk := await queue.get()) != _END:
        ready = [chunk]
        while not queue.empty() and (chunk := queue.get_nowait()) != _END:
            ready.append(chunk)
        yield ready[0] if len(ready) == 1 else b"[" + b",".join(c[1:-1] for c in ready) + b"]"
        if chunk == _END:
            return


async def _connect(url: str) -> Client:
    return await nats.connect(url, max_reconnect_attempts=-1)


class HandOffs:
    """How the pipeline's steps reach the next service: JetStream, as the stack does (a stream
    write acked to the sender, a durable consumer acked by the taker), or core request-reply
    (the taker answers once it took the message; nothing outlives a crash)."""

    def __init__(self, nc: Client, kind: str) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.kind = kind

    async def send(self, role: str, data: bytes) -> None:
        if self.kind == "core":
            await self._nc.request(f"floor.core.{role}", data, timeout=10.0)
            return
        request_id = _request_id(data)
        headers = {"Nats-Msg-Id": f"{request_id}.{role}"}
        await self._js.publish(f"{_PIPELINE}.{role}", data, headers=headers)

    async def take(self, role: str, handle: Callable[[bytes], Awaitable[None]]) -> None:
        """Run `handle` on each message for `role`; the message is acked once it returns."""

        async def on_message(msg: Msg) -> None:
            await handle(msg.data)
            if self.kind == "core":
                await msg.respond(b"")
            else:
                await msg.ack()

        if self.kind == "core":
            await self._nc.subscribe(f"floor.core.{role}", queue=role, cb=on_message)
            return
        config = ConsumerConfig(
            durable_name=role,
            deliver_group=role,
            deliver_subject=f"floor.deliver.{role}",
            filter_subject=f"{_PIPELINE}.{role}",
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=256,
        )
        await self._js.add_consumer("FLOOR_PIPELINE", config=config)
        await self._js.subscribe(
            f"{_PIPELINE}.{role}",
            queue=role,
            durable=role,
            cb=on_message,
            manual_ack=True,
            config=config,
            pending_msgs_limit=4096,
        )


def _request_id(data: bytes) -> str:
    """The request id: the last token of the reply subject on the message's first line."""
    return data[: data.index(b"\n")].rpartition(b".")[2].decode()


async def relay(url: str, role: str, kind: str) -> None:
    """privacy and dispatcher: take the request, hand it on, ack."""
    hand_offs = HandOffs(await _connect(url), kind)
    after = _NEXT[role]

    async def handle(data: bytes) -> None:
        await hand_offs.send(after, data)

    await hand_offs.take(role, handle)
    await asyncio.Event().wait()


async def racer(url: str, kind: str) -> None:
    """Send the task to the host, relay its chunks to the ingress, settle once."""
    nc = await _connect(url)
    js = nc.jetstream()
    hand_offs = HandOffs(nc, kind)
    streams: dict[str, asyncio.Queue[bytes]] = {}

    async def on_tokens(msg: Msg) -> None:
        queue = streams.get(msg.subject.rpartition(".")[2])
        if queue is not None:
            queue.put_nowait(msg.data)

    await nc.subscribe("floor.tokens.*", cb=on_tokens)

    async def race(data: bytes) -> None:
        reply_subject, _, task = data.partition(b"\n")
        reply = reply_subject.decode()
        attempt = reply.rpartition(".")[2]
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        streams[attempt] = queue
        messages = 0
        try:
            await nc.publish("floor.cap.host", task, reply=f"floor.tokens.{attempt}")
            async for chunk in _ready_chunks(queue):
                messages += 1
                await nc.publish(reply, chunk)
            await nc.publish(reply, _END)
        finally:
            del streams[attempt]
        settlement = orjson.dumps({"attempt_id": attempt, "host": "host", "messages": messages})
        await js.publish(_SETTLEMENTS, settlement, headers={"Nats-Msg-Id": attempt})

    async def handle(data: bytes) -> None:
        # Taken at once (the stack's racer claims a race before it runs it), run on its own.
        task = asyncio.create_task(race(data))
        running.add(task)
        task.add_done_callback(running.discard)

    running: set[asyncio.Task[None]] = set()
    await hand_offs.take("racer", handle)
    await asyncio.Event().wait()


async def host(url: str, upstream_url: str) -> None:
    """Stream each task from the upstream; one message per read of it."""
    nc = await _connect(url)
    pool = HttpPool(upstream_url, max_connections=256)
    headers = "Content-Type: application/json\r\n"

    async def texts(msg: Msg) -> AsyncIterator[str]:
        async with pool.request("POST", "/chat/completions", msg.data, headers) as response:
            async for data in response.body():
                for line in data.split(b"\n"):
                    if line.startswith(b"data: {"):
                        for choice in orjson.loads(line[6:])["choices"]:
                            if text := choice["delta"].get("content"):
                                yield text

    async def serve(msg: Msg) -> None:
        async for batch in ready_batches(texts(msg)):
            await nc.publish(msg.reply, orjson.dumps(batch))
        await nc.publish(msg.reply, _END)

    tasks: set[asyncio.Task[None]] = set()

    async def on_task(msg: Msg) -> None:
        task = asyncio.create_task(serve(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe("floor.cap.host", cb=on_task)
    await asyncio.Event().wait()


async def accounting(url: str, database_url: str) -> None:
    """Write each batch of settlements in one statement, then ack them."""
    nc = await _connect(url)
    js = nc.jetstream()
    db = await asyncpg.connect(database_url)
    pull = await js.pull_subscribe(_SETTLEMENTS, durable="accounting", stream="FLOOR_SETTLEMENTS")
    while True:
        try:
            batch = await pull.fetch(256, timeout=5.0)
        except nats.errors.TimeoutError:
            continue
        rows = [orjson.loads(msg.data) for msg in batch]
        await db.execute(
            "INSERT INTO settlements (attempt_id, host_id, messages) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::int[]) "
            "ON CONFLICT (attempt_id) DO NOTHING",
            [row["attempt_id"] for row in rows],
            [row["host"] for row in rows],
            [row["messages"] for row in rows],
        )
        for msg in batch:
            await msg.ack()


def ingress_app(url: str, kind: str) -> Starlette:
    state: dict[str, HandOffs] = {}
    streams: dict[str, asyncio.Queue[bytes]] = {}
    numbers = itertools.count()
    bearer = f"Bearer {API_KEY}"

    async def on_reply(msg: Msg) -> None:
        queue = streams.get(msg.subject.rpartition(".")[2])
        if queue is not None:
            queue.put_nowait(msg.data)

    async def chat(request: Request) -> Response:
        if request.headers.get("authorization") != bearer:
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = orjson.loads(await request.body())
        request_id = f"r{next(numbers)}"
        upstream_body = orjson.dumps(
            {"model": "bench", "messages": body["messages"], "stream": True}
        )
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        streams[request_id] = queue
        task = f"floor.reply.ingress.{request_id}\n".encode() + upstream_body
        await state["hand_offs"].send("privacy", task)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in _ready_chunks(queue):
                    yield b"".join(
                        _SSE_HEAD + orjson.dumps(text) + _SSE_TAIL for text in orjson.loads(chunk)
                    )
                yield b"data: [DONE]\n\n"
            finally:
                del streams[request_id]

        return StreamingResponse(events(), media_type="text/event-stream")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nc = await _connect(url)
        state["hand_offs"] = HandOffs(nc, kind)
        await nc.subscribe("floor.reply.ingress.*", cb=on_reply)
        yield

    return Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan
    )


async def _topology(url: str, database_url: str) -> None:
    nc = await _connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="FLOOR_PIPELINE",
            subjects=[f"{_PIPELINE}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.MEMORY,
            duplicate_window=120.0,
        )
    )
    await js.add_stream(
        StreamConfig(
            name="FLOOR_SETTLEMENTS",
            subjects=[_SETTLEMENTS],
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    await nc.close()
    db = await asyncpg.connect(database_url)
    await db.execute(
        "CREATE TABLE IF NOT EXISTS settlements "
        "(attempt_id text PRIMARY KEY, host_id text NOT NULL, messages int NOT NULL)"
    )
    await db.close()


@dataclass
class Floor:
    """The floor's processes, started by `start` and stopped by `stop`."""

    scratch: Path
    upstream_url: str
    hand_offs: str = "jetstream"
    http_port: int = field(default_factory=free_port)
    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        try:
            self.nats = EmbeddedNats.start(self.scratch / "nats")
            self.postgres = EmbeddedPostgres(self.scratch / "postgres")
            asyncio.run(_topology(self.nats.url, self.postgres.url))
            for role in ROLES:
                args = [sys.executable, "-m", "llooma.bench.floor", role, "--nats", self.nats.url]
                args += ["--upstream", self.upstream_url, "--database", self.postgres.url]
                args += ["--port", str(self.http_port), "--hand-offs", self.hand_offs]
                log = (self.scratch / f"{role}.log").open("ab")
                self.children[role] = subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
                )
                log.close()
            wait_for_port(self.http_port, 30.0, self.children["ingress"])
            self._wait_answering(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_answering(self, timeout_s: float) -> None:
        """Until a streamed request is answered whole: every role has subscribed."""
        body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = f"http://127.0.0.1:{self.http_port}/v1/chat/completions"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                answer = httpx.post(url, json=body, headers=headers, timeout=5.0)
                if answer.text.endswith("data: [DONE]\n\n"):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the floor did not answer in {timeout_s:.0f} s")
            time.sleep(0.2)

    def processes(self) -> dict[str, int]:
        """Each process by name, as `peers.process_names` names the stack's."""
        found = {role: child.pid for role, child in self.children.items()}
        if self.nats is not None:
            found["nats-server"] = self.nats.process.pid
        if self.postgres is not None and (pid := self.postgres.pid()) is not None:
            found["postgres"] = pid
        return found

    def stop(self) -> None:
        for child in self.children.values():
            child.terminate()
        for child in self.children.values():
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        self.children.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hand-offs", choices=HAND_OFFS, default="jetstream")
    args = parser.parse_args()
    if args.role == "ingress":
        config = uvicorn.Config(
            ingress_app(args.nats, args.hand_offs),
            host="127.0.0.1",
            port=args.port,
            loop="none",
            http="httptools",
            log_level="warning",
            access_log=False,
        )
        uvloop.run(uvicorn.Server(config).serve())
    elif args.role in _NEXT:
        uvloop.run(relay(args.nats, args.role, args.hand_offs))
    elif args.role == "racer":
        uvloop.run(racer(args.nats, args.hand_offs))
    elif args.role == "host":
        uvloop.run(host(args.nats, args.upstream))
    else:
        uvloop.run(accounting(args.nats, args.database))


if __name__ == "__main__":
    main()
