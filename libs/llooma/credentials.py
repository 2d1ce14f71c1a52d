"""Host credentials: one NATS nkey per host, and the nats-server config that confines it.

Hosts live in a NATS account of their own (`HOSTS`), apart from the control plane's
(`LLOOMA`, the only one with JetStream). Between the two cross only: task subjects
(`llooma.v1.cap.>`, a service the hosts account exports, so a host answers on a reply subject
the server maps back into the control plane), cancel subjects (a stream the control plane
exports) and heartbeats (a service the control plane exports). Nothing a host publishes, nor
any reply subject it names, can therefore reach a stream or KV bucket: JetStream's API and
its `$KV.` subjects do not exist in the hosts account.

No host is written into the server's config: the config names the control plane's keys and an
auth callout, and the server asks the control plane about every other connection
(`llooma.callout`, answered from this store's registry). Admitting a host is one registry
entry; revoking it is removing the entry and closing its live connections (admission.py).
Within the hosts account, a host's key may subscribe only to its own task and cancel subjects
and publish only its own heartbeat and replies to tasks it was sent (callout.host_permissions).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys

from llooma import subjects

CONTROL_PLANE = "control-plane"
# The system account's user (finds and closes a revoked host's connections) and the account
# key that signs the auth callout's answers: both the control plane's, never a host's.
SYSTEM_USER = "system"
CALLOUT_ISSUER = "callout-issuer"
RESERVED_NAMES = (CONTROL_PLANE, SYSTEM_USER, CALLOUT_ISSUER)
# NATS account names: the control plane's (with JetStream) and every host's.
CONTROL_ACCOUNT = "LLOOMA"
HOSTS_ACCOUNT = "HOSTS"
SYSTEM_ACCOUNT = "SYS"
CALLOUT_TIMEOUT_S = 5
# The server forgets a task's reply mapping (hosts account -> control plane) this long after
# the host's last reply to it: far past any stall deadline, short enough that the mappings of
# cancelled and finished tasks do not pile up in the server.
TASK_REPLY_IDLE = "2m"


def new_seed(prefix: int = nkeys.PREFIX_BYTE_USER) -> bytes:
    seed: bytes = nkeys.encode_seed(os.urandom(32), prefix)
    return seed


def public_key(seed: bytes) -> str:
    key: bytes = nkeys.from_seed(seed).public_key
    return key.decode()


@dataclass
class CredentialStore:
    """Seeds under `root` (mode 0600) and a registry of who holds which public key."""

    root: Path

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.json"

    def seed_path(self, name: str) -> Path:
        folder = self.root if name in RESERVED_NAMES else self.root / "hosts"
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
        return {n: k for n, k in self._registry().items() if n not in RESERVED_NAMES}

    def issue(self, name: str) -> Path:
        """Create (or return the existing) credential for host `name`; returns the seed file.
        The control plane's own name is refused: its key is never handed to a host."""
        subjects.checked_token(name)
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is the control plane's own credential")
        return self._issue(name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer of the registry at a time (several `llooma hosts add` at once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "registry.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _issue(self, name: str, prefix: int = nkeys.PREFIX_BYTE_USER) -> Path:
        path = self.seed_path(name)
        # Checked before locking too: a read-only store (a container's) holds every key it uses.
        if path.exists() and name in self._registry():
            return path
        with self._locked():
            registry = self._registry()
            if path.exists() and name in registry:
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = new_seed(prefix)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(seed)
            registry[name] = public_key(seed)
            self._save(registry)
        return path

    def revoke(self, name: str) -> bool:
        with self._locked():
            registry = self._registry()
            if name not in registry or name in RESERVED_NAMES:
                return False
            del registry[name]
            self._save(registry)
            self.seed_path(name).unlink(missing_ok=True)
        return True

    def control_plane_seed(self) -> Path:
        return self._issue(CONTROL_PLANE)

    def system_seed(self) -> Path:
        return self._issue(SYSTEM_USER)

    def callout_issuer_seed(self) -> Path:
        return self._issue(CALLOUT_ISSUER, nkeys.PREFIX_BYTE_ACCOUNT)

    def public(self, name: str) -> str:
        return self._registry()[name]


def _quote(value: object) -> str:
    return json.dumps(value)


def jetstream_config(store_dir: Path, *, sync_always: bool = True) -> str:
    """The JetStream block; `sync_always` fsyncs each write before the publish ack, so an
    acknowledged settlement survives a crash of the server or the machine."""
    sync = ", sync_interval: always" if sync_always else ""
    return f"jetstream {{ store_dir: {_quote(str(store_dir))}{sync} }}\n"


def accounts_block(control_users: list[str], system_users: list[str]) -> str:
    """The `accounts` block: each user an entry such as `{ nkey: "U..." }`. The hosts
    account has no users of its own: the auth callout places each host in it."""

    def users(entries: list[str]) -> str:
        return "".join(f"      {entry}\n" for entry in entries)

    cp, hosts = CONTROL_ACCOUNT, HOSTS_ACCOUNT
    disconnects = subjects.HOSTS_DISCONNECTED
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
        # The server says at once when a host's connection closes (membership drops it).
        f'      {{ stream: {{ account: {SYSTEM_ACCOUNT}, subject: "{disconnects}" }} }}\n'
        "    ]\n"
        "  }\n"
        f"  {hosts} {{\n"
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
        f"  {SYSTEM_ACCOUNT} {{\n"
        f"    users: [\n{users(system_users)}    ]\n"
        f'    exports: [ {{ stream: "{disconnects}", accounts: [{cp}] }} ]\n'
        "  }\n"
        "}\n"
        f"system_account: {SYSTEM_ACCOUNT}\n"
    )


def callout_block(issuer: str, auth_users: list[str]) -> str:
    """Every connection but `auth_users` (the control plane's and the system account's keys)
    is decided by the control plane's answer on `$SYS.REQ.USER.AUTH` in its own account."""
    return (
        "authorization {\n"
        # How long the server waits for the answer (then refuses): a loaded responder gets
        # more than the default 2 s.
        f"  timeout: {CALLOUT_TIMEOUT_S}\n"
        "  auth_callout {\n"
        f"    issuer: {_quote(issuer)}\n"
        f"    account: {CONTROL_ACCOUNT}\n"
        f"    auth_users: {_quote(auth_users)}\n"
        "  }\n"
        "}\n"
    )


def nkey_user(key: str) -> str:
    return f"{{ nkey: {_quote(key)} }}"


def control_plane_user(key: str) -> str:
    """The control plane's user: everything but changing or removing the ledger's anchors
    (only the server's operator can, by editing this config)."""
    deny = _quote(list(subjects.LEDGER_ANCHOR_GUARDED_API))
    return f"{{ nkey: {_quote(key)}, permissions: {{ publish: {{ deny: {deny} }} }} }}"


def render_nats_config(store: CredentialStore, port: int, store_dir: Path) -> str:
    """nats-server config: JetStream, loopback, the accounts, the auth callout. It names no
    host: admitting or revoking one never changes it."""
    store.control_plane_seed()
    store.system_seed()
    store.callout_issuer_seed()
    control, system = store.public(CONTROL_PLANE), store.public(SYSTEM_USER)
    return (
        f"listen: 127.0.0.1:{port}\n"
        # An absolute store: a relative one would make every reload fail.
        + jetstream_config(store_dir.resolve())
        + accounts_block([control_plane_user(control)], [nkey_user(system)])
        + callout_block(store.public(CALLOUT_ISSUER), [control, system])
    )
