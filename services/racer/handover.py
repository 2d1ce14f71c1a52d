"""A stream handed to another host (paper II-D): what the continuing host is asked, and the
seam that keeps the client's text whole where its answer joins what was already sent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llooma.continuation import continuation_messages, detect_format, safe_prefix, tail_window
from llooma.continuation_guard import prefill_messages
from llooma.v1.common_pb2 import ChatMessage, GenerationParams
from llooma.v1.host_pb2 import HostTask
from llooma.v1.pipeline_pb2 import HostCandidate
from services.racer.state import Attempt, Race, prompt_tokens
from services.racer.stream import Seam

# What may close a sentence after its full stop ("He said so.")
_CLOSERS = "\"')]}\u00bb\u201d\u2019"


@dataclass(frozen=True, slots=True)
class Handover:
    messages: list[ChatMessage]
    seam: Seam


def plan_handover(
    original: Sequence[ChatMessage], emitted: str, host: HostCandidate, *, raw_prompt: bool = False
) -> Handover:
    """The continuing host's prompt and the seam where its text joins the client's.

    Where the host's engine continues a trailing assistant message (host.assistant_prefill), by
    prefill: the whole answer so far as that message, no instructions, nothing to leak or
    repeat. Otherwise an instructed continuation: the answer so far up to a safe boundary and
    the request to continue it, with a seam that removes every echo of that frame. A raw-prompt
    text completion is always continued by prefill: its host appends the text to the prompt."""
    turns = [(m.role, m.content) for m in original]
    if (host.assistant_prefill or raw_prompt) and emitted:
        merged = [(m.role, m.content) for m in merge_turns(turns)]
        messages = [ChatMessage(role=r, content=c) for r, c in prefill_messages(merged, emitted)]
        return Handover(messages, Seam())
    fmt = detect_format(emitted)
    prefix = safe_prefix(emitted, fmt)
    tail = tail_window(prefix)
    dangling = emitted[len(prefix) :]
    # "village." then "The": the client's text ends a sentence with no space after it.
    end = prefix.rstrip(_CLOSERS)[-1:]
    join_space = fmt == "prose" and not dangling and end != "" and end in ".!?;:,"
    seam = Seam(tail, dangling, echoes=(prefix, tail), guard=True, join_space=join_space)
    return Handover(merge_turns(continuation_messages(turns, prefix, fmt, tail)), seam)


def host_task(race: Race, attempt: Attempt, messages: list[ChatMessage] | None) -> HostTask:
    """What an attempt's host is sent: the request as asked, or (a handover) its own messages
    and only what is left of the answer's max_tokens."""
    request = race.assignment.request
    params = request.params
    if messages is None:
        attempt.prompt_tokens = race.prompt_tokens
    else:
        attempt.prompt_tokens = prompt_tokens(messages, params)
        if params.max_tokens:
            params = GenerationParams()
            params.CopyFrom(request.params)
            params.max_tokens = max(1, request.params.max_tokens - race.client_tokens)
    return HostTask(
        attempt_id=attempt.attempt_id,
        model=attempt.host.model,
        messages=messages if messages is not None else request.messages,
        params=params,
        kind=request.kind,
    )


def merge_turns(turns: list[tuple[str, str]]) -> list[ChatMessage]:
    """Join consecutive turns of one role: chat templates that insist on alternating user and
    assistant turns reject two user messages in a row."""
    merged: list[ChatMessage] = []
    for role, content in turns:
        if merged and merged[-1].role == role:
            merged[-1].content += "\n\n" + content
        else:
            merged.append(ChatMessage(role=role, content=content))
    return merged
