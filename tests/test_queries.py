"""Query budget of the ORM store, counted (deterministic), not timed.

Anonymous requests keep the view's own work to exactly one INSERT, so the difference is ours.
The figures are quoted in docs/performance.md and docs/contract.md ("Query budget").
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.testapp.models import Payment

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        __import__("django.conf").conf.settings.STORE_BACKEND != "db",
        reason="counts SQL queries of the ORM store; the cache store counts Redis commands",
    ),
]

URLS = ["/mixin/payments/", "/decorator/payments/", "/django/payments/"]


def _post(client: Client, url: str, key: str | None) -> tuple[int, list[str]]:
    extra: dict[str, Any] = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
    with CaptureQueriesContext(connection) as ctx:
        response = client.post(url, json.dumps({"amount": 3}), "application/json", **extra)
    # Transaction control is not a query: SQLite logs the BEGIN/COMMIT around the view, the
    # PostgreSQL and MySQL backends switch autocommit without a logged statement.
    queries = [
        q["sql"] for q in ctx.captured_queries if q["sql"].upper() not in {"BEGIN", "COMMIT"}
    ]
    return response.status_code, queries


#: Statements a replay sends: one where the claim statement hands back the record that holds the
#: key (MariaDB's RETURNING), two where a lost claim must read it (PostgreSQL, SQLite).
REPLAY_STATEMENTS = {"postgresql": 2, "mysql": 1, "sqlite": 2}


@pytest.mark.parametrize("url", URLS)
def test_fresh_path_adds_the_claim_and_the_completion(url: str) -> None:
    client = Client()
    status, bare = _post(client, url, None)
    assert status == 201
    status, protected = _post(client, url, "fresh")
    assert status == 201
    assert len(bare) == 1  # the view's own INSERT
    # No read before the claim: one INSERT claims, one UPDATE stores the response.
    assert len(protected) == 3, protected
    claim, view, completion = (q.lstrip().upper() for q in protected)
    assert claim.startswith("INSERT"), claim
    assert view.startswith("INSERT") and "PAYMENT" in view, view
    assert completion.startswith("UPDATE"), completion


@pytest.mark.parametrize("url", URLS)
def test_replay_never_runs_the_view(url: str) -> None:
    client = Client()
    _post(client, url, "again")
    status, queries = _post(client, url, "again")
    assert status == 201
    assert len(queries) == REPLAY_STATEMENTS[connection.vendor], queries
    assert Payment.objects.count() == 1
