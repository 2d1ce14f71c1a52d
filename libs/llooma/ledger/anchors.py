"""The chain's anchors outside the database: each sealed block's height and id, published to
the `LLOOMA_LEDGER_ANCHORS` stream, which refuses deletes and purges and keeps one message a
height (a second one for a height is refused). Whoever holds the signing key or the database
can re-seal or cut the chain in Postgres, but not change what was anchored: `llooma ledger
verify` compares every anchored height with the block there.

Accounting anchors each block it seals, and every few seconds any block sealed elsewhere
(`llooma ledger credit`) or before a crash.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from llooma import bus, subjects

log = logging.getLogger(__name__)

NEW_BLOCKS = "SELECT height, block_id FROM ledger_blocks WHERE height > $1 ORDER BY height"


async def publish_anchor(js: JetStreamContext, chain: str, height: int, block_id: str) -> None:
    """Anchor one block; an anchor already there for its height is left alone (and a
    different one is logged: the database no longer holds what was anchored)."""
    try:
        await js.publish(
            subjects.ledger_anchor(chain, height),
            block_id.encode(),
            headers=bus.msg_id_headers(f"{chain}.{height}"),
        )
    except nats.js.errors.APIError:
        # Refused: this height has its anchor (JetStream keeps one a subject).
        anchored = await read_anchor(js, chain, height)
        if anchored != block_id:
            log.error("block %d is not the block anchored at that height", height)


async def read_anchor(js: JetStreamContext, chain: str, height: int) -> str | None:
    try:
        message = await js.get_last_msg(
            subjects.LEDGER_ANCHOR_STREAM, subjects.ledger_anchor(chain, height)
        )
    except nats.js.errors.NotFoundError:
        return None
    return (message.data or b"").decode()


async def read_anchors(js: JetStreamContext, chain: str) -> dict[int, str]:
    """Every anchor of one chain: height -> block id."""
    wanted = subjects.ledger_anchors(chain)
    info = await js.stream_info(subjects.LEDGER_ANCHOR_STREAM, subjects_filter=wanted)
    count = len(info.state.subjects or {})
    anchors: dict[int, str] = {}
    if not count:
        return anchors
    subscription = await js.subscribe(wanted, ordered_consumer=True)
    try:
        while len(anchors) < count:
            try:
                message = await subscription.next_msg(timeout=5)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            height = int(message.subject.rsplit(".", 1)[1])
            anchors.setdefault(height, message.data.decode())
    finally:
        await subscription.unsubscribe()
    return anchors


class Anchorer:
    """Anchors blocks in height order from the database, remembering the highest one."""

    def __init__(self, js: JetStreamContext, chain: str) -> None:
        self._js = js
        self.chain = chain
        self.anchored = 0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        anchors = await read_anchors(self._js, self.chain)
        self.anchored = max(anchors, default=0)

    async def catch_up(self, db: asyncpg.Pool) -> int:
        """Anchor every block above the highest anchored one; returns how many."""
        async with self._lock:
            rows = await db.fetch(NEW_BLOCKS, self.anchored)
            for row in rows:
                await publish_anchor(self._js, self.chain, row["height"], row["block_id"])
                self.anchored = row["height"]
            return len(rows)
