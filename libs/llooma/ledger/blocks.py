"""Credit blocks (WWW.Serve table 1): entries sealed under a hash, linked to the parent block,
signed with the accounting service's Ed25519 key; and the chain check that finds tampering.

A block's id is the SHA-256 of its height, parent id, timestamp, proposer, entry count and
entries root; the root is the SHA-256 over the hashes of its entries in order, each entry
hashed with its position. So changing, deleting, inserting or moving any one entry or block
changes an id that the signature no longer covers, or breaks the link to the next block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

GENESIS_ID = "0" * 64


@dataclass(frozen=True, slots=True)
class Entry:
    block_height: int
    seq: int
    txn_id: str
    leg: int
    account: str
    amount: int
    kind: str
    ref: str

    def digest(self) -> bytes:
        fields = [
            self.block_height,
            self.seq,
            self.txn_id,
            self.leg,
            self.account,
            self.amount,
            self.kind,
            self.ref,
        ]
        return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).digest()


@dataclass(frozen=True, slots=True)
class Block:
    height: int
    block_id: str
    parent_id: str
    created_unix_nanos: int
    proposer: str
    entry_count: int
    entries_root: str
    signature: str


def entries_root(entries: Iterable[Entry]) -> str:
    root = hashlib.sha256()
    for entry in entries:
        root.update(entry.digest())
    return root.hexdigest()


def block_id(
    height: int, parent_id: str, created_unix_nanos: int, proposer: str, count: int, root: str
) -> str:
    header = json.dumps(
        [height, parent_id, created_unix_nanos, proposer, count, root], separators=(",", ":")
    )
    return hashlib.sha256(header.encode()).hexdigest()


class Signer:
    """The accounting service's block-signing key; the proposer is its public key (hex)."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self.public_key = key.verify_key.encode().hex()

    @classmethod
    def load(cls, path: Path) -> Signer:
        """Read an existing seed file."""
        return cls(SigningKey(bytes.fromhex(path.read_text().strip())))

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Read the seed file, or create it once (mode 0600) with its public key beside it.

        Racing creators each write a scratch file and link it into place: one link wins, and
        every racer then reads the seed at the path, so all sign with the same key."""
        if not path.exists():
            # Its own folder, which only its owner (accounting) opens; the seed is 0600.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(SigningKey.generate().encode().hex())
                # Linking fails if another process created it meanwhile: theirs wins.
                with contextlib.suppress(FileExistsError):
                    os.link(scratch, path)
            finally:
                os.unlink(scratch)
        signer = cls.load(path)
        pub = public_key_path(path)
        if not pub.exists() or pub.read_text().strip() != signer.public_key:
            pub.write_text(signer.public_key + "\n")
        return signer

    def seal(
        self, height: int, parent_id: str, created_unix_nanos: int, entries: list[Entry]
    ) -> Block:
        root = entries_root(entries)
        new_id = block_id(
            height, parent_id, created_unix_nanos, self.public_key, len(entries), root
        )
        signature = self._key.sign(bytes.fromhex(new_id)).signature.hex()
        return Block(
            height,
            new_id,
            parent_id,
            created_unix_nanos,
            self.public_key,
            len(entries),
            root,
            signature,
        )


def public_key_path(seed_path: Path) -> Path:
    return seed_path.with_suffix(".pub")


def trusted_key(path: Path) -> str:
    """The public key (hex) from a seed file or a `.pub` file."""
    text = path.read_text().strip()
    if path.suffix == ".pub":
        return text
    return SigningKey(bytes.fromhex(text)).verify_key.encode().hex()


def block_problem(
    block: Block, expected_height: int, parent_id: str, entries: list[Entry], trusted: set[str]
) -> str | None:
    """Why this block does not belong at this place in the chain, or None."""
    if block.height != expected_height:
        return f"height {block.height} where {expected_height} was expected (a block is missing)"
    if block.parent_id != parent_id:
        return "parent id does not match the previous block"
    if [e.seq for e in entries] != list(range(len(entries))):
        return "entry positions are not 0..n-1 (an entry was moved, removed or added)"
    if len(entries) != block.entry_count:
        return f"{len(entries)} entries, the block sealed {block.entry_count}"
    if entries_root(entries) != block.entries_root:
        return "entries do not hash to the sealed root (an entry was changed)"
    recomputed = block_id(
        block.height,
        block.parent_id,
        block.created_unix_nanos,
        block.proposer,
        block.entry_count,
        block.entries_root,
    )
    if recomputed != block.block_id:
        return "block id does not match its contents (the block was changed)"
    if block.proposer not in trusted:
        return "proposer is not a trusted accounting key"
    try:
        VerifyKey(bytes.fromhex(block.proposer)).verify(
            bytes.fromhex(block.block_id), bytes.fromhex(block.signature)
        )
    except (BadSignatureError, ValueError):
        return "signature does not verify"
    return None
