"""An OpenAI-compatible chat engine, scripted by what each request asks, on its own thread (so a
stack's host processes can reach it while the test's event loop comes and goes).

It records every request body and streams as llama.cpp and vLLM do: tool calls as
`delta.tool_calls` fragments (the arguments cut in pieces) ending in `finish_reason:
"tool_calls"`; a JSON answer for a `response_format`; `logprobs.content` on every content chunk
when asked. What it sent is kept by request (`sent`), so a test compares what the client got
with what the engine said.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.support.fake_engine import DONE, FakeEngine, Out, Request, event, stream_events

TOOL_ARGUMENTS = ('{"city": ', '"Paris"', "}")
# What it answers a json_schema request: the pieces of a person, or (asked to) a broken one.
PERSON = ('{"name": ', '"Ada", ', '"age": 36}')
BROKEN_PERSON = ('{"name": ', "5}")
BREAK_THE_SCHEMA = "break the schema"
TOOL_RESULT_ANSWER = ("It is ", "sunny ", "in Paris.")
PLAIN = ("Hello", " world")


PLACEHOLDER = re.compile(r"\[[A-Z_]+_[0-9]+\]")


def mail_arguments(placeholder: str) -> tuple[str, ...]:
    return ('{"to": "', placeholder[:4], placeholder[4:] + '"}')


def _chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return event({"id": "up", "object": "chat.completion.chunk", "choices": [choice]})


def tool_fragments(
    name: str, arguments: tuple[str, ...] = TOOL_ARGUMENTS
) -> list[list[dict[str, Any]]]:
    """The `delta.tool_calls` arrays of one call to `name`, as the engine streams them."""
    first = {
        "index": 0,
        "id": "call_up_1",
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    return [[first]] + [[{"index": 0, "function": {"arguments": piece}}] for piece in arguments]


def logprob_entry(token: str, top: int) -> dict[str, Any]:
    alternatives = [
        {"token": token + str(i), "logprob": -1.5 - i, "bytes": list((token + str(i)).encode())}
        for i in range(top)
    ]
    return {
        "token": token,
        "logprob": -0.25,
        "bytes": list(token.encode()),
        "top_logprobs": alternatives,
    }


@dataclass
class ScriptedUpstream:
    engine: FakeEngine = field(default_factory=FakeEngine)
    # By the text of the request's last message: the events streamed back.
    sent: dict[str, list[bytes]] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return self.engine.base_url

    def start(self) -> ScriptedUpstream:
        self.engine.handler = self._answer
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.engine.start(), loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.engine.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()

    def body_with(self, marker: str) -> dict[str, Any]:
        """The chat request whose messages mention `marker` (the last one, if several)."""
        for request in reversed(list(self.engine.requests)):
            if request.path.endswith("/chat/completions") and marker.encode() in request.body:
                body: dict[str, Any] = request.json()
                return body
        raise LookupError(f"no request mentions {marker!r}")

    async def _answer(self, request: Request, out: Out) -> None:
        if request.method == "GET" and request.path.endswith("/models"):
            await out.whole(200, b'{"object": "list", "data": [{"id": "scripted"}]}')
            return
        if not request.path.endswith("/chat/completions"):
            await out.whole(404, b'{"error": {"message": "not here"}}')
            return
        body = request.json()
        events = self._script(body)
        last = body["messages"][-1].get("content") or ""
        self.sent[last] = events
        await stream_events(out, *events, DONE)

    def _script(self, body: dict[str, Any]) -> list[bytes]:
        messages = body["messages"]
        last = messages[-1]
        top = body.get("top_logprobs", 0) if body.get("logprobs") else None
        if body.get("tools") and last["role"] != "tool":
            name = body["tools"][0]["function"]["name"]
            arguments: tuple[str, ...] = TOOL_ARGUMENTS
            placeholder = PLACEHOLDER.search(last["content"] or "")
            if placeholder is not None:
                # What was redacted goes back into the call, cut inside the placeholder.
                arguments = mail_arguments(placeholder.group())
            events = [_chunk({"role": "assistant", "content": None})]
            events += [_chunk({"tool_calls": calls}) for calls in tool_fragments(name, arguments)]
            return [*events, _chunk({}, "tool_calls")]
        response_format = body.get("response_format") or {}
        if last["role"] == "tool":
            pieces: tuple[str, ...] = TOOL_RESULT_ANSWER
        elif response_format.get("type") == "json_schema":
            pieces = BROKEN_PERSON if BREAK_THE_SCHEMA in (last["content"] or "") else PERSON
        elif response_format.get("type") == "json_object":
            pieces = ('{"ok": ', "true}")
        else:
            pieces = PLAIN
        events = []
        for piece in pieces:
            logprobs = {"content": [logprob_entry(piece, top)]} if top is not None else None
            events.append(_chunk({"content": piece}, logprobs=logprobs))
        events.append(_chunk({}, "stop"))
        events.append(
            event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": len(pieces)}})
        )
        return events


def sent_tool_calls(events: list[bytes]) -> list[list[dict[str, Any]]]:
    """The `delta.tool_calls` arrays among `events`, in order."""
    found = []
    for data in events:
        choices = orjson.loads(data[len(b"data: ") :])["choices"]
        calls = choices[0]["delta"].get("tool_calls") if choices else None
        if calls:
            found.append(calls)
    return found
