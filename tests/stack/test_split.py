"""The split path on the running stack: planner, DAG execution, compression, aggregation."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from functools import partial

import httpx
from nats.aio.client import Client

from llooma.v1.common_pb2 import Usage
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from tests.conftest import AUTH, SPLITTER_MODEL, RaceEvents
from tests.stack.test_race import wait_listed
from tests.support.scripted_host import Reply, ScriptedHost

THREE_PARTS = (
    "I am writing a guide for new volunteers at our community garden this season.\n"
    "1. Explain how to prepare a raised bed in early spring.\n"
    "2. Describe a watering routine for hot summer weeks.\n"
    "3. List the tools every volunteer should bring.\n"
)
PART = re.compile(r"Answer only part (\S+)")


async def answer_part(
    delays: dict[str, float], prompts: list[str], task: HostTask, reply: Reply
) -> None:
    prompt = task.messages[-1].content
    prompts.append(prompt)
    match = PART.search(prompt)
    label = match.group(1) if match else "whole"
    await asyncio.sleep(delays.get(label, 0.0))
    for word in f"Answer for {label} here.".split(" "):
        await reply(HostChunk(token=HostToken(text=word + " ")))
    finished = HostFinished(finish_reason="stop", usage=Usage(input_tokens=5, output_tokens=4))
    await reply(HostChunk(finished=finished))


async def test_an_enumerated_prompt_races_its_parts_in_parallel_and_keeps_their_order(
    http: httpx.AsyncClient, nc: Client, race_events: RaceEvents
) -> None:
    model = f"splitter-{uuid.uuid4().hex[:6]}"
    prompts: list[str] = []
    # The first part is the slowest: its turn still comes first.
    script = partial(answer_part, {"1.": 0.3, "2.": 0.0, "3.": 0.1}, prompts)
    hosts = [ScriptedHost(nc, f"h{i}-{model}", model, script) for i in range(4)]
    for host in hosts:
        await host.__aenter__()
    try:
        await wait_listed(http, model, hosts=4)
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": model,
                "stream": True,
                "messages": [{"role": "user", "content": THREE_PARTS}],
            },
            headers={**AUTH, "x-llooma-race-width": "1"},
        ) as response:
            assert response.status_code == 200
            assert response.headers["x-llooma-path"] == "split"
            assert response.headers["x-llooma-plan"] == "split"
            request_id = response.headers["x-llooma-request-id"]
            lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
    finally:
        for host in hosts:
            await host.__aexit__(None, None, None)
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in lines
        if json.loads(line[6:])["choices"]
    )
    assert text == ("1. Answer for 1. here. \n\n2. Answer for 2. here. \n\n3. Answer for 3. here. ")
    assert len(prompts) == 3
    served_by = {h.host_id for h in hosts if h.received}
    assert len(served_by) == 3, "independent nodes run on different hosts"
    for _ in range(100):
        if sum(1 for e in race_events.by_request.values() if e.request_id == request_id) >= 1:
            break
        await asyncio.sleep(0.02)


async def test_a_dependency_chain_runs_in_order_with_compressed_parent_output(
    http: httpx.AsyncClient, nc: Client
) -> None:
    model = f"chain-{uuid.uuid4().hex[:6]}"
    prompts: list[str] = []
    # Long outputs: they must reach the dependant compressed.
    outputs = {"fruits": "Apples, pears and plums. " * 300, "vegetables": "Leeks and kale. " * 300}

    async def script(task: HostTask, reply: Reply) -> None:
        prompt = task.messages[-1].content
        prompts.append(prompt)
        if "Results of the earlier steps" in prompt:
            text = "A poem about the harvest."
        else:
            text = outputs["fruits" if "fruits" in prompt.split("\n\n")[1] else "vegetables"]
        await reply(HostChunk(token=HostToken(text=text)))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    prompt = (
        "We are preparing the autumn newsletter for the orchard club and need three things.\n"
        "- List the fruits that ripen in September in our region.\n"
        "- List the vegetables that ripen in September in our region.\n"
        "- Then, using the results, write a four-line poem about the harvest.\n"
    )
    async with ScriptedHost(nc, f"h-{model}", model, script):
        await wait_listed(http, model)
        response = await http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": prompt}]},
            headers=AUTH,
        )
    assert response.headers["x-llooma-path"] == "split", response.headers.get("x-llooma-plan")
    text = response.json()["choices"][0]["message"]["content"]
    assert len(prompts) == 3
    child = prompts[2]
    assert all("Results of the earlier steps" not in p for p in prompts[:2])
    assert "Results of the earlier steps" in child
    assert "Apples, pears and plums." in child
    assert "Leeks and kale." in child
    assert len(child) < len(outputs["fruits"]), "the parents' outputs were compressed"
    assert text.endswith("- A poem about the harvest.")
    assert text.index("Apples") < text.index("Leeks") < text.index("poem")


async def test_an_invalid_plan_from_the_split_call_is_answered_directly(
    http: httpx.AsyncClient, nc: Client
) -> None:
    model = f"prose-{uuid.uuid4().hex[:6]}"
    cyclic = {
        "nodes": [
            {"id": "a", "prompt": "x", "deps": ["b"]},
            {"id": "b", "prompt": "y", "deps": ["a"]},
        ]
    }
    huge = {"nodes": [{"id": str(i), "prompt": f"part {i}"} for i in range(20)]}

    async def splitter(task: HostTask, reply: Reply) -> None:
        plan = cyclic if "cycle" in task.messages[-1].content else huge
        await reply(HostChunk(token=HostToken(text=json.dumps(plan))))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    answered: list[str] = []

    async def direct(task: HostTask, reply: Reply) -> None:
        answered.append(task.messages[-1].content)
        await reply(HostChunk(token=HostToken(text="one whole answer")))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    async with (
        ScriptedHost(nc, f"splitter-{model}", SPLITTER_MODEL, splitter),
        ScriptedHost(nc, f"answerer-{model}", model, direct),
    ):
        await wait_listed(http, model)
        await wait_listed(http, SPLITTER_MODEL)
        for word, reason in (
            ("cycle", "the plan has a cycle"),
            ("sprawl", "20 nodes, more than 8"),
        ):
            content = (
                f"Think about a {word} of seasons in the northern forest. The trees change. "
                "The animals adapt to the cold and the light. Rivers freeze and thaw again. "
                "Write about all of it at length, with care for the small details."
            )
            response = await http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": content}]},
                headers=AUTH,
            )
            assert response.status_code == 200
            assert response.headers["x-llooma-path"] == "direct"
            assert response.headers["x-llooma-plan"] == f"direct: invalid plan: {reason}"
            assert response.json()["choices"][0]["message"]["content"] == "one whole answer"
    assert len(answered) == 2


async def test_a_short_prompt_bypasses_the_planner(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "synthetic-small", "messages": [{"role": "user", "content": "Hi!"}]},
        headers=AUTH,
    )
    assert response.status_code == 200
    assert response.headers["x-llooma-path"] == "direct"
    assert response.headers["x-llooma-plan"] == "bypass: short prompt"
