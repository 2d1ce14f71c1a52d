"""The race core in memory (services/racer/core.py): hedging, the first-token deadline and the
fallback, continuation after a stall or a failure, the budget cut, partial winners, refusals,
reasoning, usage and duels, each on a fake clock with scripted hosts and no servers."""

from __future__ import annotations

from llooma.continuation import ANSWER_START
from llooma.duel import DuelOffer
from llooma.v1.common_pb2 import (
    ERROR_CODE_DEADLINE_EXCEEDED,
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_REQUEST_REJECTED,
    REQUEST_PATH_FALLBACK,
    ErrorDetail,
    Usage,
)
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.race_pb2 import (
    ATTEMPT_ROLE_CONTINUATION,
    ATTEMPT_ROLE_FALLBACK,
    ATTEMPT_ROLE_HEDGE,
    ATTEMPT_ROLE_RACER,
)
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_FAILED,
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_REJECTED,
    ATTEMPT_OUTCOME_WON,
)
from services.racer.stream import MAX_TOOL_CALLS_CHARS
from tests.unit.race_sim import Script, Sim, Step, assignment, fails, silent, then, tokens

STORY = ("Once ", "upon ", "a ", "time.")


def outcomes(sim: Sim) -> dict[str, int]:
    assert sim.event is not None
    return {a.host_id: a.outcome for a in sim.event.attempts}


def test_the_first_token_wins_the_loser_is_cancelled_and_the_answer_is_relayed() -> None:
    sim = Sim(
        assignment(["fast", "slow"]),
        {"fast": tokens(*STORY, first=0.05), "slow": tokens(*STORY, first=0.2)},
    ).run()
    assert sim.text == "Once upon a time."
    started = sim.events[0].started
    assert (started.host_id, started.model) == ("fast", "m")
    assert sim.last.finished.finish_reason == "stop"
    assert sim.last.finished.usage.output_tokens == 4
    assert sim.was_cancelled("slow")
    assert not sim.was_cancelled("fast")
    assert outcomes(sim) == {"fast": ATTEMPT_OUTCOME_WON, "slow": ATTEMPT_OUTCOME_LOST}
    assert sim.event is not None
    assert sim.event.succeeded
    assert sim.event.first_token_ms == 50


def test_tokens_that_arrive_together_go_out_as_one_delta() -> None:
    sim = Sim(assignment(["h"]), {"h": tokens(*STORY, gap=0.0)}).run()
    assert sim.text == "Once upon a time."
    assert sim.deltas == 1


def test_a_hedged_host_starts_only_after_the_hedge_delay() -> None:
    sim = Sim(
        assignment(["first", "hedge"], hedge_ms=150),
        {"first": tokens(*STORY, first=0.1), "hedge": tokens(*STORY, first=0.01)},
    ).run()
    assert [host for _, host, _ in sim.launched] == ["first"]  # won before the hedge was due

    sim = Sim(
        assignment(["first", "hedge"], hedge_ms=150),
        {"first": tokens(*STORY, first=1.0), "hedge": tokens(*STORY, first=0.01)},
    ).run()
    ((at, _),) = sim.launches("hedge")
    assert at == 0.15
    assert sim.events[0].started.host_id == "hedge"
    assert sim.race is not None
    roles = {a.host.host_id: a.role for a in sim.race.attempts.values()}
    assert roles == {"first": ATTEMPT_ROLE_RACER, "hedge": ATTEMPT_ROLE_HEDGE}


def test_a_failed_first_host_launches_the_hedge_at_once() -> None:
    sim = Sim(
        assignment(["first", "hedge"], hedge_ms=150),
        {"first": fails(ERROR_CODE_HOST_FAILED, after=0.02), "hedge": tokens(*STORY)},
    ).run()
    ((at, _),) = sim.launches("hedge")
    assert at == 0.02
    assert sim.text == "Once upon a time."


def test_no_first_token_by_the_deadline_sends_the_task_to_the_fallback() -> None:
    sim = Sim(
        assignment(["a", "b"], ["pool"], deadline_ms=500),
        {"a": silent, "b": silent, "pool": tokens(*STORY, first=0.1)},
    ).run()
    ((at, _),) = sim.launches("pool")
    assert at == 0.5
    assert sim.events[0].started.path == REQUEST_PATH_FALLBACK
    assert sim.text == "Once upon a time."
    assert sim.event is not None
    assert sim.event.first_token_deadline_hit
    assert sim.event.path == REQUEST_PATH_FALLBACK
    assert sim.was_cancelled("a")
    assert sim.was_cancelled("b")
    assert sim.race is not None
    assert sim.race.winner is not None
    assert sim.race.winner.role == ATTEMPT_ROLE_FALLBACK
    assert sim.settled["pool"].fallback


def test_the_race_gives_up_when_the_fallback_is_silent_too() -> None:
    sim = Sim(
        assignment(["a"], ["pool"], deadline_ms=500),
        {"a": silent, "pool": silent},
        fallback_timeout_s=2.0,
    ).run()
    assert sim.last.failed.code == ERROR_CODE_DEADLINE_EXCEEDED
    assert sim.now == 2.5
    assert sim.event is not None
    assert not sim.event.succeeded


def test_every_host_busy_is_hosts_busy() -> None:
    sim = Sim(
        assignment(["a", "b"]),
        {"a": fails(ERROR_CODE_HOST_BUSY), "b": fails(ERROR_CODE_HOST_BUSY, after=0.02)},
    ).run()
    assert sim.last.failed.code == ERROR_CODE_HOST_BUSY
    # The raced hosts are the last spares: each is asked once more as the fallback, then no one.
    assert [host for _, host, _ in sim.launched] == ["a", "b", "a", "b"]


def test_a_stalled_stream_continues_on_a_spare_from_the_emitted_prefix() -> None:
    sim = Sim(
        assignment(["a"], ["pool"], stall_ms=500),
        {
            "a": tokens("The village ", "slept. ", "The ", finish=None),
            "pool": tokens("The night ", "was calm."),
        },
    ).run()
    ((at, task),) = sim.launches("pool")
    assert at == 0.07 + 0.5  # the last token, then the stall deadline
    assert ANSWER_START in task.messages[-1].content
    assert "The village slept." in task.messages[-1].content
    # The client already had "The " past the safe prefix: not repeated.
    assert sim.text == "The village slept. The night was calm."
    assert sim.event is not None
    assert sim.event.continuations == 1
    assert sim.event.succeeded
    assert outcomes(sim) == {"a": ATTEMPT_OUTCOME_FAILED, "pool": ATTEMPT_OUTCOME_WON}
    assert sim.race is not None
    roles = {a.host.host_id: a.role for a in sim.race.attempts.values()}
    assert roles["pool"] == ATTEMPT_ROLE_CONTINUATION


def test_a_failed_stream_continues_and_a_failing_heir_passes_to_the_next() -> None:
    broken = tokens("One. ", "Two. ", finish=None)
    sim = Sim(
        assignment(["a"], ["p1", "p2"]),
        {
            "a": then(broken, silent),
            "p1": fails(ERROR_CODE_HOST_FAILED),
            "p2": tokens("Three."),
        },
    )
    sim.hosts["a"] = lambda task: [*broken(task), (0.01, _failed())]
    sim.run()
    assert sim.text == "One. Two. Three."
    assert [host for _, host, _ in sim.launched] == ["a", "p1", "p2"]
    assert sim.event is not None
    assert sim.event.continuations == 2


def _failed() -> HostChunk:
    return HostChunk(failed=ErrorDetail(code=ERROR_CODE_HOST_FAILED, message="boom"))


def test_no_spare_ends_the_stream_and_pays_the_partial_winner_for_what_it_delivered() -> None:
    sim = Sim(assignment(["a"]), {"a": tokens("Half ", "an ", finish=None)}).run()
    assert sim.text == "Half an "
    assert sim.last.failed.code == ERROR_CODE_HOST_FAILED
    assert "no host can continue it" in sim.last.failed.message
    settled = sim.settled["a"]
    assert settled.outcome == ATTEMPT_OUTCOME_WON
    assert settled.usage.output_tokens == settled.delivered_tokens == 2
    assert outcomes(sim) == {"a": ATTEMPT_OUTCOME_FAILED}


def test_continuations_stop_at_the_limit() -> None:
    stalls = tokens("Word. ", finish=None)
    sim = Sim(
        assignment(["a"], ["p1", "p2"]),
        {"a": stalls, "p1": stalls, "p2": stalls},
        max_continuations=1,
    ).run()
    assert "no retries left" in sim.last.failed.message
    assert [host for _, host, _ in sim.launched] == ["a", "p1"]


def test_the_budget_cut_stops_a_host_past_max_tokens() -> None:
    words = [f"w{n} " for n in range(10)]
    sim = Sim(assignment(["a"], max_tokens=3), {"a": tokens(*words)}).run()
    assert sim.text == "w0 w1 w2 "
    assert sim.last.finished.finish_reason == "length"
    assert sim.was_cancelled("a")
    assert sim.event is not None
    (attempt,) = sim.event.attempts
    assert attempt.outcome == ATTEMPT_OUTCOME_WON
    assert attempt.violations == 1
    assert attempt.output_tokens == 3
    assert sim.settled["a"].usage.output_tokens == 3


def test_the_character_cap_cuts_a_flood_within_the_budget() -> None:
    sim = Sim(assignment(["a"], max_tokens=2), {"a": tokens("x" * 20, "y" * 20)}).run()
    assert sim.text == "x" * 20 + "y" * 12  # 16 characters per token
    assert sim.last.finished.finish_reason == "length"


def test_an_engines_refusal_ends_the_race_at_once_without_fallback() -> None:
    refusal = fails(
        ERROR_CODE_REQUEST_REJECTED, http_status=400, client_code="context_length_exceeded"
    )
    sim = Sim(
        assignment(["a", "b"], ["pool"]), {"a": refusal, "b": silent, "pool": tokens("x")}
    ).run()
    failed = sim.last.failed
    assert (failed.code, failed.http_status, failed.client_code) == (
        ERROR_CODE_REQUEST_REJECTED,
        400,
        "context_length_exceeded",
    )
    assert sim.now == 0.01
    assert not sim.launches("pool")
    assert sim.was_cancelled("b")
    assert outcomes(sim) == {"a": ATTEMPT_OUTCOME_REJECTED, "b": ATTEMPT_OUTCOME_LOST}
    assert sim.settled["a"].outcome == ATTEMPT_OUTCOME_LOST


def test_reasoning_is_relayed_apart_and_counts_as_progress() -> None:
    sim = Sim(
        assignment(["a", "b"], deadline_ms=100, stall_ms=100),
        {
            "a": tokens("Two.", reasoning=["Let ", "me ", "think. "], first=0.05, gap=0.08),
            "b": silent,
        },
    ).run()
    assert sim.reasoning == "Let me think. "
    assert sim.text == "Two."
    assert sim.events[0].started.host_id == "a"
    assert sim.event is not None
    assert not sim.event.first_token_deadline_hit
    assert sim.event.continuations == 0


def test_an_engines_own_usage_is_billed_within_the_bytes_it_relayed() -> None:
    honest = Usage(input_tokens=12, output_tokens=7, reported_by_engine=True)
    sim = Sim(assignment(["a"]), {"a": tokens("abc", "defg", usage=honest)}).run()
    assert sim.last.finished.usage.output_tokens == 7  # more than the 2 chunks: not clipped
    assert sim.settled["a"].usage.output_tokens == 7
    assert sim.settled["a"].delivered_tokens == 7

    lying = Usage(input_tokens=10**6, output_tokens=10**6, reported_by_engine=True)
    sim = Sim(assignment(["a"]), {"a": tokens("abc", "defg", usage=lying)}).run()
    assert sim.settled["a"].usage.output_tokens == 7 + 2  # bytes relayed plus the allowance
    assert sim.race is not None
    assert sim.settled["a"].usage.input_tokens == sim.race.prompt_tokens

    claimed = Usage(input_tokens=3, output_tokens=1000)  # not the engine's: chunks counted
    sim = Sim(assignment(["a"]), {"a": tokens("abc", "defg", usage=claimed)}).run()
    assert sim.settled["a"].usage.output_tokens == 2


def test_a_client_that_leaves_stops_every_host_and_pays_for_what_it_got() -> None:
    words = [f"w{n} " for n in range(100)]
    sim = Sim(assignment(["a", "b"]), {"a": tokens(*words), "b": tokens(*words, first=0.5)})
    sim.run(cancel_at=0.205)
    assert sim.was_cancelled("a")
    assert sim.was_cancelled("b")
    assert not any(e.HasField("failed") or e.HasField("finished") for e in sim.events)
    settled = sim.settled["a"]
    assert settled.outcome == ATTEMPT_OUTCOME_WON
    assert settled.usage.output_tokens == settled.delivered_tokens == 16


def test_a_duel_takes_a_loser_which_is_not_cancelled_and_is_judged_on_the_whole_answer() -> None:
    offers: list[DuelOffer] = []

    def take(offer: DuelOffer) -> str | None:
        offers.append(offer)
        return offer.losers[0].attempt_id

    sim = Sim(
        assignment(["a", "b"]),
        # The loser's whole answer lands in the same batch as the winner's first token.
        {"a": tokens(*STORY), "b": tokens("Other", first=0.05, gap=0.0)},
        duels=take,
    ).run()
    (offer,) = offers
    assert offer.winner.host_id == "a"
    assert [c.host_id for c in offer.losers] == ["b"]
    assert not sim.was_cancelled("b")
    assert [c.WhichOneof("event") for c in sim.duel_chunks] == ["token", "finished"]
    assert sim.closed_duels == [("b", "Once upon a time.")]


def test_a_duel_is_dropped_and_its_loser_cancelled_when_the_answer_was_continued() -> None:
    sim = Sim(
        assignment(["a", "b"], ["pool"]),
        {"a": tokens("Done. ", finish=None), "b": silent, "pool": tokens("More.")},
        duels=lambda offer: offer.losers[0].attempt_id,
    ).run()
    assert sim.closed_duels == [("b", None)]
    assert sim.was_cancelled("b")


def test_a_fallback_that_lost_the_first_token_race_can_still_continue_the_stream() -> None:
    # Issue 14 (7): width 1, one idle pool host; the raced host wins after the deadline, then
    # dies mid-stream: the pool host that lost the first-token race continues it.
    sim = Sim(
        assignment(["a"], ["pool"], deadline_ms=500),
        {
            "a": tokens("The village ", "slept. ", first=0.6, finish=None),
            "pool": then(tokens("Late.", first=0.5), tokens("The night was calm.")),
        },
    ).run()
    assert [host for _, host, _ in sim.launched] == ["a", "pool", "pool"]
    assert sim.was_cancelled("pool")
    assert sim.text == "The village slept. The night was calm."
    assert sim.event is not None
    assert sim.event.succeeded
    assert sim.race is not None
    roles = [a.role for a in sim.race.attempts.values()]
    assert roles == [ATTEMPT_ROLE_RACER, ATTEMPT_ROLE_FALLBACK, ATTEMPT_ROLE_CONTINUATION]


def _tool_calls(*fragments: str, first: float = 0.05, finish: str | None = "tool_calls") -> Script:
    """A host that answers with tool-call fragments (each a `delta.tool_calls` JSON array)."""

    def script(task: HostTask) -> list[Step]:
        steps: list[Step] = []
        delay = first
        for fragment in fragments:
            steps.append((delay, HostChunk(token=HostToken(tool_calls_json=fragment))))
            delay = 0.01
        if finish is not None:
            done = HostFinished(finish_reason=finish, usage=Usage())
            steps.append((delay, HostChunk(finished=done)))
        return steps

    return script


CALL = (
    '[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":""}}]',
    '[{"index":0,"function":{"arguments":"{\\"a\\":"}}]',
    '[{"index":0,"function":{"arguments":"1}"}}]',
)


def test_a_tool_call_wins_the_race_and_its_fragments_are_relayed_exactly() -> None:
    sim = Sim(
        assignment(["tools", "slow"]),
        {"tools": _tool_calls(*CALL, first=0.05), "slow": tokens(*STORY, first=0.3)},
    ).run()
    assert sim.events[0].started.host_id == "tools"
    assert sim.was_cancelled("slow")
    relayed = [f for e in sim.events if e.HasField("delta") for f in e.delta.tool_calls_json]
    assert relayed == list(CALL)
    assert sim.last.finished.finish_reason == "tool_calls"
    assert sim.event is not None
    assert sim.event.first_token_ms == 50


def test_a_stream_that_stalls_inside_a_tool_call_fails_and_is_never_continued() -> None:
    sim = Sim(
        assignment(["a"], ["pool"], stall_ms=300),
        {"a": _tool_calls(*CALL[:2], finish=None), "pool": tokens("never")},
    ).run()
    assert sim.last.failed.code == ERROR_CODE_HOST_FAILED
    assert "inside a tool call" in sim.last.failed.message
    assert sim.launches("pool") == []
    relayed = [f for e in sim.events if e.HasField("delta") for f in e.delta.tool_calls_json]
    assert relayed == list(CALL[:2])


def test_logprobs_entries_travel_with_their_text() -> None:
    def scored(task: HostTask) -> list[Step]:
        return [
            (0.05, HostChunk(token=HostToken(text="Hi", logprobs_json='{"token":"Hi"}'))),
            (0.0, HostChunk(token=HostToken(text="!", logprobs_json='{"token":"!"}'))),
            (0.01, HostChunk(finished=HostFinished(finish_reason="stop", usage=Usage()))),
        ]

    sim = Sim(assignment(["a"]), {"a": scored}).run()
    assert sim.text == "Hi!"
    entries = ",".join(e.delta.logprobs_json for e in sim.events if e.HasField("delta"))
    assert entries == '{"token":"Hi"},{"token":"!"}'


def test_a_tool_call_flood_is_not_relayed_and_counts_against_the_host() -> None:
    flood = '[{"index":0,"function":{"arguments":"' + "x" * MAX_TOOL_CALLS_CHARS + '"}}]'
    sim = Sim(assignment(["a"]), {"a": _tool_calls(CALL[0], flood, CALL[2])}).run()
    relayed = [f for e in sim.events if e.HasField("delta") for f in e.delta.tool_calls_json]
    assert relayed == [CALL[0]]
    assert sim.last.finished.finish_reason == "length"
    assert sim.settled["a"].violations == 1
