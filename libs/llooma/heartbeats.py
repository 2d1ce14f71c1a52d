"""What a host heartbeat may say: every number finite and bounded, every model name a safe
token that is not the orchestrated model's. A heartbeat that breaks a rule is refused whole
(never clamped), so a host cannot half-join with nonsense; the reason names the rule."""

from __future__ import annotations

import math
import re

from google.protobuf.message import DecodeError

from llooma.settings import ORCHESTRATED_MODEL
from llooma.v1.host_pb2 import HostHeartbeat

# A model name: what OpenAI-compatible servers use ("org/name-3.1:q4"), nothing a NATS
# subject or a client could misread (no spaces, wildcards or control characters).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,32}$")
# A user's public nkey: "U" and 55 base32 characters.
_USER_NKEY = re.compile(r"^U[A-Z2-7]{55}$")
MAX_MODELS = 64
# Announced stake is a weight in a draw among the best-scoring hosts; past this it is a lie.
MAX_STAKE = 1000.0
# Tasks in flight a host may announce; the ingress still counts each for at most
# `admission_max_host_capacity`.
MAX_CAPACITY = 1_000_000
MAX_QUEUE_DEPTH = 1_000_000
MAX_HEARTBEAT_BYTES = 16_384
# The longest wait before its next beat a host may announce: readers keep a host that
# announced it for that long plus a grace, so this bounds how late a silent death is noticed.
MAX_NEXT_BEAT_MS = 15_000


class HeartbeatRefused(ValueError):
    """A heartbeat that breaks a rule; `reason` is a short, countable name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _bounded(value: float, high: float, what: str) -> None:
    if not math.isfinite(value) or not 0.0 <= value <= high:
        raise HeartbeatRefused(what, f"{value!r} is not within [0, {high}]")


def check(beat: HostHeartbeat) -> HostHeartbeat:
    """Return `beat` if it keeps every rule, else raise HeartbeatRefused."""
    if not _VERSION.match(beat.version):
        raise HeartbeatRefused("version", repr(beat.version[:40]))
    _bounded(beat.load, 1.0, "load")
    _bounded(beat.stake, MAX_STAKE, "stake")
    _bounded(beat.queue_depth, MAX_QUEUE_DEPTH, "queue_depth")
    _bounded(beat.in_flight, MAX_CAPACITY, "in_flight")
    _bounded(beat.next_beat_ms, MAX_NEXT_BEAT_MS, "next_beat_ms")
    if beat.nkey and not _USER_NKEY.match(beat.nkey):
        raise HeartbeatRefused("nkey", repr(beat.nkey[:60]))
    if not 0 < len(beat.models) <= MAX_MODELS:
        raise HeartbeatRefused("models", f"{len(beat.models)} models")
    names = set()
    for cap in beat.models:
        if not _MODEL_NAME.match(cap.name):
            raise HeartbeatRefused("model_name", repr(cap.name[:140]))
        if cap.name == ORCHESTRATED_MODEL:
            raise HeartbeatRefused("model_name", f"{ORCHESTRATED_MODEL!r} is the network's own")
        if cap.name in names:
            raise HeartbeatRefused("model_name", f"{cap.name!r} twice")
        names.add(cap.name)
        _bounded(cap.stake, MAX_STAKE, "stake")
        _bounded(cap.capacity, MAX_CAPACITY, "capacity")
        _bounded(cap.in_flight, MAX_CAPACITY, "in_flight")
    return beat


def parse(data: bytes) -> HostHeartbeat:
    """Decode and check a host heartbeat; raise HeartbeatRefused for anything unusable."""
    if len(data) > MAX_HEARTBEAT_BYTES:
        raise HeartbeatRefused("size", f"{len(data)} bytes")
    try:
        beat = HostHeartbeat.FromString(data)
    except DecodeError as error:
        raise HeartbeatRefused("undecodable", str(error)) from error
    return check(beat)
