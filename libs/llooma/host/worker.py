"""The host worker process: tasks in on capability subjects, tokens out on reply subjects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time

import httpx
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from llooma import subjects, tracing
from llooma.host.backends import Backend, BackendFailure, build_backend, token_limit
from llooma.host.config import HostConfig
from llooma.host.openai_backend import UpstreamBusy, UpstreamError, scrape_load
from llooma.settings import VERSION
from llooma.v1.common_pb2 import (
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_INVALID_REQUEST,
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
)

log = logging.getLogger(__name__)


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
        # (running, waiting) reported by each openai upstream's metrics endpoint.
        self._upstream_load: dict[str, tuple[float, float]] = {}
        self._metrics_client = httpx.AsyncClient(timeout=2.0)
        self._in_flight: dict[str, int] = dict.fromkeys(self._capacity, 0)
        self._tasks: dict[str, asyncio.Task[object]] = {}
        self._subscriptions: list[Subscription] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._draining = False
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
        await self._publish_heartbeat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="host-heartbeat")

    async def drain(self) -> None:
        """Stop taking tasks, let in-flight ones finish, then stop heartbeating."""
        self._draining = True
        for subscription in self._subscriptions[:-1]:
            await subscription.unsubscribe()
        await self._publish_heartbeat()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        await self._nc.flush()
        await self._metrics_client.aclose()

    def heartbeat(self) -> HostHeartbeat:
        total_capacity = sum(self._capacity.values())
        in_flight = sum(self._in_flight.values())
        load = in_flight / total_capacity if total_capacity else 1.0
        queue_depth = 0.0
        for name, (running, waiting) in self._upstream_load.items():
            # The upstream may serve others too: its own gauges can show more load than ours.
            load = max(load, min(1.0, (running + waiting) / self._capacity[name]))
            queue_depth += waiting
        capabilities = [
            ModelCapability(
                name=name,
                capacity=self._capacity[name],
                in_flight=self._in_flight[name],
                stake=model.policy.stake,
            )
            for name, model in self._models.items()
        ]
        return HostHeartbeat(
            version=VERSION,
            models=capabilities,
            in_flight=in_flight,
            queue_depth=int(queue_depth),
            load=load,
            stake=max(m.policy.stake for m in self._models.values()),
            sent_unix_nanos=time.time_ns(),
            draining=self._draining,
        )

    async def _publish_heartbeat(self) -> None:
        await self._nc.publish(self._heartbeat_subject, self.heartbeat().SerializeToString())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_interval_s)
            try:
                await self._scrape_upstreams()
                await self._publish_heartbeat()
            except Exception:
                log.warning("heartbeat failed", exc_info=True)

    async def _scrape_upstreams(self) -> None:
        for name, model in self._models.items():
            if model.metrics_url:
                found = await scrape_load(self._metrics_client, model.metrics_url)
                if found is None:
                    self._upstream_load.pop(name, None)
                else:
                    self._upstream_load[name] = found

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
        try:
            async with contextlib.aclosing(backend.stream(task)) as pieces:
                async for piece in pieces:
                    seq += 1
                    chunk = HostChunk(seq=seq, token=HostToken(text=piece))
                    await publish(reply, chunk.SerializeToString())
        except asyncio.CancelledError:
            return None
        except UpstreamBusy as error:
            await self._fail(reply, ERROR_CODE_HOST_BUSY, f"upstream busy: {error}")
            return None
        except (UpstreamError, BackendFailure) as error:
            log.warning("backend failed on %s: %s", task.attempt_id, error)
            await self._fail(reply, ERROR_CODE_HOST_FAILED, f"backend error: {error}")
            return None
        except Exception:
            log.exception("backend crashed on %s", task.attempt_id)
            await self._fail(reply, ERROR_CODE_HOST_FAILED, "backend error")
            return None
        limited = bool(task.params.max_tokens) and seq >= task.params.max_tokens
        input_tokens = sum(len(m.content.split()) for m in task.messages)
        finished = HostFinished(
            finish_reason="length" if limited else "stop",
            usage=Usage(input_tokens=input_tokens, output_tokens=seq),
        )
        await publish(reply, HostChunk(seq=seq + 1, finished=finished).SerializeToString())
        return finished


async def run_worker(config: HostConfig, nc: Client, stop: asyncio.Event) -> None:
    """Serve until SIGINT, SIGTERM or `stop`, then drain."""
    worker = HostWorker(config, nc)
    await worker.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if nc.is_connected:
        await worker.drain()
        await nc.drain()
    else:
        await nc.close()
