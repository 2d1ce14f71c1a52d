"""Fuzz the running stack's HTTP API from its own /openapi.json (schemathesis 4).

Every documented operation gets generated requests, valid and invalid, with the dev key;
schemathesis's checks must all pass: no 5xx, every status, header and body as documented,
invalid input refused, valid input not refused, missing auth refused. Then fewer, with a key
whose balance is exhausted: its refusals (402) must be documented too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import APIOperation, Case
from schemathesis.openapi import from_url
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from llooma.stack import Stack
from tests.conftest import AUTH, NO_BALANCE_KEY

# Enough to try every field and header of each operation a few ways; bounded in time.
EXAMPLES_PER_OPERATION = 60
EXHAUSTED_EXAMPLES_PER_OPERATION = 15


@pytest.fixture
def api_schema(stack: Stack) -> BaseSchema:
    return from_url(f"{stack.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
CASES_RUN: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_cases() -> Iterator[None]:
    yield
    print(f"\nfuzz: {sum(CASES_RUN.values())} cases {dict(CASES_RUN)}, statuses {dict(STATUSES)}")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi_description(
    case: Case[APIOperation[Any, Any, Any, Any]],
) -> None:
    response = case.call_and_validate(headers=AUTH, timeout=30)
    CASES_RUN[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1


@schema.parametrize()
@settings(
    max_examples=EXHAUSTED_EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_an_exhausted_key_gets_documented_refusals(
    case: Case[APIOperation[Any, Any, Any, Any]],
) -> None:
    # Any request from this key may be refused for its balance (402) before its content is
    # judged: the accept/reject checks do not apply; conformance of every answer does.
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {NO_BALANCE_KEY}"},
        timeout=30,
        excluded_checks=[positive_data_acceptance, negative_data_rejection],
    )
    CASES_RUN[f"exhausted {case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1
