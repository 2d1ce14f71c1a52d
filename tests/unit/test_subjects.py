"""Subject builders and the parsers that read their ids back (pure)."""

from __future__ import annotations

from llooma import subjects


def test_every_parser_reads_back_what_its_builder_wrote() -> None:
    reply = subjects.client_reply("ingress-1", "req42")
    assert reply.startswith(subjects.client_reply_prefix("ingress-1") + ".")
    assert subjects.client_reply_request_id(reply) == "req42"
    assert subjects.client_reply_route(reply) == ("req42", 0)
    resumed = subjects.client_reply("ingress-1", "req42", 2)
    assert subjects.client_reply_route(resumed) == ("req42", 2)
    assert subjects.is_client_reply(resumed)
    assert not subjects.is_client_reply(subjects.aggregation_nodes("agg-1", "req42"))
    tokens = subjects.host_reply("racer-1", "att7")
    assert tokens.startswith(subjects.host_reply_prefix("racer-1") + ".")
    assert subjects.host_reply_attempt_id(tokens) == "att7"
    cancel = subjects.request_cancel("req42")
    assert subjects.request_cancel_request_id(cancel) == "req42"
    node = subjects.aggregation_node(subjects.aggregation_nodes("agg-1", "req42"), "n3")
    assert subjects.aggregation_node_ids(node) == ("req42", "n3", 0)
    resumed_node = subjects.aggregation_node_resumed("agg-1", "req42", "n3", 2)
    assert subjects.aggregation_node_ids(resumed_node) == ("req42", "n3", 2)
    assert subjects.planner_reply("planner-1", "call9") == "llooma.v1.planner.planner-1.call9"


def test_wildcards_cover_the_subjects_they_route() -> None:
    def covers(pattern: str, subject: str) -> bool:
        tokens, wanted = subject.split("."), pattern.split(".")
        return len(tokens) == len(wanted) and all(
            w in ("*", t) for w, t in zip(wanted, tokens, strict=True)
        )

    assert covers(subjects.REQUEST_CANCEL_ANY, subjects.request_cancel("r"))
    node = subjects.aggregation_node(subjects.aggregation_nodes("agg-1", "r"), "n")
    assert covers(subjects.aggregation_any("agg-1"), node)
    resumed_node = subjects.aggregation_node_resumed("agg-1", "r", "n", 1)
    assert covers(subjects.aggregation_any("agg-1"), resumed_node)
    assert covers(subjects.host_reply_prefix("racer") + ".*", subjects.host_reply("racer", "a"))
