"""One behaviour suite, run against every entry point (mixin and decorator alike) and, through
the test matrix, against every store. Each test is a row of the contract's outcome table."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.db import connections, transaction
from django.test import Client, override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from django_idempotency import core, signals
from django_idempotency.conf import settings as idempotency_settings
from django_idempotency.storage import get_storage
from tests.behaviour import ENTRIES, Entry, fingerprint_for, problem, record_for, scope_of, send
from tests.factories import UserFactory
from tests.faults import TcpProxy, store_unreachable
from tests.testapp import views
from tests.testapp.models import Payment

# Every test commits for real, as requests do in production: the claim is its own committed
# INSERT and the view's transaction a real one, not savepoints inside a test transaction.
pytestmark = pytest.mark.django_db(transaction=True)

entries = pytest.mark.parametrize("entry", ENTRIES, ids=str)
#: Whether the store completes inside the view's transaction (the ORM store); every store runs a
#: synchronous view in a transaction, the others store the result right after its commit.
TRANSACTIONAL = settings.STORE_BACKEND == "db"


@pytest.fixture
def user() -> Any:
    return UserFactory.create()


@pytest.fixture
def client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[timedelta]]:
    """Shift the engine's clock: append a timedelta to move time forward."""
    shift = [timedelta()]
    monkeypatch.setattr(core, "now", lambda: timezone.now() + shift[-1])
    yield shift


@pytest.fixture
def store_down() -> Iterator[None]:
    with store_unreachable():
        yield


# --- replay ---------------------------------------------------------------------------------


@entries
def test_retry_replays_the_stored_response(client: Client, entry: Entry) -> None:
    first = send(client, entry.url, key="order-1")
    second = send(client, entry.url, key="order-1")

    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first
    assert "session-hint" in first.cookies
    assert second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    for header in ("Content-Type", "Location", "ETag"):
        assert second[header] == first[header]
    assert "Set-Cookie" not in second
    assert not second.cookies
    assert Payment.objects.count() == 1


@entries
def test_quoted_and_bare_keys_name_the_same_key(client: Client, entry: Entry) -> None:
    send(client, entry.url, key='"8e03978e-40d5-43e8-bc93-6894a57f9324"')
    retry = send(client, entry.url, key="8e03978e-40d5-43e8-bc93-6894a57f9324")
    assert retry["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@entries
def test_keys_are_case_sensitive(client: Client, entry: Entry) -> None:
    send(client, entry.url, key="abc")
    other = send(client, entry.url, key="ABC")
    assert other.status_code == 201
    assert "Idempotent-Replayed" not in other
    assert Payment.objects.count() == 2


@entries
def test_client_error_is_final_and_replayed(client: Client, entry: Entry) -> None:
    first = send(client, entry.url, {"amount": -1}, key="bad-amount")
    second = send(client, entry.url, {"amount": -1}, key="bad-amount")
    assert first.status_code == 400
    assert second.status_code == 400
    assert second["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert Payment.objects.count() == 0


# --- mismatch -------------------------------------------------------------------------------


@entries
def test_same_key_with_another_body_is_refused(client: Client, entry: Entry) -> None:
    send(client, entry.url, {"amount": 1}, key="k")
    reused = send(client, entry.url, {"amount": 999}, key="k")
    assert reused.status_code == 422
    assert problem(reused)["type"].endswith("#idempotency-key-reused")
    # The stored record is untouched: the original request still replays.
    again = send(client, entry.url, {"amount": 1}, key="k")
    assert again["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@entries
def test_same_key_with_another_query_string_is_refused(client: Client, entry: Entry) -> None:
    send(client, entry.url + "?amount=1", key="k")
    reused = send(client, entry.url + "?amount=999", key="k")
    assert reused.status_code == 422
    assert Payment.objects.count() == 1


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.patch], ids=str)
def test_same_key_with_another_method_is_refused(client: Client, entry: Entry) -> None:
    send(client, entry.url, key="k")
    reused = send(client, entry.url, key="k", method="patch")
    assert reused.status_code == 422
    assert Payment.objects.count() == 1


@entries
def test_same_key_with_another_media_type_is_refused(client: Client, entry: Entry) -> None:
    send(client, entry.url, key="k")
    reused = client.post(
        entry.url,
        json.dumps({"amount": 10}),
        content_type="application/vnd.api+json",
        HTTP_IDEMPOTENCY_KEY="k",
    )
    assert reused.status_code == 422


# --- in flight ------------------------------------------------------------------------------


def _hold_key(user: Any, key: str, fingerprint: str, *, lease: int = 60, age: int = 0) -> str:
    scope = scope_of(user)
    from django_idempotency.keys import hash_key

    claim = get_storage().claim(
        scope,
        hash_key(scope, key),
        fingerprint,
        now=timezone.now() - timedelta(seconds=age),
        lease=timedelta(seconds=lease),
        ttl=timedelta(days=1),
    )
    assert claim.token is not None
    return claim.token


@entries
def test_duplicate_while_in_flight_gets_409(client: Client, user: Any, entry: Entry) -> None:
    _hold_key(user, "busy", fingerprint_for(entry.url))
    response = send(client, entry.url, key="busy")
    assert response.status_code == 409
    assert problem(response)["type"].endswith("#idempotency-request-in-progress")
    assert int(response["Retry-After"]) >= 1
    assert Payment.objects.count() == 0


@entries
def test_mismatch_while_in_flight_gets_422(client: Client, user: Any, entry: Entry) -> None:
    _hold_key(user, "busy", fingerprint_for(entry.url, {"amount": 1}))
    response = send(client, entry.url, {"amount": 2}, key="busy")
    assert response.status_code == 422
    assert Payment.objects.count() == 0


@entries
def test_dead_lease_is_reclaimed_once(client: Client, user: Any, entry: Entry) -> None:
    # A worker claimed the key 120 s ago with a 60 s lease and died.
    _hold_key(user, "crashed", fingerprint_for(entry.url), lease=60, age=120)
    response = send(client, entry.url, key="crashed")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert send(client, entry.url, key="crashed")["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@entries
def test_wait_mode_answers_409_after_waiting(client: Client, user: Any, entry: Entry) -> None:
    _hold_key(user, "busy", fingerprint_for(entry.url))
    with override_settings(IDEMPOTENCY_WAIT=0.2):
        response = send(client, entry.url, key="busy")
    assert response.status_code == 409


@entries
def test_wait_mode_replays_when_the_original_finishes(
    client: Client, user: Any, entry: Entry
) -> None:
    from django_idempotency.keys import hash_key
    from django_idempotency.storage.base import StoredResponse

    token = _hold_key(user, "busy", fingerprint_for(entry.url))
    scope = scope_of(user)
    stored = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id": 1}')

    def finish_later() -> None:
        time.sleep(0.3)
        get_storage().complete(scope, hash_key(scope, "busy"), token, stored, now=timezone.now())
        connections.close_all()

    worker = threading.Thread(target=finish_later)
    worker.start()
    with override_settings(IDEMPOTENCY_WAIT=5):
        response = send(client, entry.url, key="busy")
    worker.join()
    assert response.status_code == 201
    assert response["Idempotent-Replayed"] == "true"
    assert response.content == b'{"id": 1}'
    assert Payment.objects.count() == 0


# --- scope ----------------------------------------------------------------------------------


@entries
def test_two_users_with_the_same_key_never_share(client: Client, entry: Entry) -> None:
    other = Client()
    other.force_login(UserFactory.create())
    mine = send(client, entry.url, key="shared-key")
    theirs = send(other, entry.url, key="shared-key")
    assert mine.status_code == theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert json.loads(mine.content)["id"] != json.loads(theirs.content)["id"]
    assert send(other, entry.url, key="shared-key").content == theirs.content
    assert Payment.objects.count() == 2


@pytest.mark.parametrize(
    "entry", [e for e in ENTRIES if "django" not in e.name and "async" not in e.name], ids=str
)
def test_scope_is_the_user_drf_authenticated(entry: Entry) -> None:
    # Token auth happens inside DRF: a middleware would see two anonymous requests here.
    tokens = [Token.objects.create(user=UserFactory.create()).key for _ in range(2)]
    client = Client()
    responses = [
        send(client, entry.url, key="k", HTTP_AUTHORIZATION=f"Token {token}") for token in tokens
    ]
    assert [r.status_code for r in responses] == [201, 201]
    assert all("Idempotent-Replayed" not in r for r in responses)
    assert Payment.objects.count() == 2


@entries
def test_anonymous_requests_share_a_namespace(entry: Entry) -> None:
    anonymous = Client()
    send(anonymous, entry.url, key="anon")
    assert send(Client(), entry.url, key="anon")["Idempotent-Replayed"] == "true"
    assert record_for(None, "anon") is not None


@entries
@override_settings(IDEMPOTENCY_SKIP_ANONYMOUS=True)
def test_anonymous_requests_can_be_skipped(entry: Entry) -> None:
    send(Client(), entry.url, key="anon")
    second = send(Client(), entry.url, key="anon")
    assert "Idempotent-Replayed" not in second
    assert Payment.objects.count() == 2
    assert record_for(None, "anon") is None


# --- keys -----------------------------------------------------------------------------------


@entries
def test_missing_key_runs_normally_when_optional(client: Client, entry: Entry) -> None:
    first, second = send(client, entry.url), send(client, entry.url)
    assert first.status_code == second.status_code == 201
    assert "Idempotent-Replayed" not in second
    assert Payment.objects.count() == 2


@entries
@override_settings(IDEMPOTENCY_REQUIRED=True)
def test_missing_key_is_refused_when_required(client: Client, entry: Entry) -> None:
    response = send(client, entry.url)
    assert response.status_code == 400
    assert problem(response)["type"].endswith("#idempotency-key-missing")
    assert Payment.objects.count() == 0


@pytest.mark.parametrize("url", ["/mixin/required/", "/decorator/required/"])
def test_views_can_require_a_key(client: Client, url: str) -> None:
    response = send(client, url)
    assert response.status_code == 400
    assert problem(response)["title"] == "Idempotency key missing"
    assert send(client, url, key="k").status_code == 201


MALFORMED = {
    "empty": "",
    "blank": "   ",
    "too-long": "k" * 256,
    "non-ascii": "clé-ü",
    "control": "abc\x01def",
    "space-inside": "abc def",
    "unterminated": '"abc',
    "bad-escape": '"a\\bc"',
    "two-strings": '"a" "b"',
    "comma-list": "abc, def",
    "two-header-lines": '"abc", "abc"',
    "empty-quoted": '""',
}


@entries
@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_keys_are_refused(client: Client, entry: Entry, raw: str) -> None:
    response = send(client, entry.url, key=raw)
    assert response.status_code == 400
    body = problem(response)
    assert body["type"].endswith("#idempotency-key-invalid")
    if raw.strip():
        assert raw.strip() not in response.content.decode()
    assert Payment.objects.count() == 0


@entries
@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
def test_body_too_large_to_fingerprint_is_refused(client: Client, entry: Entry) -> None:
    response = send(client, entry.url, {"amount": 10, "memo": "x" * 2000}, key="huge")
    assert response.status_code == 413
    assert problem(response)["type"].endswith("#idempotency-request-too-large")
    assert Payment.objects.count() == 0


@entries
def test_longest_allowed_key_works(client: Client, entry: Entry) -> None:
    assert send(client, entry.url, key="k" * 255).status_code == 201


@entries
@override_settings(IDEMPOTENCY_STRICT_KEY_FORMAT=True)
def test_strict_mode_accepts_only_quoted_keys(client: Client, entry: Entry) -> None:
    assert send(client, entry.url, key="bare").status_code == 400
    assert send(client, entry.url, key='"quoted"').status_code == 201


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.get], ids=str)
def test_safe_methods_ignore_the_header(client: Client, user: Any, entry: Entry) -> None:
    response = client.get(entry.url, HTTP_IDEMPOTENCY_KEY="not valid, at all")
    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response
    assert record_for(user, "not valid, at all") is None


# --- failures release the key ---------------------------------------------------------------


@entries
@pytest.mark.parametrize("step", ["early-500", "early-503", "early-409", "early-429", "early-401"])
def test_transient_answers_release_the_key(client: Client, entry: Entry, step: str) -> None:
    views.SCRIPT.append(step)
    failed = send(client, entry.url, key="retry-me")
    assert failed.status_code == int(step.removeprefix("early-"))
    retry = send(client, entry.url, key="retry-me")
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry
    assert Payment.objects.count() == 1


@entries
def test_raised_exception_releases_the_key(client: Client, entry: Entry) -> None:
    views.SCRIPT.append("early-raise")
    with pytest.raises(RuntimeError):
        send(client, entry.url, key="retry-me")
    retry = send(client, entry.url, key="retry-me")
    assert retry.status_code == 201
    assert Payment.objects.count() == 1


@entries
def test_not_found_raised_by_the_view_is_final_and_replayed(client: Client, entry: Entry) -> None:
    views.SCRIPT.append("early-http404")
    first = send(client, entry.url, key="missing-account")
    replay = send(client, entry.url, key="missing-account")
    assert first.status_code == replay.status_code == 404
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == first.content
    assert Payment.objects.count() == 0


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.sync], ids=str)
def test_stopped_worker_keeps_the_key_until_its_lease_ends(
    client: Client, entry: Entry, clock: list[timedelta]
) -> None:
    views.SCRIPT.append("worker-stopped")
    with pytest.raises(SystemExit):
        send(client, entry.url, key="interrupted")
    # The outcome is unknown: the key is neither released nor replayable...
    retry = send(client, entry.url, key="interrupted")
    assert retry.status_code == 409
    assert problem(retry)["type"].endswith("#idempotency-request-in-progress")
    # ...until the lease ends, when the next matching request takes it over and runs once.
    clock.append(timedelta(seconds=61))
    assert send(client, entry.url, key="interrupted").status_code == 201
    assert Payment.objects.count() == 1


@entries
def test_response_that_fails_to_render_settles_the_key_and_the_connection(
    user: Any, entry: Entry
) -> None:
    """The view returns a response that raises when rendered: Django answers 500, the view's
    writes roll back, the key is released, and the same connection serves the next request."""
    client = Client(raise_request_exception=False)
    client.force_login(user)
    views.SCRIPT.append("unrenderable")
    failed = send(client, entry.url, key="unrenderable")
    assert failed.status_code == 500
    assert not any(c.in_atomic_block for c in connections.all(initialized_only=True))
    assert record_for(user, "unrenderable") is None
    # An async view runs outside a transaction: its write stays, as for any exception it raises.
    assert Payment.objects.count() == (0 if entry.sync else 1)
    assert send(client, entry.url, key="next").status_code == 201
    retry = send(client, entry.url, key="unrenderable")
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry


@entries
@override_settings(IDEMPOTENCY_STORE_SERVER_ERRORS=True)
def test_server_errors_can_be_stored(client: Client, entry: Entry) -> None:
    views.SCRIPT.append("early-503")
    send(client, entry.url, key="k")
    replay = send(client, entry.url, key="k")
    assert replay.status_code == 503
    assert replay["Idempotent-Replayed"] == "true"


# Async views run outside the store's transaction (documented), so they are not listed here.
@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.sync], ids=str)
@pytest.mark.parametrize("step", ["raise", "500", "503"])
def test_failed_view_leaves_neither_row_nor_key(
    client: Client, user: Any, entry: Entry, step: str
) -> None:
    views.SCRIPT.append(step)
    if step == "raise":
        with pytest.raises(RuntimeError):
            send(client, entry.url, key="atomic")
    else:
        assert send(client, entry.url, key="atomic").status_code == int(step)
    assert Payment.objects.count() == 0
    assert record_for(user, "atomic") is None
    assert send(client, entry.url, key="atomic").status_code == 201
    assert Payment.objects.count() == 1


# --- expiry ---------------------------------------------------------------------------------


@entries
@override_settings(IDEMPOTENCY_TTL=4, IDEMPOTENCY_LEASE=2)
def test_request_that_outlives_its_ttl_still_replays(
    client: Client, entry: Entry, clock: list[timedelta]
) -> None:
    """TTL 4 s, an 8 s request: the result stays replayable one lease after it was stored."""
    views.HOOKS.append(lambda: clock.append(clock[-1] + timedelta(seconds=8)))
    first = send(client, entry.url, key="slow")
    views.HOOKS.clear()
    assert first.status_code == 201
    retry = send(client, entry.url, key="slow")
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    clock.append(clock[-1] + timedelta(seconds=2))  # one lease after completion: expired
    assert "Idempotent-Replayed" not in send(client, entry.url, key="slow")
    assert Payment.objects.count() == 2


@entries
@override_settings(IDEMPOTENCY_TTL=3600)
def test_expired_key_runs_anew(client: Client, entry: Entry, clock: list[timedelta]) -> None:
    send(client, entry.url, key="old")
    clock.append(timedelta(seconds=3599))
    assert send(client, entry.url, key="old")["Idempotent-Replayed"] == "true"
    clock.append(timedelta(seconds=3601))
    fresh = send(client, entry.url, key="old")
    assert fresh.status_code == 201
    assert "Idempotent-Replayed" not in fresh
    assert Payment.objects.count() == 2


# --- results that cannot be replayed -------------------------------------------------------


@entries
@pytest.mark.parametrize("step", ["stream", "big"])
def test_unstorable_result_passes_through_then_409(client: Client, entry: Entry, step: str) -> None:
    views.SCRIPT.append(step)
    first = send(client, entry.url, key="k")
    assert first.status_code == 201
    body = b"".join(first.streaming_content) if first.streaming else first.content
    assert body
    retry = send(client, entry.url, key="k")
    assert retry.status_code == 409
    assert problem(retry)["type"].endswith("#idempotency-result-unavailable")
    assert "Retry-After" not in retry
    assert Payment.objects.count() == 1


# --- the store is down ----------------------------------------------------------------------


@entries
def test_store_down_fails_closed(client: Client, entry: Entry, store_down: None) -> None:
    response = send(client, entry.url, key="k")
    assert response.status_code == 503
    assert problem(response)["type"].endswith("#idempotency-store-unavailable")
    assert int(response["Retry-After"]) >= 1
    assert Payment.objects.count() == 0


@entries
@override_settings(IDEMPOTENCY_FAIL_OPEN=True)
def test_store_down_fail_open_runs_the_view(
    client: Client, entry: Entry, store_down: None, caplog: pytest.LogCaptureFixture
) -> None:
    response = send(client, entry.url, key="k")
    assert response.status_code == 201
    assert Payment.objects.count() == 1
    assert "WITHOUT protection" in caplog.text


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.sync], ids=str)
def test_failing_on_commit_callback_keeps_the_committed_answer(
    client: Client, entry: Entry
) -> None:
    def explode() -> None:
        raise RuntimeError("notification service down")

    views.HOOKS.append(lambda: transaction.on_commit(explode))
    first = send(client, entry.url, key="notify")
    views.HOOKS.clear()
    assert first.status_code == 201
    retry = send(client, entry.url, key="notify")
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert Payment.objects.count() == 1


@contextlib.contextmanager
def _store_that_breaks_after_the_write() -> Iterator[None]:
    """The store fails for real between the view's write and the completion."""
    if TRANSACTIONAL:
        # The ORM store shares the view's connection: close the socket under Django's feet.
        alias = idempotency_settings.IDEMPOTENCY_DATABASE
        views.AFTER_WRITE.append(lambda: connections[alias].connection.close())
        yield
        return
    # The Redis stores talk to Redis through a proxy whose plug is pulled after the write.
    if settings.STORE_BACKEND == "redisstore":
        location = urlsplit(settings.IDEMPOTENCY_REDIS_URL)
        proxy = TcpProxy(location.hostname or "127.0.0.1", location.port or 6379)
        views.AFTER_WRITE.append(proxy.cut)
        url = f"redis://127.0.0.1:{proxy.port}{location.path}?socket_timeout=1"
        with override_settings(IDEMPOTENCY_REDIS_URL=url):
            yield
        return
    location = urlsplit(settings.CACHES[idempotency_settings.IDEMPOTENCY_CACHE_ALIAS]["LOCATION"])
    proxy = TcpProxy(location.hostname or "127.0.0.1", location.port or 6379)
    through_proxy = {
        **settings.CACHES[idempotency_settings.IDEMPOTENCY_CACHE_ALIAS],
        "LOCATION": f"redis://127.0.0.1:{proxy.port}{location.path}",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
    }
    views.AFTER_WRITE.append(proxy.cut)
    caches = {**settings.CACHES, "proxied": through_proxy}
    with override_settings(CACHES=caches, IDEMPOTENCY_CACHE_ALIAS="proxied"):
        yield


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.sync], ids=str)
def test_store_failing_after_the_view_succeeded(
    client: Client, entry: Entry, clock: list[timedelta], caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[str] = []

    def on_error(sender: Any, stage: str, **kwargs: Any) -> None:
        errors.append(stage)

    signals.store_error.connect(on_error)
    try:
        with _store_that_breaks_after_the_write():
            first = send(client, entry.url, key="fragile")
            views.AFTER_WRITE.clear()
            retry = send(client, entry.url, key="fragile")
    finally:
        signals.store_error.disconnect(on_error)
    assert errors[0] == "complete"
    assert "fragile" not in caplog.text
    if TRANSACTIONAL:
        # The payment shared the broken transaction: it is gone, the client is told to retry,
        # and the retry runs once.
        assert first.status_code == 503
        assert problem(first)["type"].endswith("#idempotency-store-unavailable")
        assert retry.status_code == 201
        assert Payment.objects.count() == 1
    else:
        # The payment is committed: the client gets it; the key stays in flight until its lease
        # ends (retries meanwhile get 409), because the store could not record the result.
        assert first.status_code == 201
        assert Payment.objects.count() == 1
        # The store is gone for the retry too: fail closed.
        assert retry.status_code == 503
