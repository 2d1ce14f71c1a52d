"""A stream handed to another host, in memory (issue 14, item 6): by prefill where the engine
can continue an assistant message; otherwise an instructed continuation whose frame never
reaches the client, whatever the model echoes; seams keep their whitespace."""

from __future__ import annotations

import pytest

from llooma.continuation import ANSWER_END, ANSWER_START, TAIL_END, TAIL_START, frame_texts
from llooma.continuation_guard import EchoFilter, FrameGuard
from tests.unit.race_sim import Sim, assignment, tokens

BROKEN = tokens("The village ", "slept.", finish=None)
FRAME_WORDS = ("<<<", ">>>", "Output only", "Continue the answer", "cut off", "answer so far")


def handed_over(continuation: list[str], *, prefill: bool = False) -> Sim:
    return Sim(
        assignment(["a"], ["pool"], prefill=["pool"] if prefill else []),
        {"a": BROKEN, "pool": tokens(*continuation)},
    ).run()


def assert_no_frame(text: str) -> None:
    for word in FRAME_WORDS:
        assert word.lower() not in text.lower(), text


def test_a_prefill_host_continues_the_answer_as_its_own_message() -> None:
    sim = handed_over([" The night was calm."], prefill=True)
    ((_, task),) = sim.launches("pool")
    assert [m.role for m in task.messages] == ["user", "assistant"]
    assert task.messages[-1].content == "The village slept."
    assert all(ANSWER_START not in m.content for m in task.messages)
    assert sim.text == "The village slept. The night was calm."


def test_a_prefill_extends_the_clients_own_trailing_assistant_message() -> None:
    task = assignment(["a"], ["pool"], prefill=["pool"])
    task.request.messages.add(role="assistant", content="Once: ")
    sim = Sim(task, {"a": BROKEN, "pool": tokens(" More.")}).run()
    ((_, sent),) = sim.launches("pool")
    assert [m.role for m in sent.messages] == ["user", "assistant"]
    assert sent.messages[-1].content == "Once: The village slept."


def test_an_instructed_seam_after_a_full_stop_keeps_its_space() -> None:
    assert handed_over(["The night ", "was calm."]).text == "The village slept. The night was calm."


@pytest.mark.parametrize(
    "echo",
    [
        ["<<<END >>>>>>\n", "The night was calm."],
        ["Output only the continuation, with no preamble and no markers.\n", "The night was calm."],
        [
            "Continue the answer exactly where it stops, in the same format (prose). ",
            "The night was calm.",
        ],
        [f"{ANSWER_START}\nThe village slept.\n{ANSWER_END}\n", "The night was calm."],
        [f"{TAIL_START}\nThe village slept.\n{TAIL_END}\nThe night was calm."],
        ["The night was calm.", f"\n{ANSWER_END}"],
        ["The night was calm. ", "<<<", "END", ">>>"],
        # As Gemma 3 270M (a base model) mangled the markers on a real engine.
        ["<<ANSWER SO FAR>>>\n<<END>>>\n", "The night was calm."],
        ["<<ANSWER>>\n<<END>>\n<END>>\n", "The night was calm."],
        ["SO FAR>>>\n", "The night was calm.", "\n<<<\n"],
    ],
)
def test_no_echo_of_the_frame_reaches_the_client(echo: list[str]) -> None:
    sim = handed_over(echo)
    assert_no_frame(sim.text)
    assert sim.text.startswith("The village slept. The night was calm.")


def test_a_frame_echoed_one_character_at_a_time_is_still_removed() -> None:
    echoed = "<<<END>>>\nOutput only the continuation, with no preamble and no markers.\nThe end."
    sim = handed_over(list(echoed))
    assert sim.text == "The village slept. The end."


def test_a_frame_sentence_the_stream_ends_in_is_removed() -> None:
    # Cut off by max_tokens inside an echoed sentence: nothing more will come to finish it.
    sim = handed_over(["The night was calm.\n", "Output only the continuation, with"])
    assert sim.text == "The village slept. The night was calm.\n"


def test_a_full_re_emission_of_the_answer_so_far_is_dropped() -> None:
    emitted = "The village slept under the stars, and the river ran on. "
    sim = Sim(
        assignment(["a"], ["pool"]),
        {
            "a": tokens(emitted, finish=None),
            "pool": tokens(emitted, "Morning came."),
        },
    ).run()
    assert sim.text == emitted + "Morning came."


def test_the_guard_keeps_ordinary_text_and_releases_what_only_looked_like_a_frame() -> None:
    guard = FrameGuard()
    text = (
        "This is the answer to your question: use a < b and x >> 2. Output only once. I SAID "
        "SO. This is the answer"
    )
    out = "".join(guard.feed(c) for c in text) + guard.flush()
    assert out == text
    for sentence in frame_texts():
        guard = FrameGuard()
        assert guard.feed(f"Before. {sentence.strip()} After.") + guard.flush() == "Before. After."


def test_the_echo_filter_holds_only_while_it_may_be_an_echo() -> None:
    echo = EchoFilter("The village slept under the stars, and the river ran on.")
    assert echo.feed("The village") == ""
    assert echo.feed(" woke.") == "The village woke."
