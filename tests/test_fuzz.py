"""Fuzz the running stack's HTTP API from its own /openapi.json (schemathesis 4).

Every documented operation gets generated requests, valid and invalid, with the dev key;
schemathesis's checks must all pass: no 5xx, every status, header and body as documented,
invalid input refused, valid input not refused, missing auth refused.
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

from llooma.stack import Stack
from tests.conftest import AUTH

# Enough to try every field and header of each operation a few ways; bounded in time.
EXAMPLES_PER_OPERATION = 60


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
