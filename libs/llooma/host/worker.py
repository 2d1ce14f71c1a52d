"""The host worker process: tasks in on capability subjects, tokens out on reply subjects.

Its size (~430 lines): one process's whole life (credential, heartbeats with the engine
probes' results, tasks, cancels, drain), each step short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from llooma import subjects, tracing
from llooma.host.backends import Backend, BackendFailure, Embedder, build_backend, token_limit
from llooma.host.config import HostConfig, ModelConfig
from llooma.host.engines import (
    DEFAULT_FEATURES,
    FEATURE_NAMES,
    EngineProbe,
    EngineState,
    detect_prefill,
    engine_id,
    local_engine_id,
)
from llooma.host.openai_backend import (
    OpenAIBackend,
    Outcome,
    Reasoning,
    Scored,
    ToolCalls,
    UpstreamBusy,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnreachable,
    estimate_input_tokens,
)
from llooma.host.ready import ready_batches
from llooma.pacing import BeatPacer
from llooma.settings import VERSION
from llooma.v1.common_pb2 import (
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_INVALID_REQUEST,
    ERROR_CODE_REQUEST_REJECTED,
    TASK_KIND_EMBEDDING,
    ErrorDetail,
    Usage,
)
from llooma.v1.host_pb2 import (
    CancelTask,
    HostAccepted,
    HostChunk,
    HostFinished,
    HostHeartbeat,
    HostTask,
    HostToken,
    ModelCapability,
    ModelFeatures,
)

log = logging.getLogger(__name__)


def model_engine(model: ModelConfig) -> str:
    return model.engine if model.backend == "openai" else model.backend


def model_features(model: ModelConfig) -> ModelFeatures:
    """The engine's defaults with the host's YAML on top."""
    defaults = DEFAULT_FEATURES.get(model_engine(model), frozenset())
    configured = model.features
    return ModelFeatures(
        **{
            name: getattr(configured, name)
            if getattr(configured, name) is not None
            else name in defaults
            for name in FEATURE_NAMES
        }
    )


class _Engine:
    """One engine instance behind one or more of this host's models, and what its probe saw."""

    def __init__(self, probe: EngineProbe, base_url: str) -> None:
        self.probe = probe
        self.base_url = base_url
        self.state = EngineState(reachable=False)
        self.probed = False
        # Models whose assistant_prefill is read from the engine (not set in the YAML).
        self.prefill_models: list[str] = []


class HostWorker:
    def __init__(self, config: HostConfig, nc: Client) -> None:
        self._config = config
        self._nc = nc
        self._backends: dict[str, Backend] = {
            m.name: build_backend(m, config.seed + i) for i, m in enumerate(config.models)
        }
        self._models = {m.name: m for m in config.models}
        self._capacity = {m.name: m.capacity for m in config.models}
        self._policy_rng = random.Random(config.seed)
        # One probe per engine instance (models on one engine share it), by engine id.
        self._engines: dict[str, _Engine] = {}
        self._engine_of: dict[str, str] = {}
        self._capabilities: dict[str, ModelCapability] = {}
        for model in config.models:
            if model.backend == "openai":
                assert model.base_url is not None
                key = engine_id(model.base_url)
                if key not in self._engines:
                    probe = EngineProbe(
                        model.engine,
                        model.base_url,
                        metrics_url=model.metrics_url,
                        api_key=model.api_key,
                        timeout_s=config.engine_probe_timeout_s,
                    )
                    self._engines[key] = _Engine(probe, model.base_url)
                self._engine_of[model.name] = key
                if model.engine == "llama.cpp" and model.features.assistant_prefill is None:
                    self._engines[key].prefill_models.append(model.name)
            else:
                key = local_engine_id(config.name, model.name)
            self._capabilities[model.name] = ModelCapability(
                name=model.name,
                capacity=model.capacity,
                stake=model.policy.stake,
                features=model_features(model),
                engine=model_engine(model),
                engine_id=key,
            )
        self._probe_tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, int] = dict.fromkeys(self._capacity, 0)
        self._tasks: dict[str, asyncio.Task[object]] = {}
        self._subscriptions: list[Subscription] = []
        self._draining = False
        self._nkey = config.public_nkey()
        self._pacer = BeatPacer(
            self._publish_heartbeat,
            busy_s=config.heartbeat_interval_s,
            idle_s=config.idle_heartbeat_interval_s,
            busy=self._busy,
            name="host-heartbeat",
        )
        # Checked by the dispatcher, which writes the hosts bucket (a host cannot).
        self._heartbeat_subject = subjects.host_heartbeat(config.name)

    @property
    def host_id(self) -> str:
        return self._config.name

    async def start(self) -> None:
        for model in self._config.models:
            subject = subjects.host_task(model.name, self.host_id)
            self._subscriptions.append(await self._nc.subscribe(subject, cb=self._on_task))
        self._subscriptions.append(
            await self._nc.subscribe(subjects.host_cancel(self.host_id), cb=self._on_cancel)
        )
        await self._nc.flush()
        # The first probe of each engine before the first heartbeat, so that heartbeat already
        # says whether each model's engine answers (and, for llama.cpp, whether it prefills).
        await asyncio.gather(*(self._probe_once(engine) for engine in self._engines.values()))
        await self._publish_heartbeat()
        self._pacer.start()
        for key, engine in self._engines.items():
            self._probe_tasks.append(
                asyncio.create_task(self._probe_loop(engine), name=f"engine-probe-{key}")
            )

    async def drain(self) -> None:
        """Stop taking tasks, let in-flight ones finish, then stop heartbeating."""
        self._draining = True
        for subscription in self._subscriptions[:-1]:
            await subscription.unsubscribe()
        await self._publish_heartbeat()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._pacer.stop()
        for task in self._probe_tasks:
            task.cancel()
        for task in self._probe_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._nc.flush()
        for engine in self._engines.values():
            await engine.probe.aclose()
        for backend in self._backends.values():
            if isinstance(backend, OpenAIBackend):
                await backend.aclose()

    def reconnected(self) -> None:
        """Back on NATS: beat at once. The server announced the old connection's close, and
        the dispatcher deleted this host's entry on it; waiting out the idle pace would leave
        the host unlisted that long."""
        self._pacer.beat_now()

    def heartbeat(self) -> HostHeartbeat:
        total_capacity = sum(self._capacity.values())
        in_flight = sum(self._in_flight.values())
        load = in_flight / total_capacity if total_capacity else 1.0
        queue_depth = 0
        counted: set[str] = set()
        capabilities = []
        for name, capability in self._capabilities.items():
            capability.in_flight = self._in_flight[name]
            key = self._engine_of.get(name)
            if key is not None:
                state = self._engines[key].state
                capability.engine_unreachable = not state.reachable
                capability.engine_running = state.running
                capability.engine_waiting = state.waiting
                if state.reported:
                    # The engine may serve others too: its own gauges can show more load
                    # than ours.
                    busy = state.running + state.waiting
                    load = max(load, min(1.0, busy / self._capacity[name]))
                    if key not in counted:
                        counted.add(key)
                        queue_depth += state.waiting
            capabilities.append(capability)
        return HostHeartbeat(
            version=VERSION,
            models=capabilities,
            in_flight=in_flight,
            queue_depth=queue_depth,
            load=load,
            stake=max(m.policy.stake for m in self._models.values()),
            sent_unix_nanos=time.time_ns(),
            draining=self._draining,
            next_beat_ms=round(self._pacer.announce() * 1000),
            nkey=self._nkey,
            connection_id=self._nc.client_id or 0,
        )

    async def _publish_heartbeat(self) -> None:
        await self._nc.publish(self._heartbeat_subject, self.heartbeat().SerializeToString())

    def _busy(self) -> bool:
        """Beat at the short pace: tasks in flight, draining, or an engine busy with others
        (its load steers the scheduler)."""
        return (
            bool(self._tasks)
            or self._draining
            or any(e.state.running or e.state.waiting for e in self._engines.values())
        )

    async def _probe_once(self, engine: _Engine) -> bool:
        """Probe one engine; True when its reachability changed."""
        state = await engine.probe.probe()
        changed = state.reachable != engine.state.reachable or not engine.probed
        if state.reachable and changed and engine.prefill_models:
            # Whether it continues a trailing assistant message depends on how it was started
            # (a Jinja template or not), so it is asked again whenever it comes back.
            prefill = await detect_prefill(engine.base_url, self._config.engine_probe_timeout_s)
            if prefill is not None:
                for name in engine.prefill_models:
                    self._capabilities[name].features.assistant_prefill = prefill
        first = not engine.probed
        engine.state = state
        engine.probed = True
        if changed:
            if state.reachable:
                if not first:
                    log.warning("engine %s answers again", engine.probe.engine)
            else:
                log.warning(
                    "engine %s does not answer: its models are unreachable", engine.probe.engine
                )
        return changed

    async def _probe_loop(self, engine: _Engine) -> None:
        """Probe on its own clock, apart from serving and from the heartbeat; a change of
        reachability is published at once rather than at the next heartbeat."""
        interval = self._config.engine_probe_interval_s
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                if await self._probe_once(engine):
                    await self._publish_heartbeat()
                elif engine.state.running or engine.state.waiting:
                    # Busy with others' work: its load is news, not for the idle pace.
                    self._pacer.work_started()
            except Exception:
                log.warning("engine probe failed", exc_info=True)
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    async def _on_task(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            task = HostTask.FromString(msg.data)
        except Exception:
            await self._fail(msg.reply, ERROR_CODE_INVALID_REQUEST, "undecodable task")
            return
        backend = self._backends.get(task.model)
        if backend is None:
            await self._fail(msg.reply, ERROR_CODE_INVALID_REQUEST, f"model {task.model!r}")
            return
        if self._draining:
            await self._fail(msg.reply, ERROR_CODE_HOST_BUSY, "host is draining")
            return
        if self._in_flight[task.model] >= self._capacity[task.model]:
            await self._fail(msg.reply, ERROR_CODE_HOST_BUSY, "host at capacity")
            return
        model = self._models[task.model]
        if self._policy_rng.random() >= model.policy.accept_frequency:
            await self._fail(msg.reply, ERROR_CODE_HOST_BUSY, "declined by the host's policy")
            return
        # The host's own ceiling holds whatever the request asked for.
        task.params.max_tokens = token_limit(task, model.generation.max_tokens)
        self._in_flight[task.model] += 1
        serving = (
            self._serve_traced(task, backend, msg.reply, msg.headers)
            if tracing.carries_trace(msg.headers)
            else self._serve(task, backend, msg.reply)
        )
        runner = asyncio.create_task(serving)
        self._tasks[task.attempt_id] = runner
        self._pacer.work_started()
        runner.add_done_callback(lambda _: self._finish(task))

    def _finish(self, task: HostTask) -> None:
        self._in_flight[task.model] -= 1
        self._tasks.pop(task.attempt_id, None)

    async def _on_cancel(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            runner = self._tasks.get(CancelTask.FromString(msg.data).attempt_id)
            if runner is not None:
                runner.cancel()

    async def _fail(self, reply: str, code: int, message: str) -> None:
        chunk = HostChunk(failed=ErrorDetail(code=code, message=message))  # type: ignore[arg-type]
        await self._nc.publish(reply, chunk.SerializeToString())

    async def _serve_traced(
        self, task: HostTask, backend: Backend, reply: str, headers: dict[str, str] | None
    ) -> None:
        """`_serve` in a SERVER span under the racer's attempt span (from the task's headers)."""
        span = tracing.start_span(
            f"chat {task.model}",
            kind=SpanKind.SERVER,
            headers=headers or {},
            attributes={
                **tracing.chat_attributes(task.model),
                "llooma.attempt_id": task.attempt_id,
                "llooma.host_id": self.host_id,
            },
        )
        finished = None
        try:
            with tracing.within(span):
                finished = await self._serve(task, backend, reply)
        finally:
            if finished is not None:
                usage = finished.usage
                tracing.record_usage(
                    span, usage.input_tokens, usage.output_tokens, finished.finish_reason
                )
            tracing.end_span(span, error="" if finished is not None else "not_finished")

    async def _serve(self, task: HostTask, backend: Backend, reply: str) -> HostFinished | None:
        """Stream one task's chunks; returns how it finished, or None if it did not."""
        publish = self._nc.publish
        await publish(reply, HostChunk(seq=0, accepted=HostAccepted()).SerializeToString())
        seq = 0
        outcome = Outcome()
        try:
            if task.kind == TASK_KIND_EMBEDDING:
                if not isinstance(backend, Embedder):
                    raise BackendFailure(f"model {task.model!r} serves no embeddings")
                # The whole answer in one token: the first complete answer wins the race.
                vectors = await backend.embed(task, outcome)
                seq += 1
                chunk = HostChunk(seq=seq, token=HostToken(embeddings=vectors))
                await publish(reply, chunk.SerializeToString())
            else:
                async with (
                    contextlib.aclosing(backend.stream(task, outcome)) as pieces,
                    contextlib.aclosing(ready_batches(pieces)) as batches,
                ):
                    # The pieces that were ready together (one upstream read) go as one chunk.
                    async for batch in batches:
                        tokens = [host_token(piece) for piece in batch]
                        chunk = HostChunk(seq=seq + 1, token=tokens[0], more_tokens=tokens[1:])
                        seq += len(tokens)
                        await publish(reply, chunk.SerializeToString())
        except asyncio.CancelledError:
            return None
        except UpstreamRejected as error:
            # The engine refused the request itself: the client's error, passed on as such.
            detail = ErrorDetail(
                code=ERROR_CODE_REQUEST_REJECTED,
                message=error.message,
                http_status=error.status or 400,
                client_code=error.client_code,
            )
            await publish(reply, HostChunk(failed=detail).SerializeToString())
            return None
        except UpstreamBusy as error:
            await self._fail(reply, ERROR_CODE_HOST_BUSY, f"upstream busy: {error}")
            return None
        except (UpstreamError, BackendFailure) as error:
            log.warning("backend failed on %s: %s", task.attempt_id, error)
            await self._fail(reply, ERROR_CODE_HOST_FAILED, f"backend error: {error}")
            if isinstance(error, UpstreamUnreachable):
                self._engine_lost(task.model)
            return None
        except Exception:
            log.exception("backend crashed on %s", task.attempt_id)
            await self._fail(reply, ERROR_CODE_HOST_FAILED, "backend error")
            return None
        if not outcome.reported and task.kind != TASK_KIND_EMBEDDING:
            # The engine gave no usage: an estimate, marked as one (reported_by_engine false).
            outcome.input_tokens = estimate_input_tokens(task)
            outcome.output_tokens = seq
        if not outcome.finish_reason:
            limit = task.params.max_tokens
            outcome.finish_reason = "length" if limit and seq >= limit else "stop"
        finished = HostFinished(
            finish_reason=outcome.finish_reason,
            usage=Usage(
                input_tokens=outcome.input_tokens,
                output_tokens=outcome.output_tokens,
                reported_by_engine=outcome.reported,
            ),
        )
        await publish(reply, HostChunk(seq=seq + 1, finished=finished).SerializeToString())
        return finished

    def _engine_lost(self, model: str) -> None:
        """A connection to the engine was refused while serving: unreachable now, not at the
        next probe (which clears it again when the engine answers)."""
        key = self._engine_of.get(model)
        if key is None:
            return
        engine = self._engines[key]
        if engine.state.reachable:
            engine.state = EngineState(reachable=False)
            log.warning(
                "engine %s refused a connection: its models are unreachable", engine.probe.engine
            )
            task = asyncio.create_task(self._publish_heartbeat())
            self._background.add(task)
            task.add_done_callback(self._background.discard)


async def run_worker(
    config: HostConfig,
    nc: Client,
    stop: asyncio.Event,
    started: Callable[[HostWorker], object] = lambda _: None,
) -> None:
    """Serve until SIGINT, SIGTERM or `stop`, then drain; `started` is handed the worker."""
    worker = HostWorker(config, nc)
    await worker.start()
    started(worker)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if nc.is_connected:
        await worker.drain()
        await nc.drain()
    else:
        # Disconnected (refused, or the server gone): nothing can be sent, but nats-py's close
        # still writes what it buffered meanwhile (heartbeats) onto the closed socket.
        with contextlib.suppress(RuntimeError):
            await nc.close()


def host_token(piece: str) -> HostToken:
    """A backend's piece as the token it is: answer text, reasoning, a tool-call delta, or
    answer text with its logprobs."""
    kind = piece.__class__
    if kind is str:
        return HostToken(text=piece)
    if kind is Reasoning:
        return HostToken(reasoning=piece)
    if kind is ToolCalls:
        return HostToken(tool_calls_json=piece)
    assert isinstance(piece, Scored)
    return HostToken(text=piece, logprobs_json=piece.logprobs)
