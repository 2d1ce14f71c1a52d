"""A host chunk as the race reads it: one event at a time, one token per token event."""

from __future__ import annotations

from collections.abc import Iterator

from llooma.v1.host_pb2 import HostChunk


def one_by_one(chunk: HostChunk) -> Iterator[HostChunk]:
    """The chunk itself, or, for a chunk that carries the tokens a host had ready together
    (`more_tokens`), one token chunk per token in order: the race's counts, its max_tokens
    cut and a duel's budget stay per token however the host batched them."""
    if not chunk.more_tokens:
        yield chunk
        return
    yield HostChunk(seq=chunk.seq, token=chunk.token)
    for offset, token in enumerate(chunk.more_tokens, 1):
        yield HostChunk(seq=chunk.seq + offset, token=token)
