"""What the host knows about the engine behind a model: its name and id, what it can do, and
whether it answers and how busy it is (probed off the serving path).

Load and health per engine:
- llama.cpp: `/metrics` (`llamacpp:requests_processing`, `llamacpp:requests_deferred`; needs
  `--metrics`); without it `/slots` (slots with `is_processing`); without that `/health`
  (503 while the model loads).
- vLLM: `/metrics` (`vllm:num_requests_running`, `vllm:num_requests_waiting`), else `/health`.
- SGLang: `/metrics` (`sglang:num_running_reqs`, `sglang:num_queue_reqs`; needs
  `--enable-metrics`), else `/health`.
- Ollama: `/api/ps` (answers when the server is up; it reports loaded models, not requests),
  else `/api/version`.
- any other OpenAI-compatible server: `metrics_url` when configured, else `GET <base>/models`.
An engine that does not answer its probe within the timeout, or answers it with an error, is
unreachable until a probe succeeds again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Literal

import orjson

from llooma.host.http import ConnectFailed, HttpError, HttpPool, parse_origin

EngineName = Literal["llama.cpp", "vllm", "sglang", "ollama", "openai"]
ENGINE_NAMES: tuple[EngineName, ...] = ("llama.cpp", "vllm", "sglang", "ollama", "openai")

FEATURE_NAMES = (
    "tools",
    "json_mode",
    "json_schema",
    "logprobs",
    "assistant_prefill",
    "reasoning",
    "embeddings",
    "multiple_choices",
)

# What each engine does out of the box; a host's YAML overrides any of these per model (a
# reasoning model, tool calling switched on in vLLM, ...).
DEFAULT_FEATURES: dict[str, frozenset[str]] = {
    # llama-server continues a trailing assistant message, has tools (--jinja), response_format
    # json_object / json_schema and logprobs.
    "llama.cpp": frozenset({"tools", "json_mode", "json_schema", "logprobs", "assistant_prefill"}),
    # vLLM continues the final message with continue_final_message; tools need server flags.
    "vllm": frozenset(
        {"json_mode", "json_schema", "logprobs", "assistant_prefill", "multiple_choices"}
    ),
    "sglang": frozenset({"json_mode", "json_schema", "logprobs", "multiple_choices"}),
    "ollama": frozenset({"tools", "json_mode", "json_schema"}),
    "openai": frozenset(),
    "synthetic": frozenset({"assistant_prefill"}),
    # Its bag-of-words vectors (backends.EchoBackend.embed).
    "echo": frozenset({"embeddings"}),
}

log = logging.getLogger(__name__)

_LOAD_METRICS = (
    ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
    ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
)
_WANTED = frozenset(name for pair in _LOAD_METRICS for name in pair)
_BODY_LIMIT = 1 << 20


def engine_root(base_url: str) -> str:
    """The engine's own root URL: the base URL without a trailing `/v1`, normalized."""
    origin = parse_origin(base_url)
    prefix = origin.prefix
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    return f"{origin.scheme}://{origin.host.lower()}:{origin.port}{prefix}"


def engine_id(base_url: str) -> str:
    """One id per engine instance: every model and host in front of it gets the same one."""
    return hashlib.sha256(engine_root(base_url).encode()).hexdigest()[:16]


def local_engine_id(host: str, model: str) -> str:
    """A synthetic or echo model is its own engine."""
    return hashlib.sha256(f"local:{host}:{model}".encode()).hexdigest()[:16]


def _parse_sample(line: str) -> tuple[str, float] | None:
    """The metric name and value of one exposition line, ignoring labels and timestamp."""
    index = 0
    length = len(line)
    while index < length and line[index] not in "{ \t":
        index += 1
    name = line[:index]
    while index < length and line[index] in " \t":
        index += 1
    if index < length and line[index] == "{":
        index += 1
        in_quotes = False
        while index < length:
            char = line[index]
            if in_quotes and char == "\\":
                index += 2
                continue
            if char == '"':
                in_quotes = not in_quotes
            elif char == "}" and not in_quotes:
                break
            index += 1
        if index >= length:
            return None
        index += 1
    fields = line[index:].split()
    if not name or not fields:
        return None
    try:
        value = float(fields[0])
    except ValueError:
        return None
    return name, value


def parse_load(text: str) -> tuple[float, float] | None:
    """(running, waiting) from a Prometheus page of llama.cpp, vLLM or SGLang, else None."""
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if (
            not line
            or line.startswith("#")
            or not line.startswith(("llamacpp:", "vllm:", "sglang:"))
        ):
            continue
        sample = _parse_sample(line)
        if sample is None or sample[0] not in _WANTED:
            continue
        name, value = sample
        # A NaN or infinite gauge would poison the sum; treat it as no data for that series.
        if math.isfinite(value):
            totals[name] = totals.get(name, 0.0) + value
        else:
            totals.setdefault(name, 0.0)
    for running, waiting in _LOAD_METRICS:
        if running in totals or waiting in totals:
            return totals.get(running, 0.0), totals.get(waiting, 0.0)
    return None


def parse_slots(body: bytes) -> int | None:
    """Busy slots in llama-server's `/slots` answer, else None."""
    try:
        slots = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(slots, list):
        return None
    return sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))


@dataclass(slots=True)
class EngineState:
    reachable: bool = True
    running: int = 0
    waiting: int = 0
    # True when running/waiting come from the engine (its metrics or slots).
    reported: bool = False


class EngineProbe:
    """Probes one engine: health, and load when the engine reports it. One small connection
    pool of its own, so a probe never waits behind serving traffic."""

    def __init__(
        self,
        engine: str,
        base_url: str,
        *,
        metrics_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self.engine = engine
        root = engine_root(base_url)
        self._pool = HttpPool(root, max_connections=1, connect_timeout_s=timeout_s)
        self._metrics_pool = (
            HttpPool(metrics_url, max_connections=1, connect_timeout_s=timeout_s)
            if metrics_url
            else None
        )
        self._timeout = timeout_s
        self._auth = f"Authorization: Bearer {api_key}\r\n" if api_key else None
        models_path = parse_origin(base_url).prefix[len(parse_origin(root).prefix) :] + "/models"
        # Endpoints tried in order; one that answers "not here" (404/501) is dropped for good.
        self._endpoints: list[str] = {
            "llama.cpp": ["metrics", "/slots", "/health"],
            "vllm": ["metrics", "/health"],
            "sglang": ["metrics", "/health"],
            "ollama": ["/api/ps", "/api/version"],
        }.get(engine, ["metrics", models_path] if metrics_url else [models_path])
        if engine in ("llama.cpp", "vllm", "sglang") and metrics_url is None:
            self._endpoints[0] = "/metrics"
        # Answered at once, without waiting for the engine's loop: the fallback when the load
        # endpoint is slow.
        self._health: str | None = {
            "llama.cpp": "/health",
            "vllm": "/health",
            "sglang": "/health",
            "ollama": "/api/version",
        }.get(engine)
        self._last = EngineState()

    async def aclose(self) -> None:
        await self._pool.aclose()
        if self._metrics_pool is not None:
            await self._metrics_pool.aclose()

    async def probe(self) -> EngineState:
        health = self._health
        budget = self._timeout * 0.6 if health else self._timeout
        try:
            async with asyncio.timeout(budget):
                self._last = await self._probe()
                return self._last
        except ConnectFailed:
            return EngineState(reachable=False)
        except (TimeoutError, HttpError):
            if health is None:
                return EngineState(reachable=False)
        # The load endpoint was slow (llama-server answers /metrics and /slots between two
        # batches, and a batch on a CPU can take seconds): /health answers at once, so the
        # engine is not taken for dead while it works. Its load is then the last one seen.
        try:
            async with asyncio.timeout(self._timeout - budget):
                async with self._pool.request("GET", health) as response:
                    status = response.status
                    await response.read(_BODY_LIMIT)
        except (TimeoutError, HttpError):
            return EngineState(reachable=False)
        if not 200 <= status < 300:
            return EngineState(reachable=False)
        last = self._last
        return EngineState(True, last.running, last.waiting, reported=last.reported)

    async def _probe(self) -> EngineState:
        while True:
            endpoint = self._endpoints[0]
            if endpoint == "metrics":
                assert self._metrics_pool is not None
                pool, path = self._metrics_pool, ""
            else:
                pool, path = self._pool, endpoint
            headers = self._auth if path.endswith("/models") else None
            async with pool.request("GET", path, headers=headers) as response:
                status = response.status
                body = await response.read(_BODY_LIMIT)
            if status in (404, 405, 501) and len(self._endpoints) > 1:
                self._endpoints.pop(0)
                continue
            if not 200 <= status < 300:
                return EngineState(reachable=False)
            if endpoint in ("metrics", "/metrics"):
                load = parse_load(body.decode("utf-8", errors="replace"))
                if load is not None:
                    return EngineState(True, round(load[0]), round(load[1]), reported=True)
            elif endpoint == "/slots":
                busy = parse_slots(body)
                if busy is not None:
                    return EngineState(True, busy, 0, reported=True)
            return EngineState(reachable=True)


_PREFILL_MARKER = "llooma-prefill-probe"


async def detect_prefill(base_url: str, timeout_s: float = 2.0) -> bool | None:
    """Whether llama-server continues a trailing assistant message, from how it renders one
    (`POST /apply-template`): with a Jinja template it ends the prompt with the message's text;
    with a legacy built-in template (`--no-jinja`) it closes the turn, so a "continuation"
    would be a new answer. None when the server cannot tell (an older one without the
    endpoint)."""
    pool = HttpPool(engine_root(base_url), max_connections=1, connect_timeout_s=timeout_s)
    body = orjson.dumps(
        {
            "messages": [
                {"role": "user", "content": "Say something."},
                {"role": "assistant", "content": _PREFILL_MARKER},
            ]
        }
    )
    try:
        async with asyncio.timeout(timeout_s):
            async with pool.request(
                "POST", "/apply-template", body, "Content-Type: application/json\r\n"
            ) as response:
                status = response.status
                answer = await response.read(_BODY_LIMIT)
    except (TimeoutError, HttpError):
        return None
    finally:
        await pool.aclose()
    if status != 200:
        return None
    try:
        prompt = orjson.loads(answer).get("prompt")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(prompt, str):
        return None
    if "Say something." not in prompt:
        log.warning(
            "llama-server at %s renders a conversation without its messages (%r): its chat "
            "template is wrong (with Jinja on, --chat-template NAME is taken as the template's "
            "text; use --chat-template-file or --no-jinja)",
            engine_root(base_url),
            prompt[:80],
        )
    return prompt.rstrip().endswith(_PREFILL_MARKER)
