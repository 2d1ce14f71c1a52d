"""Duel quality that survives a dispatcher restart: the duel results of the last
`duel_quality_replay_s`, then live ones, through one `llooma.replay.Replay` on the
settlements stream, so a result published between the two is neither missed nor counted
twice."""

from __future__ import annotations

from llooma import subjects
from llooma.host_stats import HostStats
from llooma.replay import Replay
from llooma.v1.duel_pb2 import DuelResult


class DuelQualityFeed(Replay[DuelResult]):
    def __init__(self, stats: HostStats, replay_s: float) -> None:
        super().__init__(
            subjects.SETTLEMENT_DUEL,
            subjects.SETTLEMENT_STREAM,
            DuelResult.FromString,
            stats.record_duel,
            replay_s,
        )
