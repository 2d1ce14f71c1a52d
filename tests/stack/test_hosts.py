"""Host network on real NATS: credentials confine a host, revocation cuts it off, membership
follows joins, drains and kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import nats
import pytest
import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import admission, bus, subjects
from llooma.credentials import CredentialStore, public_key
from llooma.embedded import EmbeddedNats, start_responder
from llooma.host.config import Generation, HostConfig, Latency, ModelConfig
from llooma.processes import die_with_parent
from llooma.selection import NEXT_BEAT_GRACE_S
from llooma.stack import Stack
from llooma.v1.host_pb2 import HostTask
from tests.conftest import AUTH
from tests.support.scripted_host import Reply, ScriptedHost


def credentials_of(server: EmbeddedNats | None) -> EmbeddedNats:
    if server is None or server.credentials is None:
        pytest.skip("needs the embedded NATS server with credentials (NATS_URL is set)")
    return server


async def connect_as(server: EmbeddedNats, seed: Path, errors: list[str]) -> Client:
    async def on_error(error: Exception) -> None:
        errors.append(str(error).lower().removeprefix("nats: "))

    return await asyncio.wait_for(
        nats.connect(
            server.url,
            nkeys_seed=str(seed),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=2,
        ),
        timeout=5,
    )


async def test_a_host_credential_allows_only_its_own_subjects(
    nats_server: EmbeddedNats | None, nc: Client
) -> None:
    server = credentials_of(nats_server)
    assert server.credentials is not None
    suffix = uuid.uuid4().hex[:6]
    mallory, victim = f"mallory-{suffix}", f"victim-{suffix}"
    mallory_seed = server.credentials.issue(mallory)
    victim_seed = server.credentials.issue(victim)

    errors: list[str] = []
    attacker = await connect_as(server, mallory_seed, errors)
    victim_errors: list[str] = []
    honest = await connect_as(server, victim_seed, victim_errors)
    seen_by_victim: list[bytes] = []

    async def victim_receives(msg: Msg) -> None:
        seen_by_victim.append(msg.data)

    await honest.subscribe(subjects.host_tasks_any_model(victim), cb=victim_receives)
    await honest.subscribe(subjects.host_cancel(victim), cb=victim_receives)
    await honest.flush()

    denied_subscriptions = [
        subjects.host_task("echo", victim),
        subjects.host_cancel(victim),
        ">",
        "_INBOX.>",
        "$JS.API.>",
        "$SYS.>",
        subjects.PIPELINE_SUBJECTS,
        f"{subjects.PREFIX}.tokens.>",
    ]
    for subject in denied_subscriptions:
        await attacker.subscribe(subject)
    denied_publications = [
        subjects.kv_put_subject(subjects.HOSTS_BUCKET, victim),
        subjects.kv_put_subject(subjects.HOSTS_BUCKET, mallory),
        subjects.host_heartbeat(victim),
        subjects.host_task("echo", victim),
        subjects.host_cancel(victim),
        subjects.host_reply("racer-x", "attempt-it-was-not-sent"),
        subjects.PIPELINE_PRIVACY,
        subjects.SETTLEMENT_TASK,
        "$JS.API.STREAM.LIST",
    ]
    for subject in denied_publications:
        await attacker.publish(subject, b"forged")
    await attacker.flush()
    await asyncio.sleep(0.5)

    for subject in denied_subscriptions:
        assert f'permissions violation for subscription to "{subject.lower()}"' in errors, subject
    for subject in denied_publications:
        assert f'permissions violation for publish to "{subject.lower()}"' in errors, subject
    assert seen_by_victim == [], "nothing may cross from one host to another"

    # What it may do: its own heartbeat, and replies to a task it was sent.
    errors.clear()
    replies: list[bytes] = []

    async def answer(msg: Msg) -> None:
        for index in range(3):
            await attacker.publish(msg.reply, b"chunk-%d" % index)

    async def collect(msg: Msg) -> None:
        replies.append(msg.data)

    await attacker.subscribe(subjects.host_task("echo", mallory), cb=answer)
    await attacker.publish(subjects.host_heartbeat(mallory), b"")
    await attacker.flush()
    reply_subject = subjects.host_reply("racer-test", uuid.uuid4().hex)
    await nc.subscribe(reply_subject, cb=collect)
    for _ in range(20):
        await nc.publish(subjects.host_task("echo", mallory), b"task", reply=reply_subject)
        await nc.flush()
        await asyncio.sleep(0.1)
        if any(replies):
            break
        replies.clear()  # a no-responders notice: the subscription was not in place yet
    await asyncio.sleep(0.2)
    assert replies == [b"chunk-0", b"chunk-1", b"chunk-2"], (
        errors,
        attacker.is_connected,
        attacker.is_closed,
        attacker.last_error,
    )
    assert errors == []
    await attacker.close()
    await honest.close()


def write_host(tmp: Path, config: HostConfig) -> Path:
    path = tmp / f"{config.name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


@contextmanager
def host_process(config_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "llooma.cli", "host", "--config", str(config_path)],
        env=dict(os.environ),
        preexec_fn=die_with_parent,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def model_listed(http: httpx.AsyncClient, model: str) -> bool:
    response = await http.get("/v1/models", headers=AUTH)
    return model in [m["id"] for m in response.json()["data"]]


async def seconds_until(http: httpx.AsyncClient, model: str, *, listed: bool) -> float:
    started = time.monotonic()
    while time.monotonic() - started < 15:
        if await model_listed(http, model) == listed:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never became {'listed' if listed else 'unlisted'}")


def solo_host(server: EmbeddedNats, name: str, model: str, **model_fields: object) -> HostConfig:
    assert server.credentials is not None
    seed = server.credentials.issue(name)
    return HostConfig(
        name=name,
        nats_url=server.url,
        credentials=seed,
        heartbeat_interval_s=0.5,
        models=[ModelConfig(name=model, **model_fields)],  # type: ignore[arg-type]
    )


async def test_join_is_seen_within_2s_and_kill_9_while_serving_is_ineligible_within_3s(
    nats_server: EmbeddedNats | None, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = credentials_of(nats_server)
    model = f"joiner-{uuid.uuid4().hex[:6]}"
    config = solo_host(
        server,
        f"host-{model}",
        model,
        generation=Generation(max_tokens=200),
        inter_token=Latency(kind="fixed", ms=50),
    )
    with host_process(write_host(tmp_path, config)) as process:
        await seconds_until(http, model, listed=True)  # the process start is not the join
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "go"}]}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line:
                    # Serving: its last beat announced the short wait.
                    process.send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                    break
        process.wait(5)
        await seconds_until(http, model, listed=False)
        vanished_after = time.monotonic() - killed_at
    assert vanished_after < 3.0
    response = await http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers=AUTH,
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_eligible_host"


async def test_a_resting_host_stays_between_beats_and_leaves_at_once_when_killed(
    nats_server: EmbeddedNats | None, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = credentials_of(nats_server)
    model = f"rester-{uuid.uuid4().hex[:6]}"
    config = solo_host(server, f"host-{model}", model).model_copy(
        update={"idle_heartbeat_interval_s": 3.0}
    )
    with host_process(write_host(tmp_path, config)) as process:
        await seconds_until(http, model, listed=True)
        # Beating every 3 s at rest, past the 2 s cutoff: never dropped between beats.
        watched_until = time.monotonic() + 7.0
        while time.monotonic() < watched_until:
            assert await model_listed(http, model), "a resting host was dropped between beats"
            await asyncio.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        process.wait(5)
        await seconds_until(http, model, listed=False)
        vanished_after = time.monotonic() - killed_at
    # The server's disconnect advisory, not the 3 s wait it announced plus the grace.
    assert vanished_after < 3.0


async def test_a_resting_host_that_stops_beating_is_dropped_after_the_wait_it_announced(
    nats_server: EmbeddedNats | None, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = credentials_of(nats_server)
    model = f"frozen-{uuid.uuid4().hex[:6]}"
    announced_s = 3.0
    config = solo_host(server, f"host-{model}", model).model_copy(
        update={"idle_heartbeat_interval_s": announced_s}
    )
    with host_process(write_host(tmp_path, config)) as process:
        await seconds_until(http, model, listed=True)
        # Frozen: its connection stays open (no advisory), its beats stop.
        process.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            await seconds_until(http, model, listed=False)
            vanished_after = time.monotonic() - frozen_at
        finally:
            process.send_signal(signal.SIGCONT)
    # Its last beat came at most `announced_s` before the freeze: dropped once that wait and
    # the grace are over (plus the readers' lag), and not before the grace has passed.
    assert NEXT_BEAT_GRACE_S - 0.1 < vanished_after < announced_s + NEXT_BEAT_GRACE_S + 1.0


async def test_a_new_host_is_seen_within_2s_of_its_first_heartbeat(
    http: httpx.AsyncClient, nc: Client
) -> None:
    model = f"prompt-{uuid.uuid4().hex[:6]}"

    async def idle(_: HostTask, __: Reply) -> None:
        return None

    async with ScriptedHost(nc, f"host-{model}", model, idle):
        joined = await seconds_until(http, model, listed=True)
    assert joined < 2.0


async def test_sigterm_drains_in_flight_work_then_leaves(
    nats_server: EmbeddedNats | None, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = credentials_of(nats_server)
    model = f"drainer-{uuid.uuid4().hex[:6]}"
    config = solo_host(
        server,
        f"host-{model}",
        model,
        generation=Generation(max_tokens=30),
        inter_token=Latency(kind="fixed", ms=50),
    )
    with host_process(write_host(tmp_path, config)) as process:
        await seconds_until(http, model, listed=True)
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "go"}]}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as stream:
            assert stream.status_code == 200
            lines: list[str] = []
            async for line in stream.aiter_lines():
                if line and not lines:
                    process.send_signal(signal.SIGTERM)
                lines.append(line)
        assert "data: [DONE]" in lines, "an in-flight task finishes while draining"
        assert process.wait(10) == 0
    await seconds_until(http, model, listed=False)


async def test_revoked_host_is_cut_off_within_5s(
    nats_server: EmbeddedNats | None, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = credentials_of(nats_server)
    assert server.credentials is not None
    model = f"revokee-{uuid.uuid4().hex[:6]}"
    name = f"host-{model}"
    config = solo_host(server, name, model)
    assert config.credentials is not None
    kept_seed = tmp_path / "kept.nk"
    kept_seed.write_bytes(config.credentials.read_bytes())
    with host_process(write_host(tmp_path, config)):
        await seconds_until(http, model, listed=True)
        assert server.credentials.revoke(name)
        system_seed = server.credentials.system_seed().read_text().strip()
        key = public_key(kept_seed.read_bytes())
        assert await admission.disconnect([server.url], system_seed, key) == []
        revoked_at = time.monotonic()
        await seconds_until(http, model, listed=False)
        assert time.monotonic() - revoked_at < 5.0
    errors: list[str] = []
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await connect_as(server, kept_seed, errors)


def test_stack_hosts_join_with_their_own_credentials(stack: Stack) -> None:
    store = stack.credentials
    if store is None:
        pytest.skip("needs the embedded NATS server with credentials")
    assert {"host-fast", "host-steady", "host-jittery"} <= set(store.hosts())


async def test_a_host_refused_while_no_responder_answers_stays_and_a_revoked_one_leaves(
    tmp_path: Path,
) -> None:
    """A server whose callout responder is away refuses every host (a NATS restart does this
    for a moment): a connected host keeps trying and gets back in once a responder answers.
    Revoked, it is refused the same way and leaves, with exit code 3, after the grace."""
    store = CredentialStore(tmp_path / "credentials")
    server = EmbeddedNats.start(tmp_path / "nats", credentials=store)
    system_seed = store.system_seed().read_text().strip()
    system = await nats.connect(server.url, nkeys_seed_str=system_seed)
    try:
        seed = store.issue("host-patient")
        key = public_key(seed.read_bytes())
        config = HostConfig(
            name="host-patient",
            nats_url=server.url,
            credentials=seed,
            heartbeat_interval_s=0.5,
            models=[ModelConfig(name="patient")],
        )

        async def connected_within(seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if await admission.connections_of(system, key, 1):
                    return True
                await asyncio.sleep(0.1)
            return False

        with host_process(write_host(tmp_path, config)) as process:
            assert await connected_within(20)
            server.stop_responder()
            assert await admission.disconnect([server.url], system_seed, key) == []
            log = tmp_path / "nats" / "nats-server.log"
            refusal = f'authentication error - Nkey "{key}"'
            for _ in range(200):
                if refusal in log.read_text():
                    break
                await asyncio.sleep(0.1)
            assert refusal in log.read_text(), "the server never refused the host"
            server.responder = start_responder(server.data_dir, store, server.url)
            assert await connected_within(bus.REFUSAL_GRACE_S)
            assert process.poll() is None
            assert store.revoke("host-patient")
            assert await admission.disconnect([server.url], system_seed, key) == []
            exit_code = await asyncio.to_thread(process.wait, bus.REFUSAL_GRACE_S + 10)
            assert exit_code == 3
    finally:
        await system.close()
        server.stop()
