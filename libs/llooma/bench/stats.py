"""Summary statistics shared by the benchmarks (the quantile is the live metrics' own)."""

from __future__ import annotations

from llooma.quantiles import percentile

__all__ = ["percentile"]
