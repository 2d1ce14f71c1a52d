"""The embedded stack: infrastructure, every service as its own process, synthetic hosts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from llooma import names
from llooma.cluster import NatsCluster
from llooma.credentials import CredentialStore
from llooma.db.migrate import migrate
from llooma.embedded import EmbeddedNats, EmbeddedPostgres, child_environment
from llooma.host.config import Generation, HostConfig, Latency, ModelConfig, Policy
from llooma.ledger.blocks import Signer
from llooma.processes import die_with_parent, free_port, port_is_free
from llooma.settings import KEY_HASH_SECRET_ENV, KEY_HASH_SECRET_FILE_ENV

log = logging.getLogger(__name__)

# Started last service first: accounting (migrations) before the rest, the ingress last.
SERVICES = tuple(reversed(names.SERVICES))


def demo_hosts(nats_url: str) -> list[HostConfig]:
    """Three synthetic hosts with different latency profiles and stakes, each also serving echo."""
    profiles = [
        ("host-fast", 1.0, Latency(kind="fixed", ms=40), 10.0),
        ("host-steady", 2.0, Latency(kind="lognormal", median_ms=150, sigma=0.3), 15.0),
        ("host-jittery", 3.0, Latency(kind="lognormal", median_ms=300, sigma=0.5), 25.0),
    ]
    hosts = []
    for seed, (name, stake, first_token, inter_token_ms) in enumerate(profiles, start=1):
        synthetic = ModelConfig(
            name="synthetic-small",
            policy=Policy(stake=stake),
            generation=Generation(max_tokens=64),
            first_token=first_token,
            inter_token=Latency(kind="fixed", ms=inter_token_ms),
        )
        # A small gap between tokens, so a client sees the echo arrive as a stream.
        echo = ModelConfig(
            name="echo",
            backend="echo",
            capacity=64,
            generation=Generation(max_tokens=4096),
            inter_token=Latency(kind="fixed", ms=2),
        )
        hosts.append(HostConfig(name=name, nats_url=nats_url, seed=seed, models=[synthetic, echo]))
    return hosts


def opening_stakes(hosts: list[HostConfig]) -> dict[str, int]:
    """The stake the stack locks in the ledger for each host it starts (micro-credits): what
    its configuration announces, so its draw weight is what the YAML says."""
    return {
        host.name: round(max((m.policy.stake for m in host.models), default=0.0) * 1_000_000)
        for host in hosts
    }


# A host is someone else's machine, even when the stack starts it: it gets its own YAML and
# credential, never the control plane's key, database URL or ledger signing key.
_CONTROL_PLANE_ONLY = ("NATS_URL", "DATABASE_URL")


def host_environment(env: dict[str, str]) -> dict[str, str]:
    return {
        k: v for k, v in env.items() if k not in _CONTROL_PLANE_ONLY and not k.startswith("LLOOMA_")
    }


def write_secret(path: Path, value: str) -> None:
    """Once: `value` into a file only its owner reads, in a folder only its owner opens."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")


# What only accounting is given: the ledger's signing key, as a file or as the seed itself.
SIGNER_ONLY_ENV = frozenset({"LLOOMA_LEDGER_SIGNING_KEY_FILE", "LLOOMA_LEDGER_SIGNING_KEY"})


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def spawn(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the supervisor only, which stops all
                preexec_fn=die_with_parent,
            )


@dataclass
class Stack:
    """Starts and stops everything; `NATS_URL` / `DATABASE_URL` reuse servers already running."""

    root: Path
    http_port: int
    # The embedded NATS server's port (None: any free one); hosts' configs name it.
    nats_port: int | None = None
    nats_url: str | None = None
    database_url: str | None = None
    # A server someone else started (the tests share one); its credentials are used.
    shared_nats: EmbeddedNats | None = None
    hosts: list[HostConfig] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Processes per service (default 1); replicas share each durable consumer / queue group.
    replicas: dict[str, int] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None
    # With N > 0 and no NATS_URL: N clustered nats-server nodes instead of one (streams R3).
    nats_cluster: int = 0
    cluster: NatsCluster | None = None
    # The ports of the ingresses after the first (replicas["ingress"] > 1).
    ingress_ports: list[int] = field(default_factory=list)

    @property
    def credentials(self) -> CredentialStore | None:
        if self.cluster is not None:
            return self.cluster.credentials
        server = self.nats or self.shared_nats
        return server.credentials if server is not None else None

    @property
    def control_seed(self) -> str | None:
        store = self.credentials
        return str(store.control_plane_seed()) if store is not None else None

    @property
    def ledger_key_file(self) -> Path:
        """The accounting service's block-signing key, in a folder of its own (0700): apart
        from the data and from the other credentials."""
        return self.root / "accounting" / "ledger-signing.key"

    @property
    def key_secret_file(self) -> Path:
        """The secret API keys are hashed with, when the environment names none."""
        return self.root / "secrets" / "key-hash.secret"

    @property
    def admin_key_file(self) -> Path:
        """The admin API's key, when the environment names none."""
        return self.root / "secrets" / "admin-api.key"

    def _secrets_env(self) -> dict[str, str]:
        """A key-hash secret and an admin key of the stack's own, unless configured."""
        configured = {**os.environ, **self.extra_env}
        env = {}
        if not (configured.get(KEY_HASH_SECRET_ENV) or configured.get(KEY_HASH_SECRET_FILE_ENV)):
            write_secret(self.key_secret_file, secrets.token_hex(32))
            env[KEY_HASH_SECRET_FILE_ENV] = str(self.key_secret_file)
        admin = ("LLOOMA_ADMIN_API_KEYS", "LLOOMA_ADMIN_API_KEY_FILE")
        if not any(configured.get(name) for name in admin):
            write_secret(self.admin_key_file, f"sk-llooma-admin-{secrets.token_urlsafe(24)}")
            env["LLOOMA_ADMIN_API_KEY_FILE"] = str(self.admin_key_file)
        return env

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ingress_urls(self) -> list[str]:
        """Every ingress's base URL, the first one's (base_url) first."""
        return [self.base_url, *(f"http://127.0.0.1:{p}" for p in self.ingress_ports)]

    def start(self, ready_timeout_s: float = 90.0) -> None:
        if not port_is_free(self.http_port):
            raise RuntimeError(
                f"port {self.http_port} is taken; set LLOOMA_HTTP_PORT to another port"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        try:
            if self.shared_nats is not None:
                self.nats_url = self.shared_nats.url
            elif self.nats_url is None and self.nats_cluster > 0:
                self.cluster = NatsCluster.start(
                    self.root,
                    self.nats_cluster,
                    credentials=CredentialStore(self.root / "credentials"),
                )
                self.nats_url = self.cluster.url
            elif self.nats_url is None:
                if self.nats_port is not None and not port_is_free(self.nats_port):
                    raise RuntimeError(
                        f"NATS port {self.nats_port} is taken; set LLOOMA_NATS_PORT to another"
                    )
                self.nats = EmbeddedNats.start(
                    self.root / "nats",
                    self.nats_port,
                    credentials=CredentialStore(self.root / "credentials"),
                )
                self.nats_url = self.nats.url
            if self.database_url is None:
                self.postgres = EmbeddedPostgres(self.root / "postgres")
                self.database_url = self.postgres.url
            asyncio.run(migrate(self.database_url))
            # Created here, once, so `llooma ledger verify` finds the public key beside it;
            # a key from before it had a folder of its own moves there.
            moved_from = self.root / "credentials" / "ledger-signing.key"
            if moved_from.exists() and not self.ledger_key_file.exists():
                self.ledger_key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                moved_from.rename(self.ledger_key_file)
                moved_from.with_suffix(".pub").unlink(missing_ok=True)
            Signer.load_or_create(self.ledger_key_file)
            cluster_env = (
                {"LLOOMA_NATS_REPLICAS": str(self.cluster.replicas)} if self.cluster else {}
            )
            hosts = self.hosts if self.hosts is not None else demo_hosts(self.nats_url)
            env = child_environment(
                {
                    **cluster_env,
                    **self._secrets_env(),
                    "LLOOMA_OPENING_STAKES_MICROS": json.dumps(opening_stakes(hosts)),
                    **self.extra_env,
                    "NATS_URL": self.nats_url,
                    "DATABASE_URL": self.database_url,
                    "LLOOMA_HTTP_PORT": str(self.http_port),
                    "LLOOMA_NATS_NKEY_SEED_FILE": self.control_seed or "",
                }
            )
            # Only accounting signs blocks: no other process is told where the key is.
            signer_env = {**env, "LLOOMA_LEDGER_SIGNING_KEY_FILE": str(self.ledger_key_file)}
            env = {k: v for k, v in env.items() if k not in SIGNER_ONLY_ENV}
            for service in SERVICES:
                args = [sys.executable, "-m", f"services.{service}"]
                for replica in range(1, self.replicas.get(service, 1) + 1):
                    name = service if replica == 1 else f"{service}-{replica}"
                    child_env = signer_env if service == "accounting" else env
                    if service == "ingress" and replica > 1:
                        # Each further ingress listens on a port of its own (ingress_urls).
                        port = free_port()
                        child_env = {**env, "LLOOMA_HTTP_PORT": str(port)}
                        self.ingress_ports.append(port)
                    self.children.append(Child(name, args, child_env, logs / f"{name}.log"))
            host_dir = self.root / "hosts"
            host_dir.mkdir(exist_ok=True)
            host_store = self.credentials
            for host in hosts:
                # Hosts join through the same path as anyone's: their own credential.
                credential = host_store.issue(host.name) if host_store else None
                host = host.model_copy(
                    update={"nats_url": self.nats_url, "credentials": credential}
                )
                config_path = host_dir / f"{host.name}.yaml"
                config_path.write_text(yaml.safe_dump(host.model_dump(mode="json")))
                args = [sys.executable, "-m", "llooma.cli", "host", "--config", str(config_path)]
                self.children.append(
                    Child(host.name, args, host_environment(env), logs / f"{host.name}.log")
                )
            for child in self.children:
                child.spawn()
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    raise RuntimeError(
                        f"{child.name} exited with {child.process.returncode}; see {child.log_path}"
                    )
            try:
                response = httpx.get(f"{self.base_url}/healthz", timeout=1.0)
                if response.status_code == 200:
                    return
                # Started without hosts: up once every service is (hosts join later).
                if self.hosts == [] and all(response.json().get("services", {0: 0}).values()):
                    return
                last = response.text
            except httpx.HTTPError as error:
                last = str(error)
            time.sleep(0.2)
        raise TimeoutError(f"stack not ready after {timeout_s} s: {last}")

    def restart_crashed(self) -> list[str]:
        """Respawn any child that died on its own; returns their names."""
        restarted = []
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                child.restarts += 1
                child.spawn()
                restarted.append(child.name)
        return restarted

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def kill(self, name: str) -> int:
        """kill -9 one child (a fault, not a stop); `restart_crashed` brings it back."""
        process = self.child(name).process
        assert process is not None
        process.kill()
        process.wait()
        return process.pid

    def restart_nats(self, *, kill: bool = True) -> None:
        """Crash (or stop) the embedded nats-server and start it again on the same port and
        store: clients reconnect by themselves; memory streams are gone, file streams stay."""
        assert self.nats is not None, "only the stack's own nats-server can be restarted"
        old = self.nats
        if kill:
            old.process.kill()
            old.process.wait()
            old.stop_responder()
        else:
            old.stop()
        self.nats = EmbeddedNats.start(old.data_dir, old.port, credentials=old.credentials)

    def kill_nats_node(self, index: int) -> int:
        """kill -9 one node of the stack's NATS cluster; returns its pid."""
        assert self.cluster is not None, "the stack runs no NATS cluster"
        return self.cluster.kill(index)

    def restart_nats_node(self, index: int) -> None:
        assert self.cluster is not None, "the stack runs no NATS cluster"
        self.cluster.restart(index)

    def restart_postgres(self) -> None:
        """kill -9 the postmaster and its backends, then start it again (crash recovery)."""
        assert self.postgres is not None, "only the stack's own Postgres can be restarted"
        self.postgres.crash()
        self.postgres.ensure_running()

    def pids(self) -> list[int]:
        found = [c.process.pid for c in self.children if c.process is not None]
        if self.nats is not None:
            found.append(self.nats.process.pid)
        if self.cluster is not None:
            found.extend(self.cluster.pids())
        if self.postgres is not None and (pg_pid := self.postgres.pid()) is not None:
            found.append(pg_pid)
        return found

    def stop(self, timeout_s: float = 10.0) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.children.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
