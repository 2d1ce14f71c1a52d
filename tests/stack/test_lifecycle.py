"""`llooma up` (what `make run` runs) starts everything, and on SIGTERM leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from llooma.processes import free_port, port_is_free
from tests.conftest import AUTH

READY_BANNER = "Ctrl-C stops everything"


def start_up(data_dir: Path, http_port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    env["LLOOMA_HTTP_PORT"] = str(http_port)
    env["COLUMNS"] = "200"
    return subprocess.Popen(
        [sys.executable, "-m", "llooma.cli", "up", "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_banner(process: subprocess.Popen[str], timeout_s: float = 90.0) -> str:
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if READY_BANNER in line:
            return "".join(seen)
    raise AssertionError("stack never became ready:\n" + "".join(seen))


def everything_started(process: subprocess.Popen[str], data_dir: Path) -> list[psutil.Process]:
    started = psutil.Process(process.pid).children(recursive=True)
    postmaster = (data_dir / "postgres" / "postmaster.pid").read_text().split()[0]
    started.append(psutil.Process(int(postmaster)))
    return started


def listening_ports(processes: list[psutil.Process]) -> set[int]:
    ports = set()
    for proc in processes:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                ports.add(conn.laddr.port)
    return ports


def run_once(data_dir: Path) -> None:
    http_port = free_port()
    process = start_up(data_dir, http_port)
    try:
        banner = wait_for_banner(process)
        assert f"http://127.0.0.1:{http_port}" in banner
        assert "sk-llooma-dev" in banner
        assert "curl" in banner
        health = httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)
        assert health.status_code == 200
        answer = httpx.post(
            f"http://127.0.0.1:{http_port}/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "still here"}]},
            headers=AUTH,
            timeout=10,
        )
        assert answer.json()["choices"][0]["message"]["content"] == "still here"
        started = everything_started(process, data_dir)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for part in ("nats-server", "services.ingress", "services.accounting", "host", "postgres"):
            assert part in names, f"{part} not among the started processes"
        ports = listening_ports(started)
        assert http_port in ports
        assert len(ports) >= 2, "NATS and HTTP at least"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0
    _gone, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert all(port_is_free(port) for port in ports), "a port is still taken"
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


def test_up_serves_then_stops_everything_and_can_start_again(tmp_path: Path) -> None:
    run_once(tmp_path / "data")
    run_once(tmp_path / "data")
