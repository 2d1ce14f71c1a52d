"""Pure pieces, tested without any server."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llooma import subjects
from llooma.host.backends import split_tokens
from llooma.scoring import Candidate, ScoreTerms, ScoreWeights, host_score, pick_hosts


@given(st.text())
def test_split_tokens_joins_back_exactly(text: str) -> None:
    assert "".join(split_tokens(text)) == text


def test_split_tokens_is_word_sized() -> None:
    assert split_tokens("a  bc\td\n") == ["a", "  bc", "\td", "\n"]


def test_score_weights_and_clamping() -> None:
    weights = ScoreWeights()
    idle = host_score(ScoreTerms(0, 0, 0, 0), weights)
    worst = host_score(ScoreTerms(5, 5, 5, 5), weights)
    assert idle == 0.0
    assert worst == pytest.approx(1.0)
    assert host_score(ScoreTerms(1, 0, 0, 0), weights) == pytest.approx(0.40)
    assert host_score(ScoreTerms(0, 1, 0, 0), weights) == pytest.approx(0.30)
    assert host_score(ScoreTerms(0, 0, 1, 0), weights) == pytest.approx(0.20)
    assert host_score(ScoreTerms(0, 0, 0, 1), weights) == pytest.approx(0.10)


def test_pick_hosts_is_distinct_and_from_the_best_bucket() -> None:
    candidates = [Candidate(f"h{i}", "m", score=i / 10, stake=1.0) for i in range(8)]
    rng = random.Random(7)
    for _ in range(200):
        chosen = pick_hosts(candidates, k=2, bucket_size=3, rng=rng)
        assert len({c.host_id for c in chosen}) == 2
        assert {c.host_id for c in chosen} <= {"h0", "h1", "h2"}


def test_pick_hosts_follows_stake() -> None:
    candidates = [
        Candidate("rich", "m", 0.1, stake=9.0),
        Candidate("poor", "m", 0.1, stake=1.0),
    ]
    rng = random.Random(3)
    firsts = Counter(
        pick_hosts(candidates, k=1, bucket_size=2, rng=rng)[0].host_id for _ in range(4000)
    )
    assert 0.86 < firsts["rich"] / 4000 < 0.94


def test_pick_hosts_counts_each_host_once_across_models() -> None:
    candidates = [Candidate("a", "m1", 0.1, 1.0), Candidate("a", "m2", 0.2, 1.0)]
    chosen = pick_hosts(candidates, k=2, bucket_size=4, rng=random.Random(1))
    assert [c.model for c in chosen] == ["m1"]


def test_model_token_keeps_simple_names_and_hashes_others() -> None:
    assert subjects.model_token("synthetic-small") == "synthetic-small"
    odd = subjects.model_token("meta-llama/Llama-3.1-8B")
    assert "." not in odd
    assert "/" not in odd
    assert odd == subjects.model_token("meta-llama/Llama-3.1-8B")
    assert odd != subjects.model_token("meta-llama/Llama-3.2-8B")


def test_checked_token_rejects_wildcards() -> None:
    for bad in ("a.b", "*", ">", "", "x y"):
        with pytest.raises(ValueError, match="subject token"):
            subjects.checked_token(bad)


def test_race_formulas_reproduce_the_papers_table_one() -> None:
    from llooma.bench.race import PAPER_TABLE, distributions

    by_name = {d.name: d for d in distributions(scale=1.0)}
    for (name, k), (p50, p95, p99, phi) in PAPER_TABLE.items():
        dist = by_name[name]
        for q, expected in ((0.50, p50), (0.95, p95), (0.99, p99)):
            assert dist.race_quantile(q, k) == pytest.approx(expected, rel=0.01), (name, k, q)
        assert dist.fallback_rate(1000.0, k) == pytest.approx(phi, abs=0.001), (name, k)
    pareto = by_name["pareto-1.5"]
    assert pareto.race_quantile(0.99, 1) == pytest.approx(5386, rel=0.001)
    assert pareto.race_quantile(0.99, 2) == pytest.approx(1160, rel=0.001)


def test_benchmark_percentile_interpolates_between_ranks() -> None:
    from llooma.bench.stats import percentile

    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 1.0) == 5.0
    assert percentile(values, 0.1) == pytest.approx(1.4)
