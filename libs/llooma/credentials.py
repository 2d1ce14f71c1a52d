"""Host credentials: one NATS nkey per host, and the nats-server config that confines it.

Hosts live in a NATS account of their own (`HOSTS`), apart from the control plane's
(`LLOOMA`, the only one with JetStream). Between the two cross only: task subjects
(`llooma.v1.cap.>`, a service the hosts account exports, so a host answers on a reply subject
the server maps back into the control plane), cancel subjects (a stream the control plane
exports) and heartbeats (a service the control plane exports). Nothing a host publishes, nor
any reply subject it names, can therefore reach a stream or KV bucket: JetStream's API and
its `$KV.` subjects do not exist in the hosts account. Within it, a host's key may subscribe
only to its own task and cancel subjects and publish only its own heartbeat and replies to
tasks it was sent (`allow_responses`), so identity comes from the credential and the subject.
Revoking rewrites the config and reloads the server, which cuts the host off at once.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import nkeys

from llooma import subjects

CONTROL_PLANE = "control-plane"
# NATS account names: the control plane's (with JetStream) and every host's.
CONTROL_ACCOUNT = "LLOOMA"
HOSTS_ACCOUNT = "HOSTS"
# A reply subject stays open for a host as long as a long generation may take.
REPLY_WINDOW = "30m"
# The server forgets a task's reply mapping (hosts account -> control plane) this long after
# the host's last reply to it: far past any stall deadline, short enough that the mappings of
# cancelled and finished tasks do not pile up in the server.
TASK_REPLY_IDLE = "2m"
MAX_REPLIES_PER_TASK = 1_000_000


def new_user_seed() -> bytes:
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def public_key(seed: bytes) -> str:
    key: bytes = nkeys.from_seed(seed).public_key
    return key.decode()


def host_permissions(host_id: str) -> dict[str, object]:
    return {
        "publish": {"allow": [subjects.host_heartbeat(host_id)]},
        "subscribe": {
            "allow": [subjects.host_tasks_any_model(host_id), subjects.host_cancel(host_id)]
        },
        "allow_responses": {"max": MAX_REPLIES_PER_TASK, "expires": REPLY_WINDOW},
    }


@dataclass
class CredentialStore:
    """Seeds under `root` (mode 0600) and a registry of who holds which public key."""

    root: Path

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.json"

    def seed_path(self, name: str) -> Path:
        folder = self.root if name == CONTROL_PLANE else self.root / "hosts"
        return folder / f"{name}.nk"

    def _registry(self) -> dict[str, str]:
        if not self.registry_path.exists():
            return {}
        loaded: dict[str, str] = json.loads(self.registry_path.read_text())
        return loaded

    def _save(self, registry: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = self.registry_path.with_suffix(".tmp")
        scratch.write_text(json.dumps(registry, indent=2, sort_keys=True))
        scratch.replace(self.registry_path)

    def hosts(self) -> dict[str, str]:
        return {n: k for n, k in self._registry().items() if n != CONTROL_PLANE}

    def issue(self, name: str) -> Path:
        """Create (or return the existing) credential for host `name`; returns the seed file.
        The control plane's own name is refused: its key is never handed to a host."""
        subjects.checked_token(name)
        if name == CONTROL_PLANE:
            raise ValueError(f"{CONTROL_PLANE!r} is the control plane's own credential")
        return self._issue(name)

    def _issue(self, name: str) -> Path:
        path = self.seed_path(name)
        registry = self._registry()
        if path.exists() and name in registry:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = new_user_seed()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(seed)
        registry[name] = public_key(seed)
        self._save(registry)
        return path

    def revoke(self, name: str) -> bool:
        registry = self._registry()
        if name not in registry or name == CONTROL_PLANE:
            return False
        del registry[name]
        self._save(registry)
        self.seed_path(name).unlink(missing_ok=True)
        return True

    def control_plane_seed(self) -> Path:
        return self._issue(CONTROL_PLANE)


def _quote(value: object) -> str:
    return json.dumps(value)


def jetstream_config(store_dir: Path, *, sync_always: bool = True) -> str:
    """The JetStream block; `sync_always` fsyncs each write before the publish ack, so an
    acknowledged settlement survives a crash of the server or the machine."""
    sync = ", sync_interval: always" if sync_always else ""
    return f"jetstream {{ store_dir: {_quote(str(store_dir))}{sync} }}\n"


def accounts_block(control_users: list[str], host_users: list[str]) -> str:
    """The `accounts` block: each user an entry such as `{ nkey: "U..." }`."""

    def users(entries: list[str]) -> str:
        return "".join(f"      {entry}\n" for entry in entries)

    cp, hosts = CONTROL_ACCOUNT, HOSTS_ACCOUNT
    return (
        "accounts {\n"
        f"  {cp} {{\n"
        "    jetstream: enabled\n"
        f"    users: [\n{users(control_users)}    ]\n"
        "    exports: [\n"
        # A host's heartbeat reaches the control plane; any reply it names is mapped back into
        # the hosts account and forgotten after a second (the handler never replies).
        f'      {{ service: "{subjects.HOST_HEARTBEAT_ANY}", accounts: [{hosts}], '
        'threshold: "1s" }\n'
        f'      {{ stream: "{subjects.HOST_CANCEL_ANY}", accounts: [{hosts}] }}\n'
        "    ]\n"
        "    imports: [\n"
        f'      {{ service: {{ account: {hosts}, subject: "{subjects.HOST_TASKS_ANY}" }} }}\n'
        "    ]\n"
        "  }\n"
        f"  {hosts} {{\n"
        f"    users: [\n{users(host_users)}    ]\n"
        "    exports: [\n"
        # Many replies per task (the token stream), for as long as they keep coming.
        f'      {{ service: "{subjects.HOST_TASKS_ANY}", accounts: [{cp}], response: stream, '
        f'threshold: "{TASK_REPLY_IDLE}" }}\n'
        "    ]\n"
        "    imports: [\n"
        f'      {{ service: {{ account: {cp}, subject: "{subjects.HOST_HEARTBEAT_ANY}" }} }}\n'
        f'      {{ stream: {{ account: {cp}, subject: "{subjects.HOST_CANCEL_ANY}" }} }}\n'
        "    ]\n"
        "  }\n"
        "}\n"
    )


def host_user(key: str, host_id: str) -> str:
    return f"{{ nkey: {_quote(key)}, permissions: {_quote(host_permissions(host_id))} }}"


def render_nats_config(store: CredentialStore, port: int, store_dir: Path) -> str:
    """nats-server config: JetStream, loopback, the two accounts, one nkey user per key."""
    registry = store._registry()
    hosts = [host_user(key, name) for name, key in sorted(store.hosts().items())]
    return (
        f"listen: 127.0.0.1:{port}\n"
        # An absolute store: a relative one would make every reload fail.
        + jetstream_config(store_dir.resolve())
        + accounts_block([f"{{ nkey: {_quote(registry[CONTROL_PLANE])} }}"], hosts)
    )


def reload_nats(pid_file: Path) -> bool:
    """Ask a running nats-server to re-read its config; False if none runs."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True
