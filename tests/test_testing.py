"""``django_idempotency.testing``: assert_idempotent, the pytest plugin, the switch-off marker."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from django_idempotency.conf import settings as idempotency_settings
from django_idempotency.storage.memory import MemoryStorage
from django_idempotency.testing import assert_idempotent
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
PAYMENT = {"amount": 1200}


def payments() -> int:
    return int(Payment.objects.count())


@pytest.fixture
def token() -> str:
    user = get_user_model().objects.create_user(username=f"tester-{uuid.uuid4().hex[:8]}")
    return str(Token.objects.create(user=user).key)


@pytest.fixture
def api(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


@pytest.mark.parametrize(
    "url", ["/mixin/payments/", "/viewset/payments/", "/decorator/payments/", "/actions/pay/"]
)
def test_passes_on_protected_drf_endpoints(api: APIClient, url: str) -> None:
    first = assert_idempotent(api, "post", url, PAYMENT, effects=payments)
    assert first.status_code == 201
    assert payments() == 2  # the request, and the request under a second key


def test_passes_with_django_test_client_and_headers(token: str) -> None:
    assert_idempotent(
        Client(),
        "POST",
        "/django/payments/",
        PAYMENT,
        effects=payments,
        headers={"Authorization": f"Token {token}"},
    )


def test_passes_with_a_raw_json_body(api: APIClient) -> None:
    assert_idempotent(api, "post", "/mixin/payments/", b'{"amount": 7}', effects=payments)


def test_passes_with_patch(api: APIClient) -> None:
    assert_idempotent(api, "patch", "/mixin/payments/", PAYMENT, effects=payments)


def test_passes_on_the_memory_store(
    api: APIClient, memory_idempotency_store: MemoryStorage
) -> None:
    assert_idempotent(api, "post", "/mixin/payments/", PAYMENT, effects=payments)
    assert len(memory_idempotency_store) == 2


def test_fails_on_an_unprotected_endpoint(api: APIClient) -> None:
    with pytest.raises(AssertionError) as failure:
        assert_idempotent(api, "post", "/unprotected/payments/", PAYMENT, effects=payments)
    message = str(failure.value)
    assert message.startswith("assert_idempotent(POST /unprotected/payments/): check 1 ")
    assert "the retry with the same key ran again: effects() went from 1 to 2" in message
    # What came back is shown: both answers were fresh 201s.
    assert message.count("201 {'Content-Type': 'application/json', 'Location'") == 2


def test_fails_when_the_first_request_does_nothing(api: APIClient) -> None:
    with pytest.raises(AssertionError, match=r"check 1 .* changed effects\(\) by 0 .* 400 "):
        assert_idempotent(api, "post", "/mixin/payments/", {"amount": -1}, effects=payments)


def ignore_the_body(request: Any) -> str:
    """A fingerprint that misses the body: another body under the same key replays."""
    return f"{request.method} {request.get_full_path()}"


@override_settings(IDEMPOTENCY_FINGERPRINT=f"{__name__}.ignore_the_body")
def test_fails_when_another_body_is_not_refused(api: APIClient) -> None:
    with pytest.raises(AssertionError) as failure:
        assert_idempotent(api, "post", "/mixin/payments/", PAYMENT, effects=payments)
    message = str(failure.value)
    assert "check 3 (the same key with another body is refused with 422) failed" in message
    assert "it answered 201 {'Content-Type': 'application/json', 'Idempotent-Replayed'" in message


def test_reports_a_bad_format(api: APIClient) -> None:
    with pytest.raises(ValueError, match="format='xml'"):
        assert_idempotent(api, "post", "/mixin/payments/", PAYMENT, effects=payments, format="xml")


def test_uses_the_configured_header(api: APIClient) -> None:
    with override_settings(IDEMPOTENCY_HEADER="X-Request-Key"):
        assert_idempotent(api, "post", "/mixin/payments/", PAYMENT, effects=payments)


# --- the plugin ---------------------------------------------------------------------------------


def test_the_plugin_is_registered_by_its_entry_point(request: pytest.FixtureRequest) -> None:
    plugin = request.config.pluginmanager.get_plugin("django_idempotency")
    assert plugin is not None
    assert plugin.__name__ == "django_idempotency.testing"


@pytest.mark.idempotency_disabled
def test_the_marker_turns_the_layer_off() -> None:
    assert idempotency_settings.IDEMPOTENCY_ENABLED is False


def test_the_fixture_turns_the_layer_off(idempotency_disabled: None) -> None:
    assert idempotency_settings.IDEMPOTENCY_ENABLED is False


def test_the_layer_is_on_by_default() -> None:
    assert idempotency_settings.IDEMPOTENCY_ENABLED is True


@pytest.mark.idempotency_disabled
def test_with_the_layer_off_a_retry_runs_again(api: APIClient) -> None:
    key = str(uuid.uuid4())
    responses = [
        api.post("/mixin/payments/", PAYMENT, format="json", headers={"Idempotency-Key": key})
        for _ in range(2)
    ]
    assert [r.status_code for r in responses] == [201, 201]
    assert "Idempotent-Replayed" not in responses[1].headers
    assert payments() == 2


@pytest.mark.django_db(databases=[])
def test_the_package_root_and_the_plugin_import_no_client_library() -> None:
    code = (
        "import sys, django_idempotency, django_idempotency.testing\n"
        "loaded = sorted({'requests', 'httpx', 'django_idempotency.client'} & set(sys.modules))\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(  # noqa: S603 - our interpreter, no shell
        [sys.executable, "-c", "import json\n" + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == []


def test_passes_with_multipart_and_with_a_str_body(api: APIClient) -> None:
    assert_idempotent(
        api, "post", "/mixin/payments/", PAYMENT, effects=payments, format="multipart"
    )
    assert_idempotent(api, "post", "/mixin/payments/", '{"amount": 3}', effects=payments)


def test_another_body_differs_for_every_kind_of_data() -> None:
    from django_idempotency.testing import _altered

    assert _altered({"a": 1}) == {"a": 1, "_idempotency_probe": "another body"}
    assert _altered([1]) == [1, "_idempotency_probe"]
    assert json.loads(_altered(b'{"a": 1}'))["_idempotency_probe"] == "another body"
    assert _altered("plain text") == b"plain text "
    assert _altered(b"7") == b"7 "
    with pytest.raises(TypeError, match="type int"):
        _altered(7)


class ScriptedClient:
    """Stands in for a test client to reach the checks a real endpoint rarely fails.

    Each answer is ``(status, body, replayed, effect)``; ``effect`` is added to ``count``.
    """

    def __init__(self, *answers: tuple[int, bytes, bool, int]) -> None:
        self.answers = list(answers)
        self.count = 0

    def generic(self, method: str, url: str, data: bytes, **kwargs: Any) -> Any:
        from django.http import HttpResponse

        status, body, replayed, effect = self.answers.pop(0)
        self.count += effect
        response = HttpResponse(body, status=status, content_type="application/json")
        if replayed:
            response["Idempotent-Replayed"] = "true"
        return response


FRESH = (201, b'{"id": 1}', False, 1)
REPLAY = (201, b'{"id": 1}', True, 0)
REFUSED = (422, b"{}", False, 0)


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([REPLAY, REPLAY], "check 1 .* the first request was already a replay"),
        ([FRESH, (201, b'{"id": 1}', False, 0)], "check 2 .* the retry has no"),
        ([FRESH, (201, b'{"id": 2}', True, 0)], r"check 2 .* retry 201 .* b'\{\"id\": 2\}'"),
        ([FRESH, REPLAY, (422, b"{}", False, 1)], r"check 3 .* effects\(\) went from 1 to 2"),
        ([FRESH, REPLAY, REFUSED, REPLAY], r"check 4 .* effects\(\) went from 1 to 1"),
    ],
)
def test_each_check_reports_what_came_back(answers: list[Any], expected: str) -> None:
    client = ScriptedClient(*answers)
    with pytest.raises(AssertionError, match=expected):
        assert_idempotent(client, "post", "/x/", {}, effects=lambda: client.count)  # type: ignore[arg-type]


def test_a_long_or_streamed_answer_is_shown_shortened() -> None:
    from django.http import HttpResponse, StreamingHttpResponse

    from django_idempotency.testing import _describe

    assert _describe(HttpResponse(b"x" * 1000)).endswith("x" * 10 + "...'")
    assert "<streaming response>" in _describe(StreamingHttpResponse(iter([b"a"])))
