"""One `llama-server` process on a loopback port, serving the test model."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llooma.engine._build import EnginePaths
from llooma.processes import die_with_parent, free_port

# The model's own template is ChatML, which Gemma was not trained on; llama.cpp's built-in
# `gemma` template is the right one (the legacy templates need --no-jinja to be chosen by name).
CHAT_TEMPLATE = ("--no-jinja", "--chat-template", "gemma")
# The name llama-server answers to (it serves one model whatever a request names).
UPSTREAM_MODEL = "gemma-3-270m"


@dataclass
class LlamaServer:
    """Start, stop, kill and restart llama-server on a fixed port (a restart keeps the port, so
    a host worker pointed at it finds it again)."""

    paths: EnginePaths
    log_path: Path
    port: int = field(default_factory=free_port)
    # One thread: with two, ggml's OpenMP workers spin at each barrier, and on a machine whose
    # cores are busy (a test suite, a second engine) decoding ran ten times slower (1 token/s
    # instead of 8 at load average 12 on two cores).
    threads: int = 1
    # Total context; llama-server gives each of its `parallel` slots an equal share.
    ctx_size: int = 4096
    parallel: int = 2
    # Off, each prompt is computed whole: a prompt half-cached from an earlier request is
    # computed in other batch shapes, which can flip a greedy token (llama.cpp's README says
    # so of `cache_prompt`). The tests turn it off to compare texts across requests.
    cache_prompt: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"

    @property
    def slot_ctx(self) -> int:
        return self.ctx_size // self.parallel

    def args(self) -> list[str]:
        return [
            str(self.paths.server),
            "--model",
            str(self.paths.model),
            "--alias",
            UPSTREAM_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            str(self.threads),
            "--ctx-size",
            str(self.ctx_size),
            "--parallel",
            str(self.parallel),
            "--metrics",
            "--slots",
            "--no-webui",
            *([] if self.cache_prompt else ["--no-cache-prompt"]),
            *CHAT_TEMPLATE,
        ]

    def start(self, timeout_s: float = 60.0) -> LlamaServer:
        """Spawn the server and wait until /health says the model is loaded."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.process.returncode}; see {self.log_path}"
                )
            if self.healthy():
                return self
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"llama-server not healthy after {timeout_s} s; see {self.log_path}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not leave in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9 (a crash, not a stop)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
