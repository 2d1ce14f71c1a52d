"""The planner's pure logic: bypass, structural DAGs, validation, estimates."""

from __future__ import annotations

import json

import pytest

from llooma.planning import (
    ModelRates,
    PlannerConfig,
    bypass_plan,
    bypass_reason,
    decide,
    decompose,
    direct_plan,
    estimate_ms,
    fast_path,
    is_split,
    parse_split_reply,
    validate,
)
from llooma.v1.common_pb2 import ChatMessage, GenerationParams
from llooma.v1.pipeline_pb2 import ChatRequest
from llooma.v1.plan_pb2 import (
    PLAN_KIND_BYPASS,
    PLAN_KIND_DIRECT,
    PLAN_KIND_SPLIT,
    PLAN_KIND_UNSPECIFIED,
    Plan,
    PlanNode,
)

CONFIG = PlannerConfig()
LIST_PROMPT = (
    "I am planning a trip to Portugal next spring and want a thorough overview.\n"
    "1. Describe the best regions to visit in April and what makes each special.\n"
    "2. Suggest a two-week itinerary that balances cities and the coast.\n"
    "3. Explain how to get around by train and bus, with rough costs.\n"
)


def test_bypass_reasons() -> None:
    assert bypass_reason("Hi there!", 0, CONFIG) == "short prompt"
    long_one = "word " * 60
    assert bypass_reason(long_one, 0, CONFIG) == "single sentence"
    assert bypass_reason(LIST_PROMPT, 16, CONFIG) == "small max_tokens"
    assert bypass_reason(LIST_PROMPT, 0, CONFIG) is None


def test_an_enumeration_becomes_parallel_nodes_with_the_users_labels() -> None:
    plan = decompose(LIST_PROMPT)
    assert plan is not None
    assert [n.label for n in plan.nodes] == ["1.", "2.", "3."]
    assert all(not n.deps for n in plan.nodes)
    assert all("Portugal" in n.prompt for n in plan.nodes), "the preamble is shared context"
    assert "two-week itinerary" in plan.nodes[1].prompt
    assert "two-week itinerary" not in plan.nodes[0].prompt
    assert validate(plan, CONFIG.max_nodes) is None


def test_bullets_and_dependencies() -> None:
    plan = decompose(
        "Help me with my garden plans for this year, please.\n"
        "- List five vegetables that grow well in shade.\n"
        "- Then, using the result, draw up a planting calendar.\n"
    )
    assert plan is not None
    assert list(plan.nodes[1].deps) == ["n0"]


def test_a_then_chain_shows_only_its_last_step() -> None:
    plan = decompose(
        "Write a short list of the three largest moons of Jupiter with one fact each. "
        "Then, using the result, write a four-line poem about them."
    )
    assert plan is not None
    assert len(plan.nodes) == 2
    assert list(plan.nodes[1].deps) == ["n0"]
    assert [n.visible for n in plan.nodes] == [False, True]


def test_plain_prose_has_no_structure() -> None:
    assert decompose("Tell me about the sea. It is large. Why is it blue?") is None


def node(node_id: str, deps: list[str], prompt: str = "p") -> PlanNode:
    return PlanNode(node_id=node_id, prompt=prompt, deps=deps, visible=True)


def test_validation_rejects_cycles_size_and_missing_prompts() -> None:
    assert validate(Plan(nodes=[node("a", ["b"]), node("b", ["a"])]), 8) == "the plan has a cycle"
    assert "more than" in (validate(Plan(nodes=[node(str(i), []) for i in range(9)]), 8) or "")
    assert validate(Plan(nodes=[node("a", [], prompt=" ")]), 8) == "every node needs a prompt"
    assert "does not exist" in (validate(Plan(nodes=[node("a", ["x"])]), 8) or "")
    assert validate(Plan(nodes=[node("a", []), node("b", ["a"])]), 8) is None


def test_split_reply_parsing() -> None:
    reply = json.dumps(
        {
            "nodes": [
                {"id": "a", "prompt": "one"},
                {"id": "b", "prompt": "two"},
                {"id": "c", "prompt": "merge", "deps": ["a", "b"], "final": True},
            ]
        }
    )
    plan = parse_split_reply("Here you go:\n" + reply)
    assert [n.visible for n in plan.nodes] == [False, False, True]
    with pytest.raises(ValueError, match="JSON"):
        parse_split_reply("no json here")
    with pytest.raises(ValueError, match="nodes"):
        parse_split_reply('{"parts": []}')


def test_splitting_pays_only_when_decoding_dominates() -> None:
    plan = decompose(LIST_PROMPT)
    assert plan is not None
    slow_decoder = ModelRates()
    slow_decoder.first_token_ms.extend([300.0] * 5)
    slow_decoder.tokens_per_s.extend([40.0] * 5)
    direct, split = estimate_ms(plan, slow_decoder, 0, CONFIG, 0.0)
    assert split + CONFIG.epsilon_ms < direct
    fast_decoder = ModelRates()
    fast_decoder.first_token_ms.extend([300.0] * 5)
    fast_decoder.tokens_per_s.extend([1000.0] * 5)
    direct, split = estimate_ms(plan, fast_decoder, 60, CONFIG, 0.0)
    assert not split + CONFIG.epsilon_ms < direct
    # A slow split call eats the gain.
    direct, split = estimate_ms(plan, slow_decoder, 0, CONFIG, 20000.0)
    assert not split + CONFIG.epsilon_ms < direct


def test_plan_kinds_are_typed_and_the_decision_stays_for_people() -> None:
    assert bypass_plan("short prompt").kind == PLAN_KIND_BYPASS
    assert bypass_plan("short prompt").decision == "bypass: short prompt"
    direct = direct_plan("invalid plan: a cycle", source="structure")
    assert (direct.kind, direct.decision, direct.source) == (
        PLAN_KIND_DIRECT,
        "direct: invalid plan: a cycle",
        "structure",
    )
    plan = decompose("Please do these:\n1. one thing here\n2. another thing there")
    assert plan is not None
    assert plan.kind == PLAN_KIND_UNSPECIFIED
    decide(plan, split=True)
    assert is_split(plan)
    assert (plan.kind, plan.decision, len(plan.nodes)) == (PLAN_KIND_SPLIT, "split", 2)
    decide(plan, split=False, reason="split not faster")
    assert not is_split(plan)
    assert (plan.decision, len(plan.nodes)) == ("direct: split not faster", 0)


def _request(prompt: str, *, model: str = "m", max_tokens: int = 0) -> ChatRequest:
    return ChatRequest(
        model=model,
        messages=[ChatMessage(role="user", content=prompt)],
        params=GenerationParams(max_tokens=max_tokens),
    )


def test_fast_path_bypasses_what_stage_1_bypasses_and_leaves_the_rest_to_the_planner() -> None:
    config = PlannerConfig(excluded_models=frozenset({"echo"}))
    short = fast_path(_request("Hi there."), config)
    assert short is not None
    assert short.kind == PLAN_KIND_BYPASS
    assert short.decision == "bypass: short prompt"
    small = fast_path(_request(LIST_PROMPT, max_tokens=8), config)
    assert small is not None
    assert small.decision == "bypass: small max_tokens"
    excluded = fast_path(_request(LIST_PROMPT, model="echo"), config)
    assert excluded is not None
    assert excluded.decision == "bypass: model is never split"
    assert fast_path(_request(LIST_PROMPT), config) is None


def test_fast_path_keeps_a_plan_the_ingress_already_made() -> None:
    request = _request(LIST_PROMPT)
    request.plan.CopyFrom(bypass_plan("the client asked for no split"))
    plan = fast_path(request, PlannerConfig())
    assert plan is not None
    assert plan.decision == "bypass: the client asked for no split"
