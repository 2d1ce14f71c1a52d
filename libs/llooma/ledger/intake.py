"""What accounting accepts from the settlement stream: one undecodable or impossible message
must be set aside (terminated and counted), never allowed to fail the batch it arrived in,
because a failing batch is redelivered, and so it would halt accounting for good."""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from llooma.ledger.economics import voted_judges
from llooma.v1.duel_pb2 import DuelResult
from llooma.v1.settlement_pb2 import DeliveryReport, DeliveryReports, TaskSettlement

log = logging.getLogger(__name__)


class Rejected(ValueError):
    """A message accounting cannot post; its reason names no content (no raw bytes)."""


def _problem_in_text(**fields: str) -> str | None:
    for name, value in fields.items():
        if "\x00" in value:
            # Postgres text cannot hold NUL.
            return f"{name} holds a NUL character"
    return None


def read_settlement(data: bytes) -> TaskSettlement:
    """Decode and check one settlement; raises Rejected if it cannot be posted. (Its counts
    are uint32 and its time int64 nanoseconds: the bigint columns and datetime hold them.)"""
    try:
        s = TaskSettlement.FromString(data)
    except DecodeError as error:
        raise Rejected("undecodable TaskSettlement") from error
    if not s.attempt_id:
        raise Rejected("no attempt_id")
    if not s.host_id:
        raise Rejected(f"attempt {s.attempt_id[:64]} has no host_id")
    problem = _problem_in_text(
        attempt_id=s.attempt_id,
        request_id=s.request_id,
        task_id=s.task_id,
        host_id=s.host_id,
        model=s.model,
        api_key_id=s.api_key_id,
        winner_model=s.winner_model,
    )
    if problem is not None:
        raise Rejected(f"settlement {problem}")
    return s


def read_duel(data: bytes) -> DuelResult:
    """Decode and check one duel result; raises Rejected if it cannot be posted."""
    try:
        d = DuelResult.FromString(data)
    except DecodeError as error:
        raise Rejected("undecodable DuelResult") from error
    if not d.duel_id:
        raise Rejected("no duel_id")
    if not d.host_a or not d.host_b:
        raise Rejected(f"duel {d.duel_id[:64]} lacks a duelist")
    judges = {f"judge{i}": vote.judge_host_id for i, vote in enumerate(d.votes)}
    problem = _problem_in_text(
        duel_id=d.duel_id,
        request_id=d.request_id,
        model=d.model,
        host_a=d.host_a,
        host_b=d.host_b,
        **judges,
    )
    if problem is not None:
        raise Rejected(f"duel {problem}")
    if "" in voted_judges(d):
        # It would pay an account with an empty name, which no account may have.
        raise Rejected(f"duel {d.duel_id[:64]} has a verdict without a judge")
    return d


def read_delivery(data: bytes) -> DeliveryReport:
    """Decode and check one delivery report; raises Rejected if it cannot be recorded."""
    try:
        report = DeliveryReport.FromString(data)
    except DecodeError as error:
        raise Rejected("undecodable DeliveryReport") from error
    _check_report(report)
    return report


def read_deliveries(data: bytes) -> list[DeliveryReport]:
    """Decode one ingress's batch of delivery reports and keep those that can be recorded
    (one impossible report is set aside alone, logged); raises Rejected if none can."""
    try:
        reports = DeliveryReports.FromString(data).reports
    except DecodeError as error:
        raise Rejected("undecodable DeliveryReports") from error
    kept: list[DeliveryReport] = []
    problems: list[str] = []
    for report in reports:
        try:
            _check_report(report)
        except Rejected as why:
            problems.append(str(why))
        else:
            kept.append(report)
    if problems and kept:
        log.warning(
            "set aside %d of %d delivery reports in a batch: %s",
            len(problems),
            len(reports),
            problems[0],
        )
    if not kept:
        raise Rejected(f"no delivery report to record ({problems[0] if problems else 'empty'})")
    return kept


def _check_report(report: DeliveryReport) -> None:
    if not report.request_id:
        raise Rejected("delivery report without a request_id")
    problem = _problem_in_text(request_id=report.request_id, api_key_id=report.api_key_id)
    if problem is not None:
        raise Rejected(f"delivery report {problem}")
