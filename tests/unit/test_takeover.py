"""A race taken over from a racer that stopped (pure): the resumed core finishes the answer
from what the client received, and the dead race is settled from its record."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from llooma import subjects
from llooma.ledger.economics import Prices, settle_attempt
from llooma.race_records import race_key
from llooma.settings import Settings
from llooma.v1.common_pb2 import Usage
from llooma.v1.pipeline_pb2 import ClientEvent
from llooma.v1.race_pb2 import ATTEMPT_ROLE_CONTINUATION, ATTEMPT_ROLE_RACER
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, ATTEMPT_OUTCOME_WON
from services.ingress.replies import ReplyRouter
from services.racer.report import settlements
from services.racer.takeover import (
    RESUMED_TASK_SUFFIX,
    race_record,
    record_state,
    recorded,
    resumed_assignment,
    taken_over,
)
from tests.unit.race_sim import Sim, assignment, tokens


def test_a_resumed_race_finishes_the_answer_from_what_the_client_received() -> None:
    task = resumed_assignment(assignment(["a", "b"], prefill=["a"], max_tokens=20))
    sim = Sim(task, {"a": tokens(" The night", " was calm.", usage=Usage(output_tokens=2))})
    sim.run(resume=("The village slept.", 3))
    assert sim.events[0].HasField("started")  # the ingress learns its new racer first
    # The client has "The village slept." already: only the rest comes, nothing repeated.
    assert sim.text == " The night was calm."
    ((_, continuation),) = sim.launches("a")
    assert continuation.messages[-1].role == "assistant"
    assert continuation.messages[-1].content == "The village slept."
    # max_tokens is the answer's: the 3 token chunks received are spent.
    assert continuation.params.max_tokens == 17
    assert sim.last.finished.usage.output_tokens == 5
    assert sim.race is not None
    (heir,) = sim.race.attempts.values()
    assert heir.role == ATTEMPT_ROLE_CONTINUATION
    won = sim.settled["a"]
    assert won.outcome == ATTEMPT_OUTCOME_WON
    assert won.task_id == "t1" + RESUMED_TASK_SUFFIX
    # The prompt was charged with the race taken over: this one pays for its output only.
    assert won.usage.input_tokens == 0
    assert won.usage.output_tokens == 2


def test_a_resumed_race_whose_client_has_nothing_yet_starts_over() -> None:
    engine = Usage(input_tokens=7, output_tokens=2)
    sim = Sim(assignment(["a"]), {"a": tokens("Once ", "upon.", usage=engine)})
    sim.run(resume=("", 0))
    assert sim.events[0].HasField("started")
    assert sim.text == "Once upon."
    # The dead race delivered nothing and is settled with no winner: the prompt is this one's.
    assert sim.settled["a"].usage.input_tokens == 7


def test_a_dead_race_whose_client_got_nothing_has_no_winner() -> None:
    sim = Sim(
        assignment(["a", "b"]),
        {"a": tokens("One ", "two.", gap=0.1), "b": tokens("late", first=1.0)},
    ).run(cancel_at=0.2)
    assert sim.race is not None
    record = race_record(sim.race, "racer-1")
    assert record.winner_attempt_id  # its racer had a first token, the client had none
    dead = taken_over(record, 0, 5.0)
    assert dead.winner is None
    settled = settlements(dead, 5.0, 0)
    assert {s.outcome for s in settled} == {ATTEMPT_OUTCOME_LOST}
    assert all(s.usage.input_tokens == 0 for s in settled)


def test_each_delta_says_how_many_token_chunks_it_carries() -> None:
    sim = Sim(assignment(["a"]), {"a": tokens("One ", "two ", "three.", gap=0.0)}).run()
    deltas = [e.delta for e in sim.events if e.HasField("delta")]
    assert sum(d.tokens for d in deltas) == 3
    assert sim.race is not None
    assert sim.race.client_tokens == 3


def test_the_dead_race_is_settled_from_its_record_on_what_the_client_received() -> None:
    sim = Sim(
        assignment(["a", "b"]),
        {"a": tokens("One ", "two ", "three ", "four.", gap=0.1), "b": tokens("late", first=1.0)},
    ).run(cancel_at=0.2)
    assert sim.race is not None
    record = race_record(sim.race, "racer-1")
    assert record.racer_instance_id == "racer-1"
    assert {a.attempt_id for a in record.attempts} == set(sim.race.attempts)
    assert record.winner_attempt_id == sim.race.winner.attempt_id  # type: ignore[union-attr]
    assert record.winner_from_tokens == 0
    assert record_state(sim.race) == (2, record.winner_attempt_id)
    # The client had received 2 token chunks when the racer died.
    dead = taken_over(record, 2, 5.0)
    settled = {s.host_id: s for s in settlements(dead, 5.0, 0)}
    assert settled["a"].outcome == ATTEMPT_OUTCOME_WON
    assert settled["a"].usage.output_tokens == settled["a"].delivered_tokens == 2
    assert settled["a"].usage.input_tokens == dead.prompt_tokens > 0
    assert settled["a"].task_id == "t1"
    # The loser's count died with its racer: nothing verified, no fee.
    assert settled["b"].outcome == ATTEMPT_OUTCOME_LOST
    assert settled["b"].usage.output_tokens == 0
    prices = Prices.from_settings(Settings())
    loser_legs = settle_attempt(prices, settled["b"]).legs
    assert all(leg.amount == 0 for leg in loser_legs)
    assert any(leg.amount for leg in settle_attempt(prices, settled["a"]).legs)


def test_a_continuations_part_starts_after_what_earlier_hosts_relayed() -> None:
    sim = Sim(
        assignment(["a"], ["pool"], stall_ms=500),
        {"a": tokens("The village ", "slept. ", finish=None), "pool": tokens("Then ", "dawn.")},
    ).run()
    assert sim.race is not None
    record = race_record(sim.race, "racer-1")
    heir = next(a for a in record.attempts if a.role == ATTEMPT_ROLE_CONTINUATION)
    assert record.winner_attempt_id == heir.attempt_id
    assert record.winner_from_tokens == 2
    assert any(a.role == ATTEMPT_ROLE_RACER for a in record.attempts)
    dead = taken_over(record, 3, 1.0)
    assert dead.attempts[heir.attempt_id].delivered == 1


def test_only_single_choice_races_answering_a_client_or_an_aggregator_are_recorded() -> None:
    task = assignment(["a"])
    task.request.reply_subject = subjects.client_reply("ingress-1", "r1")
    assert recorded(task)
    task.request.choices = 2
    assert not recorded(task)
    task.request.choices = 1
    task.request.reply_subject = subjects.aggregation_node("llooma.v1.agg.x.r1", "n1")
    assert not recorded(task)  # an aggregator's subject with no node: not a node's race
    task.request.node_id = "n1"
    assert recorded(task)
    assert race_key("r1", "n1") != race_key("r1", "")
    task.request.choices = 2
    assert not recorded(task)


def test_a_rerouted_request_hears_only_its_new_racer() -> None:
    async def scenario() -> None:
        router = ReplyRouter("ingress-1")
        queue = router.open("r1")
        old = subjects.client_reply("ingress-1", "r1")
        event = ClientEvent().SerializeToString()
        await router._route(SimpleNamespace(subject=old, data=event))  # type: ignore[arg-type]
        new = router.reroute("r1")
        assert queue.empty()  # what the old racer had sent is dropped with it
        await router._route(SimpleNamespace(subject=old, data=event))  # type: ignore[arg-type]
        assert queue.empty()
        await router._route(SimpleNamespace(subject=new, data=event))  # type: ignore[arg-type]
        assert queue.qsize() == 1
        assert router.close("r1")

    asyncio.run(scenario())
