"""/healthz says 503 until every service and a host are ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llooma.embedded import EmbeddedNats
from llooma.processes import die_with_parent, free_port


def test_healthz_is_503_while_services_are_missing(tmp_path: Path) -> None:
    nats = EmbeddedNats.start(tmp_path / "nats")
    port = free_port()
    env = {**os.environ, "NATS_URL": nats.url, "LLOOMA_HTTP_PORT": str(port)}
    ingress = subprocess.Popen(
        [sys.executable, "-m", "services.ingress"], env=env, preexec_fn=die_with_parent
    )
    try:
        response = None
        for _ in range(200):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert response is not None
        assert response.status_code == 503
        report = response.json()
        assert report["status"] == "unavailable"
        assert report["hosts"] == 0
        assert report["services"]["ingress"] == 1
        assert report["services"]["racer"] == 0
    finally:
        ingress.terminate()
        ingress.wait(10)
        nats.stop()
