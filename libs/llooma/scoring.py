"""S(h) as the paper writes it: five fixed terms and their weights. The selection pipeline
(`llooma.selection`) names each term as a scorer and computes S(h) from them; this is the
fixed-shape view of the same sum, and the picker's names for callers that import them here."""

from __future__ import annotations

from dataclasses import dataclass

from llooma.selection import Candidate, clamp01, pick_hosts, weighted

__all__ = ["Candidate", "ScoreTerms", "ScoreWeights", "clamp01", "host_score", "pick_hosts"]


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    """The paper's S(h) weights; lower S(h) is better."""

    load: float = 0.40
    latency_p95: float = 0.30
    staleness: float = 0.20
    error_rate: float = 0.10
    # Duel-and-judge quality (settings.duel_quality_weight); off unless configured.
    quality: float = 0.0

    def by_scorer(self) -> dict[str, float]:
        return {
            "load": self.load,
            "latency_p95": self.latency_p95,
            "staleness": self.staleness,
            "error_rate": self.error_rate,
            "quality_deficit": self.quality,
        }


@dataclass(frozen=True, slots=True)
class ScoreTerms:
    """Each term already scaled to [0, 1]."""

    load: float
    latency_p95: float
    staleness: float
    error_rate: float
    # 1 - the host's duel quality: 0.5 for a host never judged.
    quality_deficit: float = 0.0

    def by_scorer(self) -> dict[str, float]:
        return {
            "load": self.load,
            "latency_p95": self.latency_p95,
            "staleness": self.staleness,
            "error_rate": self.error_rate,
            "quality_deficit": self.quality_deficit,
        }


def host_score(terms: ScoreTerms, weights: ScoreWeights) -> float:
    return weighted(terms.by_scorer(), weights.by_scorer())
