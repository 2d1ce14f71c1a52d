"""A stream handed to another host (paper II-D): what the continuing host is asked, and the
seam that keeps the client's text whole where its answer joins what was already sent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llooma.continuation import continuation_messages, detect_format, safe_prefix, tail_window
from llooma.v1.common_pb2 import ChatMessage
from llooma.v1.pipeline_pb2 import HostCandidate
from services.racer.stream import Seam


@dataclass(frozen=True, slots=True)
class Handover:
    messages: list[ChatMessage]
    seam: Seam


def plan_handover(original: Sequence[ChatMessage], emitted: str, host: HostCandidate) -> Handover:
    """The continuing host's prompt: the conversation, the answer so far up to a safe boundary
    and the request to continue it; the seam drops what repeats the client's text."""
    fmt = detect_format(emitted)
    prefix = safe_prefix(emitted, fmt)
    tail = tail_window(prefix)
    turns = [(m.role, m.content) for m in original]
    messages = merge_turns(continuation_messages(turns, prefix, fmt, tail))
    return Handover(messages, Seam(tail, emitted[len(prefix) :]))


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
