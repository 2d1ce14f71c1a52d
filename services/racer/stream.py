"""The answer on its way to the client: each host's text passes the answer-text policy
(llooma.answer_text), the seam after a handover drops what the client already has, and the
answer's max_tokens budget caps its characters. Text waits in `pending` until the race core
flushes it as one delta (tokens that arrived together go out together)."""

from __future__ import annotations

from llooma.answer_text import MAX_CHARS_PER_TOKEN, MAX_CHUNK_CHARS, Sanitizer
from llooma.continuation import OverlapFilter
from llooma.continuation_guard import EchoFilter, FrameGuard
from llooma.v1.host_pb2 import HostToken
from llooma.v1.pipeline_pb2 import ClientDelta
from services.racer.state import Attempt, Race

# One chunk's tool-call JSON: a token's text (MAX_CHUNK_CHARS) and the call's own fields.
MAX_TOOL_CALLS_CHARS = MAX_CHUNK_CHARS + 1024


class Seam:
    """Passes a stream's text to the client. After an instructed continuation: drops every echo
    of the frame and a re-emission of the answer so far, what repeats the preserved tail and
    the part the client already saw past the safe prefix; and where the answer so far ended a
    sentence with no space, the continuation's first word gets one ("village. The")."""

    def __init__(
        self,
        tail: str = "",
        dangling: str = "",
        *,
        echoes: tuple[str, ...] = (),
        guard: bool = False,
        join_space: bool = False,
    ) -> None:
        self._guard = FrameGuard() if guard else None
        self._echo = EchoFilter(*echoes) if echoes else None
        self._overlap = OverlapFilter(tail) if tail else None
        self._dangling = dangling
        self._held = ""
        self._join_space = join_space

    def feed(self, text: str) -> str:
        if self._guard is not None:
            text = self._guard.feed(text)
        if self._echo is not None:
            text = self._echo.feed(text)
        if self._overlap is not None:
            text = self._overlap.feed(text)
        return self._join(self._reconcile(text))

    def flush(self) -> str:
        text = self._guard.flush() if self._guard is not None else ""
        if self._echo is not None:
            text = self._echo.feed(text) + self._echo.flush()
        if self._overlap is not None:
            text = self._overlap.feed(text) + self._overlap.flush()
        out = self._reconcile(text)
        # Still held means still a prefix of what the client already has.
        self._held = ""
        return self._join(out)

    def _join(self, text: str) -> str:
        if self._join_space and text:
            self._join_space = False
            first = text[0]
            if first.isalnum() and ord(first) < 0x2E80:  # not CJK: no space there
                return " " + text
        return text

    def _reconcile(self, text: str) -> str:
        if not self._dangling:
            return text
        self._held += text
        # The client already has `dangling` (past the safe prefix): skip it where the
        # continuation re-emits it, and stop skipping at the first difference.
        common = 0
        limit = min(len(self._held), len(self._dangling))
        while common < limit and self._held[common] == self._dangling[common]:
            common += 1
        if common == len(self._dangling) or common < limit:
            out, self._held, self._dangling = self._held[common:], "", ""
            return out
        return ""


class AnswerStream:
    """One race's client-bound text across its hosts."""

    __slots__ = (
        "_embeddings",
        "_logprobs",
        "_max_chars",
        "_race",
        "_reasoning",
        "_seam",
        "_text",
        "_thoughts",
        "_tool_calls",
        "_words",
    )

    def __init__(self, race: Race) -> None:
        self._race = race
        self._max_chars = race.assignment.request.params.max_tokens * MAX_CHARS_PER_TOKEN
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._embeddings: list[bytes] = []
        self._tool_calls: list[str] = []
        self._logprobs: list[str] = []
        self.restart(Seam())

    def restart(self, seam: Seam) -> None:
        """A new host's stream: fresh sanitizers (a held fragment was the old host's)."""
        self._seam = seam
        self._words = Sanitizer()
        self._thoughts = Sanitizer()

    def token(self, winner: Attempt, token: HostToken) -> bool:
        """Relay one token; False when it hit the answer's character cap (cut the host)."""
        calls = token.tool_calls_json
        if calls:
            if len(calls) > MAX_TOOL_CALLS_CHARS:
                # Never cut (that would break its JSON): a flood ends the answer before it,
                # and the race core counts it against the host.
                return False
            # Relayed exactly: the client's tool-call parser needs the engine's own fragments.
            self._tool_calls.append(calls)
            self._race.tool_calls_sent = True
            winner.delivered_bytes += len(calls)
        if token.logprobs_json:
            self._logprobs.append(token.logprobs_json)
        piece = thought = ""
        if token.embeddings:
            self._embeddings.extend(token.embeddings)
        if token.text:
            piece = self._seam.feed(self._words.feed(self._bounded(winner, token.text)))
        if token.reasoning:
            thought = self._thoughts.feed(self._bounded(winner, token.reasoning))
        self._count_removed(winner)
        return self._add(winner, piece, thought)

    def finish(self, winner: Attempt) -> None:
        """The host's stream ended: release what was held back (within the cap)."""
        tail = self._seam.feed(self._words.flush()) + self._seam.flush()
        thought = self._thoughts.flush()
        self._count_removed(winner)
        self._add(winner, tail, thought)

    def take(self) -> list[ClientDelta]:
        """The pending answer as deltas: its text and reasoning as one, its tool calls as
        another (the ingress writes a delta of text without looking for tool calls), an
        embedding's vectors as a third."""
        deltas = []
        if self._text or self._reasoning:
            delta = ClientDelta()
            if self._text:
                delta.text = "".join(self._text)
                # Only the answer is continued on a handover, not the reasoning before it.
                self._race.emitted.append(delta.text)
                self._text.clear()
            if self._reasoning:
                delta.reasoning = "".join(self._reasoning)
                self._reasoning.clear()
            if self._logprobs:
                delta.logprobs_json = ",".join(self._logprobs)
                self._logprobs.clear()
            deltas.append(delta)
        if self._tool_calls:
            deltas.append(ClientDelta(tool_calls_json=self._tool_calls))
            self._tool_calls.clear()
        if self._embeddings:
            deltas.append(ClientDelta(embeddings=self._embeddings))
            self._embeddings.clear()
        return deltas

    @staticmethod
    def _bounded(winner: Attempt, raw: str) -> str:
        if len(raw) > MAX_CHUNK_CHARS:
            winner.violations += 1
            return raw[:MAX_CHUNK_CHARS]
        return raw

    def _count_removed(self, winner: Attempt) -> None:
        if self._words.removed or self._thoughts.removed:
            winner.violations += 1
            self._words.removed = self._thoughts.removed = 0

    def _add(self, winner: Attempt, piece: str, thought: str) -> bool:
        race = self._race
        fits = True
        if self._max_chars and race.client_chars + len(piece) + len(thought) > self._max_chars:
            room = max(0, self._max_chars - race.client_chars)
            thought = thought[:room]
            piece = piece[: room - len(thought)]
            fits = False
        race.client_chars += len(piece) + len(thought)
        if thought:
            self._reasoning.append(thought)
            winner.delivered_bytes += len(thought.encode())
        if piece:
            self._text.append(piece)
            winner.delivered_bytes += len(piece.encode())
        return fits
