"""A process reaches NATS over TLS with the files its settings or host YAML name: the
servers' CA, and a client certificate and key when the server verifies clients."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from llooma import bus
from llooma.embedded import nats_server_binary
from llooma.processes import free_port, wait_for_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl here")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
                "ca-key.pem", "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext,
                cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    make_pki(folder)
    port = free_port()
    (folder / "nats.conf").write_text(
        f"listen: 127.0.0.1:{port}\n"
        "tls {\n"
        f'  cert_file: "{folder / "server.pem"}"\n'
        f'  key_file: "{folder / "server-key.pem"}"\n'
        f'  ca_file: "{folder / "ca.pem"}"\n'
        "  verify: true\n"
        "}\n"
    )
    process = subprocess.Popen(
        [nats_server_binary(), "-c", str(folder / "nats.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 15.0, process)
        yield f"tls://127.0.0.1:{port}", folder
    finally:
        process.terminate()
        process.wait(10)


async def test_mutual_tls_with_the_configured_files(tls_server: tuple[str, Path]) -> None:
    url, folder = tls_server
    access = bus.NatsAccess(
        tls_ca_file=str(folder / "ca.pem"),
        tls_cert_file=str(folder / "client.pem"),
        tls_key_file=str(folder / "client-key.pem"),
    )
    nc = await bus.connect(url, "llooma-tests-tls", access=access, attempts=5)
    try:
        await nc.flush(timeout=5)
    finally:
        await nc.close()


async def test_without_a_client_certificate_the_server_refuses(
    tls_server: tuple[str, Path],
) -> None:
    url, folder = tls_server
    access = bus.NatsAccess(tls_ca_file=str(folder / "ca.pem"))
    # nats-py keeps trying (a server may come up); it never gets in.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(3):
            await bus.connect(url, "llooma-tests-tls", access=access, attempts=2)
