"""`/v1/completions` and `/v1/embeddings` through the stack to a real llama-server (Gemma 3
270M, run with `--embeddings --pooling mean`, which serves both), when the engine cache has
one; skipped otherwise."""

from __future__ import annotations

import math
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from nats.aio.client import Client

from llooma.host.config import Features, HostConfig, ModelConfig
from llooma.host.worker import HostWorker
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack
from tests.stack.test_host_real_engine import MODEL, SERVER, _wait_ready
from tests.stack.test_race import wait_listed

pytestmark = pytest.mark.skipif(
    SERVER is None or MODEL is None, reason="no llama-server and .gguf in the engine cache"
)


@pytest.fixture(scope="module")
def embedding_server() -> Iterator[str]:
    assert SERVER is not None
    assert MODEL is not None
    port = free_port()
    process = subprocess.Popen(
        [
            str(SERVER),
            "-m",
            str(MODEL),
            "-c",
            "1024",
            "--embeddings",
            "--pooling",
            "mean",
            "--metrics",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            "1",
            "-np",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.timeout(120)
async def test_completions_and_embeddings_from_a_real_engine(
    embedding_server: str, stack: Stack, http: httpx.AsyncClient, nc: Client, nats_url: str
) -> None:
    model = f"gemma-{uuid.uuid4().hex[:6]}"
    served = ModelConfig(
        name=model,
        backend="openai",
        base_url=embedding_server + "/v1",
        engine="llama.cpp",
        capacity=2,
        features=Features(embeddings=True),
    )
    worker = HostWorker(HostConfig(name=f"host-{model}", nats_url=nats_url, models=[served]), nc)
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY)
    await worker.start()
    try:
        await wait_listed(http, model)
        texts = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Stock prices fell."]
        answer = await client.embeddings.create(model=model, input=[*texts, texts[0]])
        completion = await client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=6, temperature=0
        )
    finally:
        await worker.drain()
    vectors = [item.embedding for item in answer.data]
    assert len(vectors) == 4
    assert len({len(vector) for vector in vectors}) == 1
    assert len(vectors[0]) >= 64
    # What the engine itself answers for the same inputs, each in its place (llama-server's
    # vectors depend a little on the batch: a repeated input is not the same vector).
    async with httpx.AsyncClient(base_url=embedding_server, timeout=30) as direct:
        engine = await direct.post("/v1/embeddings", json={"input": [*texts, texts[0]]})
    by_index = sorted(engine.json()["data"], key=lambda item: item["index"])
    for relayed, original in zip(vectors, by_index, strict=True):
        assert cosine(relayed, original["embedding"]) > 0.9999
    # The engine's own count, for four inputs of several tokens each.
    assert answer.usage.prompt_tokens >= 16
    text = completion.choices[0].text
    assert text.strip()
    assert completion.usage is not None
    # The raw prompt, not a chat template around it: a handful of tokens.
    assert completion.usage.prompt_tokens <= 8
    assert 1 <= completion.usage.completion_tokens <= 6
