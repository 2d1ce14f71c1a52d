"""A batch of delivery reports becomes one row per request, as the database merges them:
reports sent one by one may arrive in any order, and a final one is never undone."""

from __future__ import annotations

from llooma.ledger.deliveries import ReportRow, merged
from llooma.v1.settlement_pb2 import DeliveryReport


def report(tokens: int, *, final: bool = False, failed: bool = False) -> DeliveryReport:
    return DeliveryReport(
        request_id="r", api_key_id="k", delivered_tokens=tokens, final=final, failed=failed
    )


def test_a_final_report_wins_over_an_earlier_one_that_arrived_after_it() -> None:
    final = report(3, final=True, failed=True)
    assert merged([final, report(0)]) == [ReportRow("r", "k", 3, True, False, True, False)]
    assert merged([report(0), final]) == [ReportRow("r", "k", 3, True, False, True, False)]


def test_checkpoints_keep_the_most_delivered_and_any_failure() -> None:
    rows = merged([report(5, failed=True), report(2), report(4)])
    assert rows == [ReportRow("r", "k", 5, False, False, True, False)]


def test_each_request_keeps_its_own_row() -> None:
    other = DeliveryReport(request_id="s", api_key_id="k", delivered_tokens=1, final=True)
    rows = merged([report(1), other, report(2, final=True)])
    assert {row.request_id: row.delivered_tokens for row in rows} == {"r": 2, "s": 1}
