"""Capacity: how many tasks the selected endpoints take at once, and on how many independent
engines. Models (and hosts) that announce one `engine_id` share one engine: its capacity is
counted once, and they are one engine for the planner's L_split, not several."""

from __future__ import annotations

from collections.abc import Iterable

from llooma.selection._filters import Endpoint


def engine_key(endpoint: Endpoint) -> str:
    """The engine an endpoint runs on: its announced engine_id, else its own (host, model)."""
    if endpoint.model.engine_id:
        return f"engine\0{endpoint.model.engine_id}"
    return f"model\0{endpoint.host_id}\0{endpoint.model.name}"


def capacity(endpoints: Iterable[Endpoint], *, per_host_max: int) -> int:
    """Tasks the endpoints take at once: each engine counted once, at the largest capacity
    announced for it, and each host's engines together at most `per_host_max` (a host cannot
    open the gate wide). An engine shared by several hosts counts once, on the first by id."""
    largest: dict[str, int] = {}
    owner: dict[str, str] = {}
    for endpoint in endpoints:
        key = engine_key(endpoint)
        largest[key] = max(largest.get(key, 0), endpoint.model.capacity)
        owner[key] = min(owner.get(key, endpoint.host_id), endpoint.host_id)
    by_host: dict[str, int] = {}
    for key, host_id in owner.items():
        by_host[host_id] = by_host.get(host_id, 0) + largest[key]
    return sum(min(announced, per_host_max) for announced in by_host.values())


def independent_engines(endpoints: Iterable[Endpoint]) -> int:
    """How many parts of a split could truly run at once: one per announced engine however
    many models and hosts share it; a model announcing no engine is taken at its word, each
    task slot of its capacity independent (as it always was)."""
    shared: set[str] = set()
    alone = 0
    for endpoint in endpoints:
        if endpoint.model.engine_id:
            shared.add(endpoint.model.engine_id)
        else:
            alone += max(1, endpoint.model.capacity)
    return len(shared) + alone
