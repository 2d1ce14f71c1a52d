"""Host credentials: one NATS nkey per host, and the nats-server config that confines it.

A host's key lets it subscribe only to its own task and cancel subjects and publish only its
own heartbeat and replies to tasks it was sent (`allow_responses`), so its identity comes from
the credential and the subject, never from a payload field. The control plane has a key of its
own. Revoking rewrites the config and reloads the server, which cuts the host off at once.
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
# A reply subject stays open for a host as long as a long generation may take.
REPLY_WINDOW = "30m"
MAX_REPLIES_PER_TASK = 1_000_000


def new_user_seed() -> bytes:
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def public_key(seed: bytes) -> str:
    key: bytes = nkeys.from_seed(seed).public_key
    return key.decode()


def host_permissions(host_id: str) -> dict[str, object]:
    return {
        "publish": {"allow": [subjects.kv_put_subject(subjects.HOSTS_BUCKET, host_id)]},
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
        """Create (or return the existing) credential for `name`; returns the seed file."""
        if name != CONTROL_PLANE:
            subjects.checked_token(name)
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
        return self.issue(CONTROL_PLANE)


def _quote(value: object) -> str:
    return json.dumps(value)


def jetstream_config(store_dir: Path, *, sync_always: bool = True) -> str:
    """The JetStream block; `sync_always` fsyncs each write before the publish ack, so an
    acknowledged settlement survives a crash of the server or the machine."""
    sync = ", sync_interval: always" if sync_always else ""
    return f"jetstream {{ store_dir: {_quote(str(store_dir))}{sync} }}\n"


def render_nats_config(store: CredentialStore, port: int, store_dir: Path) -> str:
    """nats-server config: JetStream, loopback, and one nkey user per credential."""
    registry = store._registry()
    users = [f"    {{ nkey: {_quote(registry[CONTROL_PLANE])} }}"]
    for name, key in sorted(store.hosts().items()):
        permissions = _quote(host_permissions(name))
        users.append(f"    {{ nkey: {_quote(key)}, permissions: {permissions} }}")
    return (
        f"listen: 127.0.0.1:{port}\n"
        + jetstream_config(store_dir)
        + "authorization {\n  users = [\n"
        + ",\n".join(users)
        + "\n  ]\n}\n"
    )


def reload_nats(pid_file: Path) -> bool:
    """Ask a running nats-server to re-read its config; False if none runs."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True
