"""The example serves its OpenAPI schema and a Swagger UI that works without internet access."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from example_project.shop.models import Product

PROBLEM = "application/problem+json"


@pytest.fixture
def schema(db: None) -> dict[str, Any]:
    response = Client().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return json.loads(response.content)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("path", "required"),
    [("/api/payments/", False), ("/api/orders/", False), ("/api/register/", True)],
)
def test_schema_documents_the_key_and_the_problems(
    schema: dict[str, Any], path: str, required: bool
) -> None:
    operation = schema["paths"][path]["post"]
    (key,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert key["in"] == "header"
    assert key["required"] is required
    responses = operation["responses"]
    for status, code in [
        ("400", "idempotency-key-invalid"),
        ("409", "idempotency-request-in-progress"),
        ("422", "idempotency-key-reused"),
        ("503", "idempotency-store-unavailable"),
    ]:
        assert code in responses[status]["content"][PROBLEM]["examples"], (path, status)
    assert "Idempotent-Replayed" in responses["201"]["headers"]


def test_out_of_stock_answers_what_the_schema_documents(
    schema: dict[str, Any], alice_api: APIClient, mug: Product
) -> None:
    Product.objects.filter(pk=mug.pk).update(stock=0)
    response = alice_api.post(
        "/api/orders/",
        {"sku": mug.sku, "quantity": 1},
        format="json",
        headers={"Idempotency-Key": "out-of-stock-1"},
    )
    assert response.status_code == 409
    assert response["Content-Type"] == PROBLEM
    body = json.loads(response.content)
    conflict = schema["paths"]["/api/orders/"]["post"]["responses"]["409"]
    # The only 409 media type the schema lists is problem+json, and it names this problem.
    assert list(conflict["content"]) == [PROBLEM]
    examples = conflict["content"][PROBLEM]["examples"]
    documented = [e["value"] for e in examples.values() if e["value"]["type"] == body["type"]]
    assert documented == [{k: body[k] for k in ("type", "title", "status", "detail")}]
    problem_schema = schema["components"]["schemas"]["IdempotencyProblem"]
    assert set(problem_schema["required"]) <= set(body)


def test_swagger_ui_page_uses_local_assets(db: None) -> None:
    page = Client().get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "/api/schema/" in html
    assert "cdn" not in html.lower()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert finders.find("drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")


def test_index_page_links_the_api_docs(db: None) -> None:
    html = Client().get("/").content.decode()
    assert 'href="/api/docs/"' in html
    assert 'href="/api/schema/"' in html


def test_manage_py_spectacular_writes_a_valid_schema(db: None, tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"
    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--file", str(out), stderr=StringIO()
    )
    assert "Idempotency-Key" in out.read_text()
