"""Test helpers for projects that use the package, and the pytest plugin that ships them.

``assert_idempotent`` proves one endpoint keeps the contract in one line of test. The plugin
(registered through the ``pytest11`` entry point, so installing the package enables it) adds the
``idempotency_disabled`` marker and fixture, the ``memory_idempotency_store`` fixture, and
empties a configured in-memory store after each test, as a test database is emptied.

The module is imported when pytest starts, before Django is configured: it imports nothing from
Django or the package at module level, and works without pytest for ``unittest`` users.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

try:
    import pytest
except ImportError:  # pragma: no cover - unittest users get assert_idempotent alone
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from django.test import Client

    from django_idempotency.storage.memory import MemoryStorage

__all__ = ["assert_idempotent"]

REPLAYED_HEADER = "Idempotent-Replayed"
#: The field added to a mapping body to make "the same key with another body".
PROBE_FIELD = "_idempotency_probe"
MARKER = "idempotency_disabled"


def assert_idempotent(
    client: Client,
    method: str,
    url: str,
    data: Any,
    *,
    effects: Callable[[], int],
    headers: Mapping[str, str] | None = None,
    format: str = "json",
) -> Any:
    """Send ``method url`` as a client that retries would, and check the four promises.

    1. The request and its retry with the same key grow ``effects()`` by exactly one.
    2. The retry is a byte-identical replay (status, body) with ``Idempotent-Replayed: true``.
    3. The same key with another body gets 422 and changes nothing.
    4. A second key runs the request again: ``effects()`` grows by one more.

    ``client`` is Django's test ``Client`` or DRF's ``APIClient``, already authenticated (or
    pass ``headers``, e.g. ``{"Authorization": "Token ..."}``). ``data`` is encoded once as
    ``format`` (``"json"``, ``"multipart"``, or a media type for ``bytes``/``str`` bodies), so
    every attempt sends the same bytes; "another body" adds the field ``_idempotency_probe`` to
    a mapping (or an item to a list, a byte to raw data). The request must be one that can
    succeed twice, since check 4 sends it under a new key. Returns the first response.

    An ``AssertionError`` names the check that failed and shows what came back.
    """
    from django_idempotency.conf import settings

    verb = method.upper()
    body, content_type = _encode(data, format)
    other, _ = _encode(_altered(data), format)
    header = settings.IDEMPOTENCY_HEADER

    def send(key: str, payload: bytes) -> Any:
        sent = {**(headers or {}), header: f'"{key}"'}
        return client.generic(verb, url, payload, content_type=content_type, headers=sent)

    def fail(check: str, message: str) -> None:
        raise AssertionError(f"assert_idempotent({verb} {url}): {check} failed: {message}")

    key = str(uuid.uuid4())
    start = effects()
    first = send(key, body)
    after_first = effects()
    retry = send(key, body)
    after_retry = effects()

    check = "check 1 (the request and its retry run once)"
    if _replayed(first):
        fail(check, f"the first request was already a replay: {_describe(first)}")
    if after_first - start != 1:
        fail(
            check,
            f"the first request changed effects() by {after_first - start} ({start} -> "
            f"{after_first}), expected 1; it answered {_describe(first)}",
        )
    if after_retry != after_first:
        fail(
            check,
            f"the retry with the same key ran again: effects() went from {after_first} to "
            f"{after_retry}; first {_describe(first)}; retry {_describe(retry)}",
        )

    check = "check 2 (the retry is a byte-identical replay)"
    if not _replayed(retry):
        fail(check, f"the retry has no '{REPLAYED_HEADER}: true': {_describe(retry)}")
    if retry.status_code != first.status_code or _content(retry) != _content(first):
        fail(check, f"first {_describe(first)}; retry {_describe(retry)}")

    check = "check 3 (the same key with another body is refused with 422)"
    reused = send(key, other)
    after_reused = effects()
    if reused.status_code != 422:
        fail(check, f"it answered {_describe(reused)}")
    if after_reused != after_retry:
        fail(check, f"effects() went from {after_retry} to {after_reused}")

    check = "check 4 (another key runs the request again)"
    again = send(str(uuid.uuid4()), body)
    after_again = effects()
    if after_again - after_reused != 1 or _replayed(again):
        fail(
            check,
            f"effects() went from {after_reused} to {after_again}, expected one more; it "
            f"answered {_describe(again)}",
        )
    return first


def _encode(data: Any, format: str) -> tuple[bytes, str]:
    if isinstance(data, str):
        data = data.encode()
    if format == "json":
        if isinstance(data, bytes):
            return data, "application/json"
        from django.core.serializers.json import DjangoJSONEncoder

        return json.dumps(data, cls=DjangoJSONEncoder).encode(), "application/json"
    if format == "multipart":
        from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart

        return encode_multipart(BOUNDARY, data), MULTIPART_CONTENT
    if "/" in format and isinstance(data, bytes):
        return data, format
    raise ValueError(f'format={format!r}: use "json", "multipart", or a media type with bytes')


def _altered(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {**data, PROBE_FIELD: "another body"}
    if isinstance(data, list):
        return [*data, PROBE_FIELD]
    raw = data.encode() if isinstance(data, str) else data
    if isinstance(raw, bytes):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return raw + b" "
        if isinstance(parsed, (dict, list)):
            return json.dumps(_altered(parsed)).encode()
        return raw + b" "
    raise TypeError(f"assert_idempotent cannot send a body of type {type(data).__name__}")


def _replayed(response: Any) -> bool:
    return bool(response.headers.get(REPLAYED_HEADER, "").lower() == "true")


def _content(response: Any) -> bytes:
    if getattr(response, "streaming", False):
        # A streamed answer cannot be replayed; show that rather than crash on .content.
        return b"<streaming response>"
    return bytes(response.content)


def _describe(response: Any) -> str:
    shown = ("Content-Type", REPLAYED_HEADER, "Location", "Retry-After")
    headers = {name: response.headers[name] for name in shown if name in response.headers}
    body = _content(response)
    if len(body) > 300:
        body = body[:300] + b"..."
    return f"{response.status_code} {headers} {body!r}"


def _clear_memory_store() -> None:
    """Empty the configured in-memory store, if one was built, like a test database's rollback."""
    loader = sys.modules.get("django_idempotency.storage")
    memory = sys.modules.get("django_idempotency.storage.memory")
    if loader is None or memory is None:
        return
    instance = getattr(loader, "_instance", None)
    if isinstance(instance, memory.MemoryStorage):
        instance.clear()


if pytest is not None:

    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line(
            "markers",
            f"{MARKER}: run the test with IDEMPOTENCY_ENABLED = False (django-idempotency)",
        )

    @pytest.fixture(autouse=True)
    def _django_idempotency(request: pytest.FixtureRequest) -> Iterator[None]:
        if request.node.get_closest_marker(MARKER) is None:
            yield
        else:
            from django.test import override_settings

            with override_settings(IDEMPOTENCY_ENABLED=False):
                yield
        _clear_memory_store()

    @pytest.fixture
    def idempotency_disabled() -> Iterator[None]:
        """The test runs with ``IDEMPOTENCY_ENABLED = False``: keys are ignored."""
        from django.test import override_settings

        with override_settings(IDEMPOTENCY_ENABLED=False):
            yield

    @pytest.fixture
    def memory_idempotency_store() -> Iterator[MemoryStorage]:
        """The test runs on a fresh in-memory store, which it gets to inspect."""
        from django.test import override_settings

        from django_idempotency.storage import get_storage
        from django_idempotency.storage.memory import MEMORY_STORE, MemoryStorage

        with override_settings(IDEMPOTENCY_STORE=MEMORY_STORE):
            store = get_storage()
            if not isinstance(store, MemoryStorage):  # a subclass swapped in by the project
                raise TypeError(f"{MEMORY_STORE} built {type(store).__name__}")
            yield store
