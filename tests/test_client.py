"""``django_idempotency.client`` against real servers: gunicorn behind a proxy that loses
answers, and scripted sockets for the statuses a healthy test project never sends.

Each client kind (requests, httpx sync, httpx async) runs every scenario, since the point of
one shared ``RetryPolicy`` is that they behave alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.authtoken.models import Token

from django_idempotency.client import (
    IdempotentResult,
    IdempotentSession,
    IdempotentTransport,
    RetryPolicy,
    _Attempts,
    idempotent_result,
    parse_retry_after,
)
from tests.http_faults import DroppingProxy, ScriptedServer, http_answer
from tests.testapp.models import Payment

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["requests", "httpx", "httpx-async"]
#: Quick retries, so that a test's time goes to the waits it measures.
FAST = RetryPolicy(backoff=0.05, max_backoff=0.2, deadline=20)
#: Upper bound for gunicorn to start answering.
START_TIMEOUT = 60.0
IN_PROGRESS = json.dumps(
    {"type": "https://example.test/problems/#idempotency-request-in-progress", "status": 409}
).encode()
UNAVAILABLE = json.dumps(
    {"type": "https://example.test/problems/#idempotency-result-unavailable", "status": 409}
).encode()
PROBLEM = "Content-Type: application/problem+json"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    result: IdempotentResult | None


def _result(response: Any) -> IdempotentResult | None:
    try:
        return idempotent_result(response)
    except LookupError:
        return None


def call(
    kind: str,
    method: str,
    url: str,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    key: str | None = None,
    policy: RetryPolicy = FAST,
    methods: tuple[str, ...] = ("POST", "PATCH"),
    timeout: float = 30.0,
) -> Reply:
    """One logical call through the client ``kind``; a fresh client each time."""
    if kind == "requests":
        with IdempotentSession(policy=policy, methods=methods) as session:
            response = session.request(
                method, url, json=body, headers=headers, idempotency_key=key, timeout=timeout
            )
            return Reply(
                response.status_code,
                {k.lower(): v for k, v in response.headers.items()},
                response.content,
                _result(response),
            )
    extensions = {} if key is None else {"idempotency_key": key}
    transport = IdempotentTransport(policy=policy, methods=methods)
    answer: httpx.Response
    if kind == "httpx":
        with httpx.Client(transport=transport, timeout=timeout) as client:
            answer = client.request(method, url, json=body, headers=headers, extensions=extensions)
    else:

        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
                return await client.request(
                    method, url, json=body, headers=headers, extensions=extensions
                )

        answer = asyncio.run(send())
    return Reply(
        answer.status_code,
        {k.lower(): v for k, v in answer.headers.items()},
        answer.content,
        _result(answer),
    )


TIMEOUTS = (requests.Timeout, httpx.TimeoutException)
CONNECTION_ERRORS = (requests.ConnectionError, httpx.ConnectError)


# --- the shared rules, without a network -------------------------------------------------------


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    now = datetime(2025, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    later = email.utils.format_datetime(now + timedelta(seconds=7), usegmt=True)
    earlier = email.utils.format_datetime(now - timedelta(seconds=7), usegmt=True)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(later, now=now) == 7.0
    assert parse_retry_after(earlier, now=now) == 0.0
    assert parse_retry_after("Thu, 01 May 2025 12:00:05 -0000", now=now) == 5.0
    for unusable in (None, "", "-1", "1.5", "soon", "Fri, 99 Nop 2025"):
        assert parse_retry_after(unusable, now=now) is None


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(backoff=0.5, max_backoff=3.0)
    assert [policy.backoff_delay(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [
        0.5,
        1.0,
        2.0,
        3.0,
        3.0,
    ]
    assert policy.backoff_delay(4, rng=lambda: 0.25) == 0.75
    assert policy.backoff_delay(1, rng=lambda: 0.0) == 0.0


def test_attempts_are_bounded_by_count_deadline_and_retry_after() -> None:
    now = [0.0]
    attempts = _Attempts(
        RetryPolicy(max_attempts=3, backoff=1, deadline=10, max_retry_after=5),
        clock=lambda: now[0],
        rng=lambda: 1.0,
    )
    attempts.begin()
    assert attempts.wait(None) == 1.0
    assert attempts.wait(4) == 4.0  # Retry-After is a floor under the backoff
    assert attempts.wait(6) is None  # longer than max_retry_after: the caller gets the answer
    assert attempts.timeout(30) == 10
    now[0] = 8.5
    assert attempts.timeout(30) == 1.5  # an attempt's timeout ends at the deadline
    assert attempts.timeout(1) == 1
    assert attempts.wait(2) is None  # would sleep past the deadline
    now[0] = 1.0
    attempts.begin()
    attempts.begin()
    assert attempts.wait(None) is None  # three attempts made


@pytest.mark.parametrize("status", [400, 422])
def test_final_answers_cannot_be_made_retryable(status: int) -> None:
    with pytest.raises(ValueError, match="never retried"):
        RetryPolicy(retry_statuses=frozenset({503, status}))


def test_only_an_in_progress_409_is_retried() -> None:
    policy = RetryPolicy()
    assert policy.should_retry(409, "application/problem+json", lambda: IN_PROGRESS)
    assert not policy.should_retry(409, "application/problem+json", lambda: UNAVAILABLE)
    assert not policy.should_retry(409, "application/json", lambda: IN_PROGRESS)
    assert not policy.should_retry(409, "application/problem+json", lambda: b"not json")
    assert policy.should_retry(503, "", lambda: b"")
    assert not policy.should_retry(422, "", lambda: b"")


# --- scripted servers ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_503_with_retry_after_waits_at_least_that_long(kind: str) -> None:
    with ScriptedServer(
        http_answer(503, "Retry-After: 1", PROBLEM, body=b"{}"),
        http_answer(201, "Content-Type: application/json", body=b'{"id": 1}'),
    ) as server:
        reply = call(kind, "POST", server.url, body={"amount": 1})
    assert reply.status == 201
    assert reply.result is not None
    assert reply.result.attempts == 2
    assert not reply.result.replayed
    first, second = server.seen
    assert second.at - first.at >= 1.0
    assert first.header("Idempotency-Key") == second.header("Idempotency-Key")
    assert first.header("Idempotency-Key") == f'"{reply.result.key}"'
    uuid.UUID(reply.result.key, version=4)


@pytest.mark.parametrize("kind", KINDS)
def test_409_in_progress_is_retried_and_other_409s_are_final(kind: str) -> None:
    with ScriptedServer(
        http_answer(409, PROBLEM, "Retry-After: 0", body=IN_PROGRESS),
        http_answer(409, PROBLEM, body=UNAVAILABLE),
    ) as server:
        reply = call(kind, "POST", server.url, body={"amount": 1})
    assert reply.status == 409
    assert reply.body == UNAVAILABLE
    assert reply.result is not None
    assert reply.result.attempts == 2
    assert len(server.seen) == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [400, 422])
def test_a_final_answer_is_returned_at_once(kind: str, status: int) -> None:
    with ScriptedServer(http_answer(status, PROBLEM, body=b"{}")) as server:
        reply = call(kind, "POST", server.url, body={"amount": 1})
    assert reply.status == status
    assert reply.result is not None
    assert reply.result.attempts == 1
    assert len(server.seen) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_the_deadline_ends_retries_of_a_server_that_keeps_refusing(kind: str) -> None:
    policy = RetryPolicy(max_attempts=10, backoff=0.05, deadline=2.5)
    with ScriptedServer(http_answer(503, "Retry-After: 1", body=b"busy")) as server:
        started = time.monotonic()
        reply = call(kind, "POST", server.url, body={"amount": 1}, policy=policy)
        elapsed = time.monotonic() - started
    assert reply.status == 503
    assert reply.result is not None
    # At 0 s, 1 s and 2 s; a fourth attempt at 3 s would start past the deadline.
    assert reply.result.attempts == len(server.seen) == 3
    assert 2.0 <= elapsed < 2.5


@pytest.mark.parametrize("kind", KINDS)
def test_the_deadline_cuts_an_attempt_that_gets_no_answer(kind: str) -> None:
    policy = RetryPolicy(max_attempts=5, deadline=1.5)
    with ScriptedServer() as server:
        started = time.monotonic()
        with pytest.raises(TIMEOUTS):
            call(kind, "POST", server.url, body={"amount": 1}, policy=policy, timeout=30)
        elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 2.5
    assert len(server.seen) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_connection_errors_are_retried_then_raised(kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    policy = RetryPolicy(max_attempts=3, backoff=0.05, deadline=10)
    started = time.monotonic()
    with pytest.raises(CONNECTION_ERRORS):
        call(kind, "POST", f"http://127.0.0.1:{closed}/", body={"a": 1}, policy=policy)
    assert time.monotonic() - started < 5


def test_requests_retries_connection_errors_with_the_same_prepared_body() -> None:
    slept: list[float] = []
    session = IdempotentSession(
        policy=RetryPolicy(max_attempts=4, backoff=0.01), sleep=slept.append
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with session, pytest.raises(requests.ConnectionError):
        session.post(f"http://127.0.0.1:{closed}/", json={"a": 1})
    assert len(slept) == 3  # four attempts, three waits


@pytest.mark.parametrize("kind", KINDS)
def test_keys_go_only_where_asked(kind: str) -> None:
    ok = http_answer(201, body=b"{}")
    with ScriptedServer(ok) as server:
        get = call(kind, "GET", server.url)
        put = call(kind, "PUT", server.url, body={"a": 1})
        asked = call(kind, "PUT", server.url, body={"a": 1}, methods=("PUT",))
        own = call(kind, "DELETE", server.url, key="order-42-cancel")
    assert get.result is None
    assert put.result is None
    assert asked.result is not None
    assert own.result is not None
    assert own.result.key == "order-42-cancel"
    keys = [seen.header("Idempotency-Key") for seen in server.seen]
    assert keys[:2] == [None, None]
    assert keys[2] is not None
    assert keys[3] == '"order-42-cancel"'


def test_a_streamed_body_cannot_be_resent() -> None:
    with IdempotentSession() as session, pytest.raises(TypeError, match="resends its body"):
        session.post("http://127.0.0.1:9/", data=iter([b"a", b"b"]))


def test_an_invalid_key_is_refused_before_sending() -> None:
    with IdempotentSession() as session, pytest.raises(ValueError, match="printable ASCII"):
        session.post("http://127.0.0.1:9/", json={}, idempotency_key="naïve")


def test_a_response_from_elsewhere_has_no_result() -> None:
    with pytest.raises(LookupError):
        idempotent_result(requests.Response())
    with pytest.raises(LookupError):
        idempotent_result(httpx.Response(200))


# --- gunicorn behind a proxy that loses answers -------------------------------------------------


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    port: int
    log: Path


@pytest.fixture(scope="module")
def gunicorn(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """Two sync workers over the test project and this run's test database.

    The listening socket is made here and handed over (``fd://``), so the port is known before
    gunicorn starts and no other process can take it in between.
    """
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IDEMPOTENCY_SERVE_DB_NAME": str(connection.settings_dict["NAME"]),
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        f"--bind=fd://{listener.fileno()}",
        "--workers=2",
        "--worker-class=sync",
        "--timeout=30",
        "--graceful-timeout=5",
        "tests.wsgi:application",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603 - our interpreter, no shell
            command, cwd=ROOT, env=env, stdout=output, stderr=output, pass_fds=[listener.fileno()]
        )
    listener.close()
    server = Gunicorn(process, port, log)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _wait_until_serving(server: Gunicorn) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"gunicorn exited:\n{server.log.read_text(errors='replace')[-4000:]}")
        try:
            # The socket listens already: this waits in its backlog until a worker is up.
            response = requests.get(f"http://127.0.0.1:{server.port}/mixin/payments/", timeout=5)
        except requests.RequestException:
            time.sleep(0.2)
            continue
        if response.status_code == 200:
            return
        pytest.fail(f"gunicorn answered {response.status_code}: {response.text[:500]}")
    pytest.fail(f"gunicorn did not answer within {START_TIMEOUT} s")


@pytest.fixture
def token() -> str:
    user = get_user_model().objects.create_user(username=f"client-{uuid.uuid4().hex[:8]}")
    return str(Token.objects.create(user=user).key)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", KINDS)
def test_two_lost_answers_end_in_one_payment_and_a_replayed_201(
    kind: str, gunicorn: Gunicorn, token: str
) -> None:
    with DroppingProxy(gunicorn.port, drop=2) as proxy:
        reply = call(
            kind,
            "POST",
            f"{proxy.url}/mixin/payments/",
            body={"amount": 4200},
            headers={"Authorization": f"Token {token}"},
        )
    assert reply.status == 201, reply.body
    assert reply.result is not None
    assert (reply.result.attempts, reply.result.replayed) == (3, True)
    assert reply.headers["idempotent-replayed"] == "true"
    assert (proxy.dropped, proxy.forwarded) == (2, 1)
    # The server ran the payment once; every attempt carried the one key.
    payment = Payment.objects.get()
    assert json.loads(reply.body) == {"id": payment.pk, "amount": 4200}
    assert reply.headers["location"] == f"/payments/{payment.pk}/"
    assert {seen.header("Idempotency-Key") for seen in proxy.seen} == {f'"{reply.result.key}"'}
    assert len(proxy.seen) == 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", KINDS)
def test_a_reused_key_gets_its_422_at_once(kind: str, gunicorn: Gunicorn, token: str) -> None:
    auth = {"Authorization": f"Token {token}"}
    key = str(uuid.uuid4())
    url = f"http://127.0.0.1:{gunicorn.port}/mixin/payments/"
    assert call(kind, "POST", url, body={"amount": 1}, headers=auth, key=key).status == 201
    with DroppingProxy(gunicorn.port, drop=0) as proxy:
        reply = call(
            kind, "POST", f"{proxy.url}/mixin/payments/", body={"amount": 2}, headers=auth, key=key
        )
    assert reply.status == 422
    assert json.loads(reply.body)["type"].endswith("#idempotency-key-reused")
    assert reply.result is not None
    assert reply.result.attempts == 1
    assert len(proxy.seen) == 1
    assert Payment.objects.count() == 1


@pytest.mark.parametrize(
    "options",
    [{"max_attempts": 0}, {"backoff": -1}, {"max_retry_after": -1}, {"deadline": 0}],
    ids=str,
)
def test_a_policy_out_of_range_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)


def test_without_a_deadline_only_the_attempts_bound_the_call() -> None:
    attempts = _Attempts(RetryPolicy(deadline=None, max_attempts=2), rng=lambda: 0.5)
    attempts.begin()
    assert attempts.remaining() is None
    assert attempts.timeout(None) is None
    assert attempts.timeout(3) == 3
    assert attempts.wait(100) is None  # above max_retry_after
    assert attempts.wait(None) == 0.25


def test_requests_caps_a_connect_read_timeout_pair_and_sends_patch_put_delete() -> None:
    ok = http_answer(201, body=b"{}")
    policy = RetryPolicy(deadline=5)
    with ScriptedServer(ok) as server, IdempotentSession(policy=policy) as session:
        patched = session.patch(server.url, json={"a": 1}, timeout=(60, 60))
        put = session.put(server.url, data=b"x", idempotency_key="put-1")
        deleted = session.delete(server.url, idempotency_key="delete-1")
    assert idempotent_result(patched).attempts == 1
    assert idempotent_result(put).key == "put-1"
    assert idempotent_result(deleted).key == "delete-1"
    assert [seen.method for seen in server.seen] == ["PATCH", "PUT", "DELETE"]


def test_a_tls_error_is_not_retried() -> None:
    """A plain-HTTP server spoken to over TLS: the handshake fails the same way every time."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_in_plain_http() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                connection.sendall(http_answer(201))

    thread = threading.Thread(target=answer_in_plain_http, daemon=True)
    thread.start()
    slept: list[float] = []
    try:
        with (
            IdempotentSession(sleep=slept.append) as session,
            pytest.raises(requests.exceptions.SSLError),
        ):
            session.post(f"https://127.0.0.1:{port}/", json={}, timeout=10)
    finally:
        listener.close()
        thread.join(10)
    assert slept == []


def test_the_transport_wraps_the_given_transport_and_refuses_the_other_kind() -> None:
    ok = http_answer(201, body=b"{}")
    with ScriptedServer(ok) as server:
        sync = IdempotentTransport(httpx.HTTPTransport())
        with httpx.Client(transport=sync) as client:
            assert idempotent_result(client.post(server.url, json={})).attempts == 1

        async def misuse() -> None:
            async with httpx.AsyncClient(transport=sync) as client:
                await client.post(server.url, json={})

        with pytest.raises(TypeError, match="is sync"):
            asyncio.run(misuse())

        asynchronous = IdempotentTransport(httpx.AsyncHTTPTransport())
        with (
            httpx.Client(transport=asynchronous) as client,
            pytest.raises(TypeError, match="is async"),
        ):
            client.post(server.url, json={})


def test_unknown_names_of_the_client_module_raise_attribute_error() -> None:
    from django_idempotency import client

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        client.Nope  # noqa: B018
