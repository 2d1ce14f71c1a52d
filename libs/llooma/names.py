"""Names every process agrees on: the control-plane services and the request paths."""

from __future__ import annotations

from llooma.v1.common_pb2 import REQUEST_PATH_FALLBACK, REQUEST_PATH_SPLIT, RequestPath

# The control-plane services, in the order a request meets them (accounting settles last).
SERVICES = (
    "ingress",
    "privacy",
    "planner",
    "dispatcher",
    "racer",
    "compressor",
    "aggregator",
    "accounting",
)

# What x-llooma-path, /v1/stats and the metrics call each RequestPath.
PATHS = ("direct", "split", "fallback")
PATH_NAMES: dict[RequestPath.ValueType, str] = {
    REQUEST_PATH_SPLIT: "split",
    REQUEST_PATH_FALLBACK: "fallback",
}


def path_name(path: RequestPath.ValueType) -> str:
    """The path's name; a request not split and not rescued by a fallback went direct."""
    return PATH_NAMES.get(path, "direct")
