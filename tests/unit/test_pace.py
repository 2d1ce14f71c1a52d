"""Deadlines from what each host really does (issue 14, item 8), in memory: the first-token
deadline follows a slow host's pace (under a cap, never past a client's header), the stall
deadline a host's usual pauses and the prompts prefilling on its engine."""

from __future__ import annotations

from llooma.v1.pipeline_pb2 import HostCandidate
from llooma.v1.race_pb2 import ATTEMPT_ROLE_RACER
from services.racer.pace import MIN_SAMPLES, Pace
from services.racer.state import Attempt, Race
from tests.unit.race_sim import Sim, assignment, silent, tokens

WORDS = [f"w{n} " for n in range(6)]


def trained(host: str, *, first: float, pause: float = 0.01, prompt_tokens: int = 100) -> Pace:
    """A pace that saw MIN_SAMPLES races of `host` with these timings."""
    pace = Pace()
    for n in range(MIN_SAMPLES):
        race = Race(assignment([host]), 0.0, 1.0)
        attempt = Attempt(f"seen{n}", HostCandidate(host_id=host, model="m"), ATTEMPT_ROLE_RACER, 0)
        attempt.first_token_at = first
        attempt.prompt_tokens = prompt_tokens
        attempt.output_tokens = attempt.delivered = 10
        attempt.last_token_at = first + 1.0
        attempt.longest_pause_s = pause
        race.attempts[attempt.attempt_id] = attempt
        pace.launched(attempt)
        pace.settled(race)
    return pace


def test_a_slow_host_is_not_sent_to_the_fallback_for_being_itself() -> None:
    hosts = {"slow": tokens(*WORDS, first=1.2), "pool": tokens(*WORDS, first=0.01)}
    # Without observations: δ = 1 s, the fallback joins (and wins).
    sim = Sim(assignment(["slow"], ["pool"]), hosts).run()
    assert sim.launches("pool")
    assert sim.events[0].started.host_id == "pool"
    # With the host's pace (p95 1.2 s): δ = 1.8 s, no fallback.
    sim = Sim(assignment(["slow"], ["pool"]), hosts, pace=trained("slow", first=1.2)).run()
    assert not sim.launches("pool")
    assert sim.events[0].started.host_id == "slow"
    assert sim.event is not None
    assert not sim.event.first_token_deadline_hit


def test_the_paced_deadline_is_capped_and_a_clients_header_is_kept() -> None:
    pace = trained("glacial", first=30.0)
    hosts = {"glacial": silent, "pool": tokens("ok")}
    sim = Sim(assignment(["glacial"], ["pool"]), hosts, pace=pace).run()
    ((at, _),) = sim.launches("pool")
    assert at == 4.0  # 4 x δ at most

    task = assignment(["glacial"], ["pool"])
    task.request.first_token_deadline_ms = 1000  # the client's header
    sim = Sim(task, hosts, pace=pace).run()
    ((at, _),) = sim.launches("pool")
    assert at == 1.0


def test_a_host_that_usually_pauses_is_not_handed_over_for_its_usual_pause() -> None:
    pausing = lambda task: [  # noqa: E731
        *tokens("One. ", finish=None)(task),
        *tokens("Two.", first=0.9)(task),
    ]
    hosts = {"a": pausing, "pool": tokens("Other.")}
    sim = Sim(assignment(["a"], ["pool"], stall_ms=500), hosts).run()
    assert sim.launches("pool")  # 0.9 s > 0.5 s: handed over
    sim = Sim(
        assignment(["a"], ["pool"], stall_ms=500), hosts, pace=trained("a", first=0.05, pause=0.8)
    )
    sim.run()
    assert not sim.launches("pool")  # 1.5 x 0.8 s = 1.2 s
    assert sim.text == "One. Two."


def test_the_stall_deadline_waits_for_a_prompt_prefilling_on_the_same_engine() -> None:
    # The host's first tokens take 10 ms per prompt token; another request's 200-token prompt
    # is prefilling on it: 2 s more before this stream counts as stalled.
    pace = trained("a", first=1.0, prompt_tokens=100)
    other = Attempt("other", HostCandidate(host_id="a", model="m"), ATTEMPT_ROLE_RACER, 0.0)
    other.prompt_tokens = 200
    paused = lambda task: [  # noqa: E731
        *tokens("One. ", first=0.05, finish=None)(task),
        *tokens("Two.", first=2.2)(task),
    ]
    hosts = {"a": paused, "pool": tokens("Other.")}
    sim = Sim(assignment(["a"], ["pool"], stall_ms=500), hosts, pace=pace).run()
    assert sim.launches("pool")  # nothing else prefilling: 0.5 s is the deadline
    pace.launched(other)
    sim = Sim(assignment(["a"], ["pool"], stall_ms=500), hosts, pace=pace).run()
    assert not sim.launches("pool")
    assert sim.text == "One. Two."


def test_the_pace_learns_from_the_races_it_runs() -> None:
    pace = Pace()
    hosts = {"a": tokens(*WORDS, first=0.3, gap=0.05)}
    for _ in range(MIN_SAMPLES):
        Sim(assignment(["a"]), hosts, pace=pace).run()
    winner = Attempt("x", HostCandidate(host_id="a", model="m"), ATTEMPT_ROLE_RACER, 0.0)
    task = assignment(["a"], deadline_ms=200, stall_ms=50)
    assert abs(pace.first_token_s(task) - 1.5 * 0.3) < 1e-9
    assert abs(pace.stall_s(winner, task) - 1.5 * 0.05) < 1e-9
