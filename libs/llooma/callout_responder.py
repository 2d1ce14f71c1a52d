"""The auth callout's responder: answers the NATS server about each host connection.

Runs beside every embedded nats-server (and as the `callout` container in compose), connected
with the control plane's key; replicas share one queue group, so any one may die. The host
registry is re-read whenever its file changes (one `stat` per connection), so `llooma hosts
add` takes effect on the next connection and `revoke` before the revoked host can reconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path

import nkeys
from nats.aio.msg import Msg

from llooma import bus, callout, subjects
from llooma.credentials import CredentialStore
from llooma.settings import load_settings

log = logging.getLogger(__name__)
QUEUE = "llooma-callout"


class Registry:
    """The store's hosts by public key, re-read when its file is replaced."""

    def __init__(self, store: CredentialStore) -> None:
        self._store = store
        self._stamp: tuple[int, int, int] | None = None
        self._by_key: dict[str, str] = {}

    def hosts_by_key(self) -> dict[str, str]:
        try:
            stat = os.stat(self._store.registry_path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp != self._stamp:
            self._by_key = {key: name for name, key in self._store.hosts().items()}
            self._stamp = stamp
        return self._by_key


async def respond(
    store: CredentialStore, nats_url: str, stop: asyncio.Event, ready_file: Path | None = None
) -> None:
    issuer = nkeys.from_seed(store.callout_issuer_seed().read_bytes().strip())
    registry = Registry(store)
    # The control plane's key from the store; TLS files, if any, from the usual settings.
    access = dataclasses.replace(
        load_settings().nats_access(),
        nkey_seed_file=str(store.control_plane_seed()),
        creds_file="",
    )
    nc = await bus.connect(nats_url, "llooma-callout", access=access)

    async def on_request(msg: Msg) -> None:
        try:
            answer, host = callout.answer(msg.data.decode(), issuer, registry.hosts_by_key())
        except (callout.InvalidJwt, UnicodeDecodeError) as error:
            # No answer: the server refuses the connection when its auth timeout passes.
            log.warning("unusable authorization request: %s", error)
            return
        if not host:
            log.info("refused a connection: its key is not a registered host's")
        await msg.respond(answer.encode())

    await nc.subscribe(subjects.AUTH_CALLOUT, queue=QUEUE, cb=on_request)
    await nc.flush()
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, str(os.getpid()))
    log.info("answering host admission on %s", nats_url)
    await stop.wait()
    await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--credentials", required=True, type=Path)
    parser.add_argument("--nats-url", help="default: NATS_URL (every node of a cluster)")
    parser.add_argument("--ready-file", type=Path, help="written once requests are answered")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        nats_url = args.nats_url or load_settings().nats_url
        await respond(CredentialStore(args.credentials), nats_url, stop, args.ready_file)

    asyncio.run(run())


if __name__ == "__main__":
    main()
