"""Stake locked in the ledger and slashing (issue 15): the pure rules in
llooma.ledger.economics, the draw's stake (llooma.selection.ledger_stake) and the racer's
no-show mark, the silence probes that see a silent loser, and the usage rule, with no
servers."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

import pytest

from llooma.ledger.economics import (
    PLATFORM,
    TREASURY,
    Prices,
    SlashRules,
    account_deltas,
    host_account,
    lock_stake,
    release_stake,
    settle_attempt,
    slash,
    slash_duel,
    slash_no_shows,
    slash_usage_claims,
    stake_account,
    unanimous_loser,
)
from llooma.selection import Candidate, ledger_stake, pick_hosts
from llooma.v1.common_pb2 import (
    ERROR_CODE_DEADLINE_EXCEEDED,
    ChatMessage,
    GenerationParams,
    Usage,
)
from llooma.v1.duel_pb2 import (
    DUEL_VERDICT_A,
    DUEL_VERDICT_B,
    DUEL_VERDICT_TIE,
    DUEL_VERDICT_UNSPECIFIED,
    DuelResult,
    DuelVerdict,
    JudgeVote,
)
from llooma.v1.pipeline_pb2 import HostCandidate
from llooma.v1.race_pb2 import ATTEMPT_ROLE_RACER
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, ATTEMPT_OUTCOME_WON, TaskSettlement
from services.racer.report import (
    ENGINE_TOKENS_ALLOWANCE,
    PROMPT_CLAIM_ABSURD_FACTOR,
    USAGE_CLAIM_SLACK_TOKENS,
    overclaimed,
)
from services.racer.state import Attempt, prompt_tokens
from tests.unit.race_sim import Sim, assignment, silent, tokens

RULES = SlashRules(no_show_streak=3, no_show_fraction=Fraction(1, 10), duel_fraction=Fraction(1, 4))


def attempt(host: str, n: int, *, no_show: bool = False, tokens_out: int = 0) -> TaskSettlement:
    return TaskSettlement(
        attempt_id=f"{host}-{n}",
        host_id=host,
        outcome=ATTEMPT_OUTCOME_WON if tokens_out else ATTEMPT_OUTCOME_LOST,
        usage=Usage(output_tokens=tokens_out),
        no_show=no_show,
    )


def test_a_stake_moves_credits_from_its_funding_into_the_hosts_stake_account() -> None:
    posting = lock_stake("stake:x", "h", 5_000_000, TREASURY)
    assert account_deltas([posting]) == {TREASURY: -5_000_000, stake_account("h"): 5_000_000}
    with pytest.raises(ValueError, match="positive"):
        lock_stake("stake:y", "h", 0, TREASURY)


def test_a_release_pays_at_most_what_is_left_of_the_stake_to_the_host() -> None:
    assert account_deltas([release_stake("u1", "h", 700, 1000)]) == {
        stake_account("h"): -700,
        host_account("h"): 700,
    }
    slashed_meanwhile = release_stake("u1", "h", 700, 300)
    assert slashed_meanwhile.txn_id == "release:u1"
    assert account_deltas([slashed_meanwhile])[host_account("h")] == 300
    assert release_stake("u1", "h", 700, 0).legs == ()


def test_a_slash_takes_its_fraction_of_the_stake_to_the_platform_with_its_reason() -> None:
    posting = slash("slash:no_show:a1", "a1", "h", 1_000_001, Fraction(1, 10), "no_show")
    assert account_deltas([posting]) == {stake_account("h"): -100_000, PLATFORM: 100_000}
    assert {leg.kind for leg in posting.legs} == {"slash:no_show"}
    assert slash("s", "r", "h", 0, Fraction(1, 10), "no_show").legs == ()


def test_a_streak_of_no_shows_is_slashed_once_it_reaches_the_rule_and_starts_again() -> None:
    batch = [attempt("lazy", n, no_show=True) for n in range(7)]
    locked = {"lazy": 1_000_000}
    out = slash_no_shows(RULES, batch, {}, locked)
    # The 3rd and the 6th complete a streak; the 7th starts the next one.
    assert [p.txn_id for p in out.postings] == ["slash:no_show:lazy-2", "slash:no_show:lazy-5"]
    # The second slash takes a tenth of what the first left.
    assert [p.legs[1].amount for p in out.postings] == [100_000, 90_000]
    assert locked == {"lazy": 810_000}
    assert out.streaks == {"lazy": 1}
    assert out.no_shows == {"lazy": 7}


def test_a_first_token_ends_the_streak_and_a_streak_carries_across_batches() -> None:
    honest_enough = [
        attempt("h", 0, no_show=True),
        attempt("h", 1, no_show=True),
        attempt("h", 2, tokens_out=4),
        attempt("h", 3, no_show=True),
    ]
    out = slash_no_shows(RULES, honest_enough, {}, {"h": 1_000_000})
    assert out.postings == []
    assert out.streaks == {"h": 1}
    # A batch that starts two into a streak slashes at its first no-show.
    out = slash_no_shows(RULES, [attempt("h", 9, no_show=True)], {"h": 2}, {"h": 1_000_000})
    assert [p.txn_id for p in out.postings] == ["slash:no_show:h-9"]
    # A host that lost a race without a token and was never late keeps its streak.
    out = slash_no_shows(RULES, [attempt("h", 10)], {"h": 2}, {"h": 1_000_000})
    assert out.streaks == {"h": 2}


def test_no_stake_or_a_zero_rule_slashes_nothing() -> None:
    batch = [attempt("poor", n, no_show=True) for n in range(3)]
    assert slash_no_shows(RULES, batch, {}, {}).postings == []
    off = SlashRules(no_show_streak=0)
    assert slash_no_shows(off, batch, {}, {"poor": 10**6}).postings == []


def vote(judge: str, in_order: DuelVerdict.ValueType, swapped: DuelVerdict.ValueType) -> JudgeVote:
    return JudgeVote(judge_host_id=judge, verdict_in_order=in_order, verdict_swapped=swapped)


def duel(outcome: DuelVerdict.ValueType, *votes: JudgeVote) -> DuelResult:
    return DuelResult(duel_id="d1", host_a="a", host_b="b", outcome=outcome, votes=list(votes))


def test_a_duel_lost_unanimously_by_two_or_more_judges_slashes_the_loser() -> None:
    unanimous = duel(
        DUEL_VERDICT_A,
        vote("j1", DUEL_VERDICT_A, DUEL_VERDICT_A),
        vote("j2", DUEL_VERDICT_A, DUEL_VERDICT_UNSPECIFIED),
    )
    assert unanimous_loser(unanimous) == "b"
    locked = {"b": 400}
    posting = slash_duel(RULES, unanimous, locked)
    assert posting is not None
    assert posting.txn_id == "slash:duel:d1"
    assert account_deltas([posting]) == {stake_account("b"): -100, PLATFORM: 100}
    assert locked == {"b": 300}


@pytest.mark.parametrize(
    "votes",
    [
        # One judge is not a panel.
        [vote("j1", DUEL_VERDICT_B, DUEL_VERDICT_B)],
        # A tie or a dissent in either order is not unanimous.
        [vote("j1", DUEL_VERDICT_B, DUEL_VERDICT_B), vote("j2", DUEL_VERDICT_B, DUEL_VERDICT_TIE)],
        [vote("j1", DUEL_VERDICT_B, DUEL_VERDICT_B), vote("j2", DUEL_VERDICT_A, DUEL_VERDICT_B)],
        # A duelist's vote does not count, and a judge that gave no verdict is not a vote.
        [vote("j1", DUEL_VERDICT_B, DUEL_VERDICT_B), vote("b", DUEL_VERDICT_B, DUEL_VERDICT_B)],
        [
            vote("j1", DUEL_VERDICT_B, DUEL_VERDICT_B),
            vote("j2", DUEL_VERDICT_UNSPECIFIED, DUEL_VERDICT_UNSPECIFIED),
        ],
    ],
)
def test_a_duel_not_lost_unanimously_slashes_nothing(votes: list[JudgeVote]) -> None:
    result = duel(DUEL_VERDICT_B, *votes)
    assert unanimous_loser(result) is None
    assert slash_duel(RULES, result, {"a": 400}) is None


def test_a_tie_has_no_loser() -> None:
    tie = duel(
        DUEL_VERDICT_TIE,
        vote("j1", DUEL_VERDICT_TIE, DUEL_VERDICT_TIE),
        vote("j2", DUEL_VERDICT_TIE, DUEL_VERDICT_TIE),
    )
    assert unanimous_loser(tie) is None


def test_the_draws_stake_is_the_announced_one_capped_at_the_locked_one_or_the_floor() -> None:
    assert ledger_stake(1000.0, 0, 0.0) == 0.0
    assert ledger_stake(1000.0, 2_500_000, 0.0) == 2.5
    assert ledger_stake(1.0, 2_500_000, 0.0) == 1.0  # announcing less spreads it over models
    assert ledger_stake(1000.0, 0, 1000.0) == 1000.0  # the floor: announced stake as is
    assert ledger_stake(3.0, 10_000_000, 1.0) == 3.0


def test_an_unstaked_host_announcing_the_maximum_is_drawn_almost_never() -> None:
    rng = random.Random(7)
    drawn: Counter[str] = Counter()
    for _ in range(2000):
        candidates = [
            Candidate("greedy", "m", 0.1, ledger_stake(1000.0, 0, 0.0)),
            Candidate("honest-1", "m", 0.2, ledger_stake(1000.0, 10_000_000, 0.0)),
            Candidate("honest-2", "m", 0.3, ledger_stake(1000.0, 10_000_000, 0.0)),
        ]
        drawn.update(c.host_id for c in pick_hosts(candidates, k=2, bucket_size=4, rng=rng))
    # Its weight is the draw's floor (1e-3) against 10 and 10: ~1.5e-4 of races expected.
    assert drawn["greedy"] <= 2
    assert drawn["honest-1"] + drawn["honest-2"] >= 3998


def test_a_raced_host_silent_at_the_deadline_is_a_no_show_a_cancelled_loser_is_not() -> None:
    sim = Sim(
        assignment(["mute", "slow"], ["pool"], deadline_ms=500),
        {"mute": silent, "slow": tokens("late", first=0.7), "pool": tokens("x", first=0.5)},
    ).run()
    assert sim.settled["mute"].no_show
    # Late but it delivered: slow, not absent (it won at 0.7 s, before the pool's 1.0 s).
    assert not sim.settled["slow"].no_show
    assert not sim.settled["pool"].no_show
    quick = Sim(
        assignment(["fast", "mute"], deadline_ms=500),
        {"fast": tokens("hi", first=0.05), "mute": silent},
    ).run()
    # Cancelled as a loser before the deadline: it missed nothing.
    assert not quick.settled["mute"].no_show


# -- silence probes: a silent loser is seen even when another host answers first --------------


def always() -> bool:
    return True


def test_a_silent_loser_kept_as_a_probe_is_a_no_show_at_its_deadline_and_costs_no_fee() -> None:
    sim = Sim(
        assignment(["fast", "mute"], deadline_ms=500),
        {"fast": tokens("hi", first=0.05), "mute": tokens("x", first=5.0, accept=True)},
        probe=always,
    ).run()
    assert sim.text == "hi"
    mute = sim.settled["mute"]
    assert mute.no_show
    assert mute.accepted
    # Kept past the answer's end to its own deadline, then cancelled; settled only then.
    assert sim.cancelled == [(0.5, "mute")]
    assert sim.now == 0.5
    # Accepted and never sent a token: neither a reservation nor a progress fee.
    assert settle_attempt(Prices(), mute).legs == ()
    assert not sim.settled["fast"].no_show


def test_a_slow_honest_loser_kept_as_a_probe_is_cancelled_at_its_first_token_no_no_show() -> None:
    sim = Sim(
        assignment(["fast", "slow"], deadline_ms=500),
        {
            "fast": tokens("hi", first=0.05, usage=Usage(output_tokens=1)),
            "slow": tokens("late", "r", first=0.3, accept=True),
        },
        probe=always,
    ).run()
    slow = sim.settled["slow"]
    assert not slow.no_show
    assert slow.first_token_ms == 300
    assert slow.usage.output_tokens == 1
    assert sim.cancelled == [(0.3, "slow")]
    # It kept its commitment: its reservation fee (capped by the winner's payout) is due.
    assert account_deltas([settle_attempt(Prices(), slow)]).get(host_account("slow"), 0) > 0
    assert sim.text == "hi"


def test_an_unsampled_silent_loser_is_cancelled_at_the_first_token_as_before() -> None:
    sim = Sim(
        assignment(["fast", "mute"], deadline_ms=500),
        {"fast": tokens("hi", first=0.05), "mute": silent},
        probe=lambda: False,
    ).run()
    assert not sim.settled["mute"].no_show
    assert sim.cancelled == [(0.05, "mute")]


def test_a_probe_cut_short_by_the_clients_cancel_is_not_a_no_show() -> None:
    sim = Sim(
        assignment(["fast", "mute"], deadline_ms=500),
        {"fast": tokens("hi", first=0.05), "mute": silent},
        probe=always,
    ).run(cancel_at=0.2)
    assert not sim.settled["mute"].no_show
    assert (0.2, "mute") in sim.cancelled


def test_a_duels_silent_loser_is_a_no_show_and_a_speaking_one_is_not() -> None:
    mute = Sim(
        assignment(["fast", "mute"], deadline_ms=500),
        {"fast": tokens("hi", first=0.05), "mute": silent},
        duels=lambda offer: offer.losers[0].attempt_id,
    ).run()
    assert mute.settled["mute"].no_show
    # The duel's: never cancelled by the race (the duel drops it at its own timeout).
    assert not mute.was_cancelled("mute")
    speaking = Sim(
        assignment(["fast", "slow"], deadline_ms=500),
        {"fast": tokens("hi", first=0.05), "slow": tokens("other", first=0.2)},
        duels=lambda offer: offer.losers[0].attempt_id,
    ).run()
    assert not speaking.settled["slow"].no_show
    # Its first token reached the duel and ended the watch: the race settled then (the rest
    # of its answer reaches the duel through the racer's wildcard subscription).
    assert [c.WhichOneof("event") for c in speaking.duel_chunks] == ["token"]
    assert speaking.now == 0.2
    assert speaking.closed_duels == [("slow", "hi")]


def test_a_fallback_still_silent_at_its_own_deadline_is_a_no_show() -> None:
    sim = Sim(
        assignment(["mute"], ["pool"], deadline_ms=500),
        {"mute": silent, "pool": silent},
        fallback_timeout_s=1.0,
    ).run()
    # The pool host started at 0.5 s and had no token when the race gave up at 1.5 s.
    assert sim.last.failed.code == ERROR_CODE_DEADLINE_EXCEEDED
    assert sim.settled["pool"].no_show
    assert sim.settled["mute"].no_show


# -- the usage rule ----------------------------------------------------------------------------


def finished_attempt(tokens_out: int, relayed_bytes: int, prompt: int = 40) -> Attempt:
    attempt = Attempt("a1", HostCandidate(host_id="h", model="m"), ATTEMPT_ROLE_RACER, 0.0)
    attempt.output_tokens = tokens_out
    attempt.delivered = tokens_out
    attempt.delivered_bytes = relayed_bytes
    attempt.prompt_tokens = prompt
    return attempt


def test_a_usage_claim_within_the_slack_is_honest_and_beyond_it_is_a_lie() -> None:
    counted = finished_attempt(10, 10)
    plain = GenerationParams()
    assert not overclaimed(counted, Usage(input_tokens=30, output_tokens=10), plain)
    slack = USAGE_CLAIM_SLACK_TOKENS
    assert not overclaimed(counted, Usage(output_tokens=10 + slack), plain)
    assert overclaimed(counted, Usage(output_tokens=10 + slack + 1), plain)
    # An engine's own count may include a held-back stop string (bytes) and an end token.
    stopped = GenerationParams(stop=["<|end-of-answer|>"])
    held_back = len("<|end-of-answer|>") + ENGINE_TOKENS_ALLOWANCE
    engine_claim = Usage(output_tokens=10 + held_back + slack, reported_by_engine=True)
    assert not overclaimed(counted, engine_claim, stopped)
    engine_claim.output_tokens += 1
    assert overclaimed(counted, engine_claim, stopped)


def test_an_absurd_prompt_claim_is_a_lie_and_tools_count_toward_the_prompt() -> None:
    attempt = finished_attempt(3, 3, prompt=40)
    limit = PROMPT_CLAIM_ABSURD_FACTOR * 40
    assert not overclaimed(attempt, Usage(input_tokens=limit, output_tokens=3), GenerationParams())
    assert overclaimed(attempt, Usage(input_tokens=limit + 1, output_tokens=3), GenerationParams())
    # The ceiling (state.prompt_tokens) counts tool definitions: the same claim then fits.
    tools = GenerationParams(tools_json="x" * 2000)
    messages = [ChatMessage(role="user", content="x" * 10)]
    attempt.prompt_tokens = prompt_tokens(messages, tools)
    assert attempt.prompt_tokens > prompt_tokens(messages, GenerationParams()) + 900
    assert not overclaimed(attempt, Usage(input_tokens=limit + 1, output_tokens=3), tools)


def test_a_winner_inflating_its_usage_is_billed_on_the_count_and_marked() -> None:
    inflated = Usage(input_tokens=12, output_tokens=5000)
    sim = Sim(
        assignment(["liar", "other"]),
        {"liar": tokens("a", "b", first=0.05, usage=inflated), "other": tokens("x", first=0.3)},
    ).run()
    liar = sim.settled["liar"]
    assert liar.usage_overclaimed
    assert liar.violations == 1
    assert liar.claimed_usage.output_tokens == 5000
    assert liar.usage.output_tokens == 2  # billed on what the racer relayed
    assert sim.event is not None
    # A violation in the race event too: the dispatcher counts it in the host's error rate.
    assert [a.violations for a in sim.event.attempts if a.host_id == "liar"] == [1]
    assert sim.last.finished.usage.output_tokens == 2
    assert not sim.settled["other"].usage_overclaimed
    honest = Sim(
        assignment(["h"]), {"h": tokens("a", "b", usage=Usage(input_tokens=12, output_tokens=3))}
    ).run()
    assert not honest.settled["h"].usage_overclaimed
    assert honest.settled["h"].violations == 0


def test_each_usage_over_claim_costs_its_fraction_of_the_stake_once() -> None:
    rules = SlashRules(usage_fraction=Fraction(1, 50))
    lies = [
        TaskSettlement(attempt_id=f"l{n}", host_id="liar", usage_overclaimed=True) for n in (1, 2)
    ]
    honest = TaskSettlement(attempt_id="h1", host_id="honest")
    locked = {"liar": 1_000_000, "honest": 1_000_000}
    postings = slash_usage_claims(rules, [*lies, honest], locked)
    assert [p.txn_id for p in postings] == ["slash:usage:l1", "slash:usage:l2"]
    assert [p.legs[1].amount for p in postings] == [20_000, 19_600]
    assert {leg.kind for p in postings for leg in p.legs} == {"slash:usage"}
    assert locked == {"liar": 960_400, "honest": 1_000_000}
    assert slash_usage_claims(rules, lies, {}) == []
