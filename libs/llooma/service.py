"""A hot-path service process on raw nats-py: JetStream consumers with bounded concurrency.

FastStream costs 270-740 us of CPU per consumed message here (dependency injection, logging
context, middlewares) against about 20 us for a raw nats-py callback, and every request
crosses four of these hops. The request path (privacy, planner, dispatcher, racer) therefore
consumes with this small runner; services off that path use FastStream (see runtime.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError

from llooma import bus, counters, subjects, tracing
from llooma.runtime import ServiceHeartbeater, configure_logging, new_instance_id
from llooma.settings import Settings, load_settings
from llooma.v1.service_pb2 import ServiceHeartbeat

log = logging.getLogger(__name__)

Handler = Callable[[Msg], Awaitable[None]]

# A redelivered message waits this long, so a failing dependency is not hammered.
REDELIVERY_DELAY_S = 1.0
# Deliveries of one message before it is given up (terminated and counted): a message its
# handler fails on every time must not be redelivered forever, holding an ack-pending slot.
MAX_DELIVER = 5
# Tries at creating a consumer and subscribing to it before a start gives up (about 30 s).
CONSUMER_ATTEMPTS = 10


def _holds_nothing() -> bool:
    return False


@dataclass
class Service:
    name: str
    settings: Settings
    instance_id: str = ""
    nc: Client = field(init=False)
    js: JetStreamContext = field(init=False)
    _running: set[asyncio.Task[None]] = field(default_factory=set)
    _subscriptions: list[Subscription] = field(default_factory=list)
    # Each durable consumer as created, to re-create on a restarted server (see _reconnected).
    _consumers: list[tuple[str, ConsumerConfig]] = field(default_factory=list)
    _on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _confirming: set[asyncio.Task[None]] = field(default_factory=set)
    # Messages of claiming consumers not claimed yet, by ack subject (unique per delivery).
    _unclaimed: dict[str, _InProgress] = field(default_factory=dict)
    _heartbeat: ServiceHeartbeater | None = field(default=None, init=False)
    # Called as soon as the connection breaks (the ingress ends the requests it holds open).
    on_disconnect: Callable[[], object] | None = field(default=None, init=False)
    # Work held outside the consumers (the ingress's open requests): beat at the busy pace.
    holds_work: Callable[[], bool] = field(default_factory=lambda: _holds_nothing, init=False)
    # What the heartbeat reports beyond liveness (the ingress's in-flight counts).
    report: Callable[[ServiceHeartbeat], None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.instance_id = self.instance_id or new_instance_id(self.name)

    async def connect(self) -> None:
        self.nc = await bus.connect(
            self.settings.nats_url,
            f"llooma-{self.name}",
            access=self.settings.nats_access(),
            on_reconnect=self._reconnected,
            on_disconnect=self.on_disconnect,
        )
        self.js = self.nc.jetstream()
        await bus.keep_topology(self.js, self.name)

    async def _reconnected(self) -> None:
        """A restarted server has lost the memory pipeline stream and its consumers; core
        subscriptions come back by themselves, and the push consumers deliver again to the
        same fixed subjects once re-created: every replica re-creates the same config, so it
        does not matter which one (or a replica started meanwhile) comes first."""
        try:
            await bus.restore_topology(self.js)
            for stream, config in self._consumers:
                await self.js.add_consumer(stream, config=config)
        except Exception:
            log.exception("%s: topology not restored after a reconnect", self.name)

    async def consume(
        self,
        subject: str,
        queue: str,
        handler: Handler,
        *,
        max_concurrency: int = 256,
        claims: bool = False,
    ) -> None:
        """Deliver each message of a durable queue consumer to `handler`, concurrently.

        The message is acked after the handler returns or, with `claims`, once the handler
        calls `claim(msg)`: its work is recorded where a replica would find it, so from then
        on a redelivery could only run it twice (the ack is confirmed, in the background).
        Until then, a slow handler's message is kept in progress, and a process that dies has
        it redelivered (to a replica) after `pipeline_ack_wait_s`; a handler that raises gets
        it redelivered after a delay (claimed instead, with `claims`: its work may have
        begun). Poison is contained: an undecodable message is terminated at once, one that
        failed MAX_DELIVER times is terminated, both counted (`poison_terminated.<queue>` in
        the heartbeat).
        """
        slots = asyncio.Semaphore(max_concurrency)
        handler = tracing.traced(subject, handler)
        ack_wait_s = self.settings.pipeline_ack_wait_s
        unclaimed = self._unclaimed

        async def run(msg: Msg) -> None:
            progress = _InProgress(msg, ack_wait_s / 2)
            if claims:
                unclaimed[msg.reply] = progress
            try:
                await handler(msg)
                if claims:
                    self.claim(msg)
                else:
                    progress.cancel()
                    await msg.ack()
            except DecodeError:
                acked = claims and msg.reply not in unclaimed
                await self._give_up(msg, queue, "undecodable", acked=acked)
            except Exception:
                if claims or _deliveries(msg) < MAX_DELIVER:
                    log.exception("%s: handler failed on %s", self.name, subject)
                    if claims:
                        # Its work may have begun (a race's hosts launched): never replayed.
                        self.claim(msg)
                    else:
                        with contextlib.suppress(Exception):
                            await msg.nak(delay=REDELIVERY_DELAY_S)
                else:
                    await self._give_up(msg, queue, f"failed {MAX_DELIVER} times", acked=False)
            finally:
                progress.cancel()
                if claims:
                    unclaimed.pop(msg.reply, None)
                slots.release()

        async def on_message(msg: Msg) -> None:
            await slots.acquire()
            task = asyncio.create_task(run(msg))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            if self._heartbeat is not None:
                self._heartbeat.work_started()

        config = ConsumerConfig(
            durable_name=queue,
            deliver_group=queue,
            # Fixed, not an inbox: a consumer re-created by any replica reaches all of them.
            deliver_subject=subjects.consumer_deliver(queue),
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=max_concurrency * 4,
            max_deliver=MAX_DELIVER,
            ack_wait=ack_wait_s,
        )
        delay_s = bus.TOPOLOGY_RETRY_FIRST_S
        for attempt in range(1, CONSUMER_ATTEMPTS + 1):
            try:
                stream = await self.js.find_stream_name_by_subject(subject)
                # Create, or move one made on an inbox by an older version onto the fixed
                # subject.
                await self.js.add_consumer(stream, config=config)
                subscription = await self.js.subscribe(
                    subject,
                    queue=queue,
                    durable=queue,
                    cb=on_message,
                    manual_ack=True,
                    config=config,
                    pending_msgs_limit=max_concurrency * 16,
                )
                break
            except (TimeoutError, ServiceUnavailableError, NoRespondersError) as error:
                # A cluster electing its leaders answers late or not at all for seconds.
                if attempt == CONSUMER_ATTEMPTS:
                    raise
                log.warning("%s: consumer %s not ready (%r), retrying", self.name, queue, error)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, bus.TOPOLOGY_RETRY_MAX_S)
        self._subscriptions.append(subscription)
        self._consumers.append((stream, config))

    def claim(self, msg: Msg) -> None:
        """Ack a message of a claiming consumer (`consume(claims=True)`) now, once; its handler
        runs on. The ack is sent as a request the server answers once it took it (a double
        ack), in the background: a plain ack may die with the NATS node it went through, and
        JetStream would hand the message to a replica, to run twice."""
        progress = self._unclaimed.pop(msg.reply, None)
        if progress is None:
            return
        progress.cancel()
        bus.keep_task(self._confirming, asyncio.create_task(_confirm_ack(msg)), "ack")

    async def _give_up(self, msg: Msg, queue: str, why: str, *, acked: bool) -> None:
        counters.count(f"poison_terminated.{queue}")
        log.warning("%s: terminated a message on %s: %s", self.name, msg.subject, why)
        if not acked:
            with contextlib.suppress(Exception):
                await msg.term()

    async def subscribe(self, subject: str, handler: Handler) -> None:
        """A core NATS subscription (hot, ephemeral traffic), dropped on shutdown."""
        traced = tracing.traced(subject, handler)
        self._subscriptions.append(await self.nc.subscribe(subject, cb=traced))

    async def subscribe_queue(self, subject: str, queue: str, handler: Handler) -> None:
        """A core NATS queue subscription: one replica of the service takes each message."""
        traced = tracing.traced(subject, handler)
        self._subscriptions.append(await self.nc.subscribe(subject, queue=queue, cb=traced))

    def work_started(self) -> None:
        """Work arrived outside the consumers (`holds_work`): beat at the busy pace now."""
        if self._heartbeat is not None:
            self._heartbeat.work_started()

    def beat_early(self, min_gap_s: float) -> None:
        """Publish the heartbeat now (at most once every `min_gap_s`): what it reports moved."""
        if self._heartbeat is not None:
            self._heartbeat.beat_early(min_gap_s)

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        self._on_stop.append(hook)

    async def start(self, setup: Callable[[Service], Awaitable[None]]) -> None:
        """Connect, let `setup` subscribe and build its parts, then announce this instance."""
        await self.connect()
        await setup(self)
        self._heartbeat = ServiceHeartbeater(
            self.nc,
            self.name,
            self.instance_id,
            busy_s=self.settings.heartbeat_interval_s,
            idle_s=self.settings.idle_heartbeat_interval_s,
            busy=lambda: bool(self._running) or self.holds_work(),
            report=self.report,
        )
        await self._heartbeat.start()

    async def stop(self) -> None:
        """Withdraw, stop taking messages, let the ones in hand finish, run the stop hooks
        (last registered first), then leave."""
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if self._running:
            await asyncio.wait(self._running, timeout=10)
        for hook in reversed(self._on_stop):
            await hook()
        await self.nc.drain()

    async def serve(self, setup: Callable[[Service], Awaitable[None]]) -> None:
        """Run until SIGINT or SIGTERM. The ingress calls start and stop from its HTTP
        server's lifespan instead, because uvicorn owns the signals there."""
        await self.start(setup)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message (no metadata in its reply subject)
        return 1


# A claim's ack is re-sent for this long while a consumer's leader is re-elected after a node
# died.
ACK_CONFIRM_BUDGET_S = 20.0
ACK_CONFIRM_ATTEMPT_S = 2.0


async def _confirm_ack(msg: Msg) -> None:
    deadline = asyncio.get_running_loop().time() + ACK_CONFIRM_BUDGET_S
    while True:
        try:
            await msg.ack_sync(timeout=ACK_CONFIRM_ATTEMPT_S)
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                log.warning("ack of %s not confirmed: it may be redelivered", msg.subject)
                return
            await asyncio.sleep(0.2)


class _InProgress:
    """Tells JetStream a slow handler is still working, so only a dead process's messages
    wait out the short ack_wait; one timer per message, re-armed, no task."""

    __slots__ = ("_every_s", "_msg", "_pending", "_timer")

    def __init__(self, msg: Msg, every_s: float) -> None:
        self._msg = msg
        self._every_s = every_s
        # Each signal until it is sent: the loop holds tasks only weakly.
        self._pending: set[asyncio.Task[None]] = set()
        self._timer = asyncio.get_running_loop().call_later(every_s, self._fire)

    def _fire(self) -> None:
        bus.keep_task(
            self._pending, asyncio.create_task(self._msg.in_progress()), "in-progress signal"
        )
        self._timer = asyncio.get_running_loop().call_later(self._every_s, self._fire)

    def cancel(self) -> None:
        self._timer.cancel()


def serve(name: str, setup: Callable[[Service], Awaitable[None]]) -> None:
    """Entry point of a hot-path service process."""
    import uvloop

    settings = load_settings()
    configure_logging(settings)
    service = Service(name, settings)
    tracing.setup(name, instance_id=service.instance_id)
    uvloop.run(service.serve(setup))
