"""Backends that produce a task's tokens: synthetic text, echo, and (openai_backend.py) any
OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import struct
import zlib
from collections.abc import AsyncGenerator
from typing import Literal, Protocol, runtime_checkable

from llooma.duel import read_judge_prompt
from llooma.host.config import Latency, ModelConfig
from llooma.host.openai_backend import GenerationDefaults, OpenAIBackend, Outcome
from llooma.v1.host_pb2 import HostTask

_TOKEN = re.compile(r"\s*\S+|\s+")

_WORD_TEXT = (
    "the network answers every request through many independent hosts while a central "
    "control plane races them under a deadline and keeps the stream continuous for users "
    "latency tails shrink when two hosts compete and the loser stops early"
)
_WORDS = _WORD_TEXT.split()
_VOCABULARY = frozenset(_WORDS)
# What a synthetic host of quality below 1 says instead of some words.
_NOISE = ("zorp", "flim", "blat", "wug", "snarf", "grel", "vonk", "quib")
_LETTERS = re.compile(r"[a-z]+")
# Answers whose share of real words differs by less than this are a tie to a synthetic judge.
_TIE_MARGIN = 0.05

OutputFormat = Literal["prose", "markdown", "json"]


class BackendFailure(Exception):
    """The backend gave up on a task (the synthetic failure probability, for one)."""


def split_tokens(text: str) -> list[str]:
    """Word-sized pieces that join back to exactly the input."""
    return _TOKEN.findall(text)


def sample_ms(latency: Latency, rng: random.Random) -> float:
    if latency.kind == "lognormal":
        return latency.median_ms * math.exp(latency.sigma * rng.gauss(0.0, 1.0))
    if latency.kind == "pareto":
        return latency.x_m_ms * rng.paretovariate(latency.alpha)
    return latency.ms


def requested_format(task: HostTask) -> OutputFormat:
    """The format the prompt asks for, by the words it uses."""
    prompt = " ".join(m.content for m in task.messages if m.role in ("system", "user")).lower()
    if "json" in prompt:
        return "json"
    if "markdown" in prompt:
        return "markdown"
    return "prose"


def synthetic_text(words: list[str], fmt: OutputFormat) -> str:
    """`words` shaped as the format asks; split_tokens() of it has about len(words) pieces."""
    if fmt == "json":
        half = max(1, len(words) // 2)
        return json.dumps({"summary": " ".join(words[:half]), "details": words[half:]})
    if fmt == "markdown":
        lines = ["## " + " ".join(words[:3]).capitalize()]
        for start in range(3, len(words), 4):
            lines.append("- " + " ".join(words[start : start + 4]))
        return "\n".join(lines)
    sentences = [" ".join(words[i : i + 9]).capitalize() + "." for i in range(0, len(words), 9)]
    return " ".join(sentences)


def sense(text: str) -> float:
    """The share of a synthetic answer's words that are real words (1.0: a perfect host)."""
    words = _LETTERS.findall(text.lower())
    return sum(word in _VOCABULARY for word in words) / len(words) if words else 0.0


def synthetic_verdict(answer_a: str, answer_b: str) -> str:
    """A judge's reply, as llooma.duel asks for it: the answer with more sense wins."""
    margin = sense(answer_a) - sense(answer_b)
    verdict = "tie" if abs(margin) < _TIE_MARGIN else "A" if margin > 0 else "B"
    return json.dumps({"verdict": verdict})


class Backend(Protocol):
    def stream(
        self, task: HostTask, outcome: Outcome | None = None
    ) -> AsyncGenerator[str, None]: ...


@runtime_checkable
class Embedder(Protocol):
    async def embed(self, task: HostTask, outcome: Outcome) -> list[bytes]:
        """Each message's vector, as little-endian float32."""
        ...


# The echo backend's vectors: words hashed into this many dimensions.
ECHO_DIMENSIONS = 16


def _local_outcome(outcome: Outcome | None, task: HostTask, pieces: int, limit: int) -> None:
    """A local backend is its own engine: its pieces are its tokens, its words its prompt."""
    if outcome is not None:
        outcome.input_tokens = sum(len(m.content.split()) for m in task.messages)
        outcome.output_tokens = pieces
        outcome.finish_reason = "length" if limit and pieces >= limit else "stop"
        outcome.reported = True


async def _pause(ms: float) -> None:
    # sleep(0) still yields, so a zero-latency host never starves the event loop.
    await asyncio.sleep(ms / 1000.0)


def token_limit(task: HostTask, ceiling: int) -> int:
    params = task.params
    return min(params.max_tokens, ceiling) if params.HasField("max_tokens") else ceiling


class SyntheticBackend:
    """Seeded text in the format the prompt asks for, with configured latency and faults."""

    def __init__(self, model: ModelConfig, seed: int) -> None:
        self._model = model
        self._rng = random.Random(seed)

    async def stream(
        self, task: HostTask, outcome: Outcome | None = None
    ) -> AsyncGenerator[str, None]:
        model = self._model
        params = task.params
        seed = params.seed if params.HasField("seed") else self._rng.getrandbits(64)
        rng = random.Random(seed)
        judged = read_judge_prompt(task.messages)
        if judged is not None:
            await _pause(sample_ms(model.first_token, rng))
            verdict = split_tokens(synthetic_verdict(*judged))
            for piece in verdict:
                yield piece
            _local_outcome(outcome, task, len(verdict), 0)
            return
        limit = token_limit(task, model.generation.max_tokens)
        fmt = requested_format(task)
        words = [rng.choice(_WORDS) for _ in range(limit)]
        if model.quality < 1.0:
            words = [w if rng.random() < model.quality else rng.choice(_NOISE) for w in words]
        pieces = split_tokens(synthetic_text(words, fmt))
        while len(pieces) > limit and len(words) > 1:
            # Drop words rather than cut the text, so JSON and markdown stay well formed.
            del words[max(1, len(words) - (len(pieces) - limit)) :]
            pieces = split_tokens(synthetic_text(words, fmt))
        pieces = pieces[:limit]
        stall_at = rng.randrange(len(pieces)) if rng.random() < model.stall_probability else -1
        fail_at = rng.randrange(len(pieces)) if rng.random() < model.failure_probability else -1
        await _pause(sample_ms(model.first_token, rng))
        for index, piece in enumerate(pieces):
            if index:
                await _pause(sample_ms(model.inter_token, rng))
            if index == stall_at:
                await asyncio.Event().wait()  # stops emitting and never finishes
            if index == fail_at:
                raise BackendFailure("synthetic failure")
            yield piece
        _local_outcome(outcome, task, len(pieces), limit)


class EchoBackend:
    """Streams back the last user message exactly as received, token by token."""

    def __init__(self, model: ModelConfig, seed: int) -> None:
        self._model = model
        self._rng = random.Random(seed)

    async def stream(
        self, task: HostTask, outcome: Outcome | None = None
    ) -> AsyncGenerator[str, None]:
        last_user = next((m.content for m in reversed(task.messages) if m.role == "user"), "")
        await _pause(sample_ms(self._model.first_token, self._rng))
        limit = task.params.max_tokens or None
        pieces = split_tokens(last_user)[:limit]
        for index, piece in enumerate(pieces):
            if index:
                await _pause(sample_ms(self._model.inter_token, self._rng))
            yield piece
        _local_outcome(outcome, task, len(pieces), limit or 0)

    async def embed(self, task: HostTask, outcome: Outcome) -> list[bytes]:
        """A bag of words per input, hashed into ECHO_DIMENSIONS and normalised: the same
        text, the same vector; shared words, a closer one."""
        await _pause(sample_ms(self._model.first_token, self._rng))
        vectors = []
        for message in task.messages:
            counts = [0.0] * ECHO_DIMENSIONS
            for word in message.content.lower().split():
                counts[zlib.crc32(word.encode()) % ECHO_DIMENSIONS] += 1.0
            norm = math.sqrt(sum(c * c for c in counts)) or 1.0
            vectors.append(struct.pack(f"<{ECHO_DIMENSIONS}f", *(c / norm for c in counts)))
        outcome.input_tokens = sum(len(m.content.split()) for m in task.messages)
        outcome.output_tokens = 0
        outcome.finish_reason = "stop"
        outcome.reported = True
        return vectors


def build_backend(model: ModelConfig, seed: int) -> Backend:
    if model.backend == "echo":
        return EchoBackend(model, seed)
    if model.backend == "openai":
        assert model.base_url is not None
        generation = model.generation
        return OpenAIBackend(
            model.base_url,
            model.api_key,
            model.upstream_model or model.name,
            defaults=GenerationDefaults(
                max_tokens=generation.max_tokens,
                temperature=generation.temperature,
                top_p=generation.top_p,
            ),
            engine=model.engine,
            max_connections=model.max_connections or model.capacity,
        )
    return SyntheticBackend(model, seed)
