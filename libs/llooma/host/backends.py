"""Backends that produce a task's tokens: synthetic text and echo."""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import AsyncIterator
from typing import Protocol

from llooma.host.config import Latency, ModelConfig
from llooma.v1.host_pb2 import HostTask

_TOKEN = re.compile(r"\s*\S+|\s+")

_WORDS = [
    "the",
    "network",
    "answers",
    "every",
    "request",
    "through",
    "many",
    "independent",
    "hosts",
    "while",
    "a",
    "central",
    "control",
    "plane",
    "races",
    "them",
    "under",
    "a",
    "deadline",
    "and",
    "keeps",
    "the",
    "stream",
    "continuous",
    "for",
    "users",
    "latency",
    "tails",
    "shrink",
    "when",
    "two",
    "hosts",
    "compete",
    "and",
    "the",
    "loser",
    "stops",
    "early",
]


def split_tokens(text: str) -> list[str]:
    """Word-sized pieces that join back to exactly the input."""
    return _TOKEN.findall(text)


def sample_ms(latency: Latency, rng: random.Random) -> float:
    if latency.kind == "lognormal":
        return latency.median_ms * math.exp(latency.sigma * rng.gauss(0.0, 1.0))
    if latency.kind == "pareto":
        return latency.x_m_ms * rng.paretovariate(latency.alpha)
    return latency.ms


class Backend(Protocol):
    def stream(self, task: HostTask) -> AsyncIterator[str]: ...


async def _pause(ms: float) -> None:
    # sleep(0) still yields, so a zero-latency host never starves the event loop.
    await asyncio.sleep(ms / 1000.0)


class SyntheticBackend:
    """Seeded prose with configured first-token and inter-token latency."""

    def __init__(self, model: ModelConfig, seed: int) -> None:
        self._model = model
        self._rng = random.Random(seed)

    def _limit(self, task: HostTask) -> int:
        requested = task.params.max_tokens
        return min(requested, self._model.max_tokens) if requested else self._model.max_tokens

    async def stream(self, task: HostTask) -> AsyncIterator[str]:
        text_rng = random.Random(task.params.seed or self._rng.getrandbits(64))
        await _pause(sample_ms(self._model.first_token, self._rng))
        for index in range(self._limit(task)):
            if index:
                await _pause(sample_ms(self._model.inter_token, self._rng))
            word = text_rng.choice(_WORDS)
            yield word.capitalize() if index == 0 else f" {word}"


class EchoBackend:
    """Streams back the last user message exactly as received, token by token."""

    def __init__(self, model: ModelConfig) -> None:
        self._model = model

    async def stream(self, task: HostTask) -> AsyncIterator[str]:
        last_user = next((m.content for m in reversed(task.messages) if m.role == "user"), "")
        await _pause(sample_ms(self._model.first_token, random.Random()))
        limit = task.params.max_tokens or None
        for index, piece in enumerate(split_tokens(last_user)[:limit]):
            if index:
                await _pause(self._model.inter_token.ms)
            yield piece


def build_backend(model: ModelConfig, seed: int) -> Backend:
    if model.backend == "echo":
        return EchoBackend(model)
    return SyntheticBackend(model, seed)
