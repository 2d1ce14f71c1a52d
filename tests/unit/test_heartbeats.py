"""What a host heartbeat may say (llooma.heartbeats), and the draw that never takes a bad
weight (llooma.scoring): pure, no servers."""

from __future__ import annotations

import math
import random

import pytest

from llooma import heartbeats
from llooma.heartbeats import HeartbeatRefused
from llooma.scoring import Candidate, clamp01, pick_hosts
from llooma.settings import VERSION
from llooma.v1.host_pb2 import HostHeartbeat, ModelCapability

BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0, 1e300]


def beat(**fields: object) -> HostHeartbeat:
    defaults: dict[str, object] = {
        "version": VERSION,
        "models": [ModelCapability(name="synthetic-small", capacity=8, stake=1)],
        "load": 0.5,
        "stake": 1.0,
    }
    return HostHeartbeat(**{**defaults, **fields})  # type: ignore[arg-type]


def test_an_honest_heartbeat_passes() -> None:
    honest = beat(
        models=[
            ModelCapability(name="meta-llama/Llama-3.1-8B-Instruct", capacity=32, stake=5),
            ModelCapability(name="gemma3:270m", capacity=4, stake=0),
            ModelCapability(name="echo", capacity=64),
        ]
    )
    assert heartbeats.parse(honest.SerializeToString()) == honest


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("field", ["load", "stake"])
def test_a_number_that_is_not_finite_and_bounded_is_refused(field: str, value: float) -> None:
    with pytest.raises(HeartbeatRefused) as refused:
        heartbeats.check(beat(**{field: value}))
    assert refused.value.reason == field


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_a_models_stake_that_is_not_finite_and_bounded_is_refused(value: float) -> None:
    with pytest.raises(HeartbeatRefused, match="stake"):
        heartbeats.check(beat(models=[ModelCapability(name="m", capacity=1, stake=value)]))


def test_a_wait_before_the_next_beat_past_the_bound_is_refused() -> None:
    longest = heartbeats.MAX_NEXT_BEAT_MS
    assert heartbeats.check(beat(next_beat_ms=longest)).next_beat_ms == longest
    with pytest.raises(HeartbeatRefused) as refused:
        heartbeats.check(beat(next_beat_ms=longest + 1))
    assert refused.value.reason == "next_beat_ms"


def test_a_load_above_one_and_a_huge_capacity_are_refused() -> None:
    with pytest.raises(HeartbeatRefused, match="load"):
        heartbeats.check(beat(load=1.5))
    with pytest.raises(HeartbeatRefused, match="capacity"):
        heartbeats.check(beat(models=[ModelCapability(name="m", capacity=4_000_000_000)]))


@pytest.mark.parametrize(
    "name", ["*", ">", "a b", "llooma", "", "a.>", "x\x00", "-leading", "é", "m" * 200]
)
def test_a_model_name_that_is_not_a_safe_token_or_is_the_networks_own_is_refused(
    name: str,
) -> None:
    with pytest.raises(HeartbeatRefused) as refused:
        heartbeats.check(beat(models=[ModelCapability(name=name, capacity=1)]))
    assert refused.value.reason == "model_name"


def test_no_models_twice_the_same_model_and_a_bad_version_are_refused() -> None:
    with pytest.raises(HeartbeatRefused, match="models"):
        heartbeats.check(beat(models=[]))
    twice = [ModelCapability(name="m", capacity=1), ModelCapability(name="m", capacity=1)]
    with pytest.raises(HeartbeatRefused, match="twice"):
        heartbeats.check(beat(models=twice))
    with pytest.raises(HeartbeatRefused, match="version"):
        heartbeats.check(beat(version="0.1.0 <script>"))


def test_undecodable_and_oversized_heartbeats_are_refused() -> None:
    with pytest.raises(HeartbeatRefused, match="undecodable"):
        heartbeats.parse(b"\xff\xff\xff\xff")
    with pytest.raises(HeartbeatRefused, match="size"):
        heartbeats.parse(b"\x00" * (heartbeats.MAX_HEARTBEAT_BYTES + 1))


@pytest.mark.parametrize("stake", BAD_NUMBERS)
def test_the_draw_never_takes_a_weight_that_is_not_finite(stake: float) -> None:
    candidates = [Candidate("bad", "m", 0.1, stake), Candidate("good", "m", 0.2, 1.0)]
    for seed in range(50):
        picked = pick_hosts(candidates, k=2, bucket_size=4, rng=random.Random(seed))
        assert {c.host_id for c in picked} == {"bad", "good"}


def test_a_nan_score_term_counts_as_the_worst() -> None:
    assert clamp01(math.nan) == 1.0
    assert clamp01(-3.0) == 0.0
    assert clamp01(0.25) == 0.25


def test_a_key_that_is_not_a_users_public_nkey_is_refused() -> None:
    key = "U" + "A" * 55
    assert heartbeats.check(beat(nkey=key)).nkey == key
    assert heartbeats.check(beat()).nkey == ""
    for bad in ("N" + "A" * 55, "U" + "A" * 54, "U" + "a" * 55, "U" + "A" * 54 + "."):
        with pytest.raises(HeartbeatRefused) as refused:
            heartbeats.check(beat(nkey=bad))
        assert refused.value.reason == "nkey"
