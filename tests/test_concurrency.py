"""Concurrency proofs against the configured backend (issue 2).

Every test here uses real threads, each with its own database connection, or real server
processes, and counts ``Payment`` rows: the business side effect, not the store's bookkeeping.
The rules every storm is held to:

* exactly one request runs the view and answers a fresh 201;
* every other request answers 409 ``idempotency-request-in-progress`` with ``Retry-After``, or
  replays that 201 byte for byte with ``Idempotent-Replayed: true``;
* on SQLite only, whose single writer may surface lock contention, 503
  ``idempotency-store-unavailable`` with ``Retry-After`` is allowed too;
* never a 500, never an exception.

Run them on each backend: ``IDEMPOTENCY_TEST_DB=sqlite|postgres|mariadb`` and
``IDEMPOTENCY_TEST_STORE=db|redis``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import connection, connections
from django.db.models.signals import post_save
from django.test import Client, RequestFactory, override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from django_idempotency import core
from django_idempotency.fingerprint import request_fingerprint
from django_idempotency.heartbeat import heartbeat
from django_idempotency.keys import hash_key
from django_idempotency.storage import get_storage
from tests.testapp import views
from tests.testapp.models import Payment

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"amount": 4200}).encode()
PROBLEM_TYPE = "application/problem+json"
IN_PROGRESS = "idempotency-request-in-progress"
UNAVAILABLE = "idempotency-store-unavailable"
#: Upper bound for any thread, request or process wait; a hang fails the test instead.
TIMEOUT = 60.0
#: Long enough for every request of a storm to arrive while the first one is still running.
OVERLAP_DELAY = 0.4

# The /mw/ views have neither mixin nor decorator: IdempotencyMiddleware protects them.
DRF_ENTRY_POINTS = ["/mixin/payments/", "/decorator/payments/", "/mw/apiview/payments/"]
ALL_ENTRY_POINTS = [
    "/mixin/payments/",
    "/viewset/payments/",
    "/decorator/payments/",
    "/actions/pay/",
    "/django/payments/",
    "/async/payments/",
    "/mw/django/payments/",
    "/mw/async/payments/",
    "/mw/apiview/payments/",
    "/mw/viewset/payments/refund/",
]


# --- outcomes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    label: str = ""

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed") == "true"

    @property
    def fresh(self) -> bool:
        return self.status == 201 and not self.replayed

    @property
    def problem(self) -> str | None:
        if self.headers.get("content-type", "").split(";")[0] != PROBLEM_TYPE:
            return None
        return str(json.loads(self.body)["type"]).rsplit("#", 1)[-1].rsplit("/", 1)[-1]

    def payment_id(self) -> int:
        return int(json.loads(self.body)["id"])

    def describe(self) -> str:
        if self.fresh:
            return "201 fresh"
        if self.replayed:
            return f"{self.status} replayed"
        return f"{self.status} {self.problem or self.body[:80]!r}"


def summary(outcomes: list[Outcome]) -> str:
    return str(dict(collections.Counter(o.describe() for o in outcomes)))


def sqlite_may_refuse() -> bool:
    """SQLite's single writer may surface lock contention as 503; no other backend may."""
    return connection.vendor == "sqlite"


def check_storm(outcomes: list[Outcome]) -> Outcome:
    """Hold one key's storm to the rules in the module docstring; return the one fresh 201."""
    fresh = [o for o in outcomes if o.fresh]
    assert len(fresh) == 1, f"expected exactly one fresh 201, got {summary(outcomes)}"
    first = fresh[0]
    assert first.headers.get("location", "").startswith("/payments/")
    for outcome in outcomes:
        if outcome is first:
            continue
        if outcome.status == 201:
            assert outcome.replayed, summary(outcomes)
            assert outcome.body == first.body
        elif outcome.status == 409:
            assert outcome.problem == IN_PROGRESS, outcome.body
            assert int(outcome.headers["retry-after"]) >= 1
        elif outcome.status == 503 and sqlite_may_refuse():
            assert outcome.problem == UNAVAILABLE, outcome.body
            assert int(outcome.headers["retry-after"]) >= 1
        else:
            pytest.fail(f"{outcome.label}: unexpected {outcome.describe()} in {summary(outcomes)}")
    return first


# --- requests ---------------------------------------------------------------------------------


def _from_client(response: Any, label: str) -> Outcome:
    headers = {name.lower(): value for name, value in response.headers.items()}
    return Outcome(response.status_code, headers, response.content, label)


def client_post(
    path: str, key: str, token: str | None, label: str = "", *, raise_errors: bool = True
) -> Outcome:
    """POST the payment with a fresh ``Client``; on a new thread it opens its own connection.

    ``raise_errors=False`` makes a view's exception a 500 outcome. Django's test client learns of
    exceptions through a process-wide signal, so a client whose request is still running when
    another thread's request fails would re-raise that other request's exception as its own.
    """
    headers = {"Idempotency-Key": key}
    if token is not None:
        headers["Authorization"] = f"Token {token}"
    client = Client(headers=headers, raise_request_exception=raise_errors)
    response = client.post(path, data=BODY, content_type="application/json")
    return _from_client(response, label or path)


# Requests to the test servers must never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_post(url: str, key: str, token: str, label: str = "") -> Outcome:
    request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
        url,
        data=BODY,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "Authorization": f"Token {token}",
        },
    )
    try:
        with _OPENER.open(request, timeout=TIMEOUT) as response:
            headers = {name.lower(): value for name, value in response.headers.items()}
            return Outcome(response.status, headers, response.read(), label or url)
    except urllib.error.HTTPError as error:
        headers = {name.lower(): value for name, value in error.headers.items()}
        return Outcome(error.code, headers, error.read(), label or url)


def run_together(calls: list[Callable[[], Outcome]]) -> list[Outcome]:
    """Run each call on its own thread, all released at once by a barrier.

    Any exception on a thread fails the test with its traceback. Each thread closes its own
    database connections, so none is left open when the test database is flushed or dropped.
    """
    barrier = threading.Barrier(len(calls), timeout=TIMEOUT)
    results: list[Outcome | None] = [None] * len(calls)
    errors: list[str] = []

    def work(index: int, call: Callable[[], Outcome]) -> None:
        try:
            barrier.wait()
            results[index] = call()
        except BaseException:
            errors.append(traceback.format_exc())
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=work, args=(i, call), daemon=True) for i, call in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "requests still running after the timeout"
    assert not errors, f"{len(errors)} request(s) raised; first:\n{errors[0]}"
    outcomes = [r for r in results if r is not None]
    assert len(outcomes) == len(calls)
    return outcomes


def in_thread(call: Callable[[], Outcome]) -> Outcome:
    """One request on another thread, with its own connection, waited for."""
    return run_together([call])[0]


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Principal:
    user: AbstractBaseUser
    token: str
    scope: str = field(init=False)

    def __post_init__(self) -> None:
        self.scope = f"user:{self.user.pk}"


@pytest.fixture
def principal() -> Principal:
    user = get_user_model().objects.create_user(username=f"payer-{uuid.uuid4().hex[:8]}")
    token = Token.objects.create(user=user)
    return Principal(user, token.key)


class Clock:
    """Replaces the engine's clock (``django_idempotency.core.now``) for every thread."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return timezone.now() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(core, "now", fake)
    return fake


class Executions:
    """Counts entries into the payment view, committed or not (a ``views.HOOKS`` hook).

    Payment rows count what committed; this counts what ran, so a view that ran twice and had
    one run rolled back by the store's fencing still fails a storm test.
    """

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


@pytest.fixture
def executions() -> Executions:
    counter = Executions()
    views.HOOKS.append(counter)
    return counter


def new_key() -> str:
    return str(uuid.uuid4())


def view_is_atomic(path: str) -> bool:
    """Whether the view at ``path`` runs inside a transaction that a lost claim rolls back.

    Every store runs a synchronous view in a transaction under ``IDEMPOTENCY_ATOMIC`` (the ORM
    store completes inside it, the others right after its commit). An async view cannot share a
    synchronous transaction (see ``decorators.py``), so its writes stay whatever happens.
    """
    return path not in ("/async/payments/", "/mw/async/payments/")


@pytest.fixture
def frozen_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stale worker of these drills is frozen (a GC pause, a stopped VM): its heartbeat
    does not beat, which is the only way a live request's lease can lapse."""
    monkeypatch.setattr(heartbeat, "track", lambda flight: None)


def payment_ids() -> list[int]:
    """Every committed payment; the test database starts each test empty."""
    return sorted(Payment.objects.values_list("pk", flat=True))


# --- thread storms ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_ENTRY_POINTS)
@pytest.mark.parametrize("delay", [OVERLAP_DELAY, 0.0], ids=["overlapping", "fast-view"])
def test_storm_of_one_key_runs_the_view_once(
    path: str, delay: float, principal: Principal, executions: Executions
) -> None:
    """50 requests, one key. A slow view makes the storm meet the claim in flight (409s); a fast
    one makes claims collide on the INSERT and meet the completed record (replays)."""
    views.DELAY = delay
    key = new_key()
    outcomes = run_together(
        [partial(client_post, path, key, principal.token, f"#{i}") for i in range(50)]
    )

    first = check_storm(outcomes)
    assert executions.count == 1
    assert Payment.objects.count() == 1
    assert Payment.objects.get().pk == first.payment_id()
    # Whatever the storm saw, the result was stored: a later retry replays it.
    views.DELAY = 0.0
    again = client_post(path, key, principal.token)
    assert (again.status, again.replayed, again.body) == (201, True, first.body)
    assert executions.count == 1
    assert Payment.objects.count() == 1


@pytest.mark.parametrize("path", DRF_ENTRY_POINTS)
@override_settings(IDEMPOTENCY_WAIT=20)
def test_waiting_storm_replays_the_one_execution(
    path: str, principal: Principal, executions: Executions
) -> None:
    """With a wait longer than the view, duplicates poll the record and replay, none answers 409."""
    views.DELAY = OVERLAP_DELAY
    key = new_key()
    outcomes = run_together(
        [partial(client_post, path, key, principal.token, f"#{i}") for i in range(50)]
    )

    first = check_storm(outcomes)
    assert not [o for o in outcomes if o.status == 409], summary(outcomes)
    assert executions.count == 1
    assert payment_ids() == [first.payment_id()]


def test_storm_of_many_keys_runs_each_view_once(
    principal: Principal, executions: Executions
) -> None:
    """Ten keys, one per entry point, five requests each, interleaved and released at once.

    50 threads, each with its own connection, stay clear of PostgreSQL's default
    max_connections (100) even when another test run shares the server.
    """
    views.DELAY = OVERLAP_DELAY
    keys = {path: new_key() for path in ALL_ENTRY_POINTS}
    calls: list[Callable[[], Outcome]] = []
    for _round in range(5):
        for path, key in keys.items():
            calls.append(partial(client_post, path, key, principal.token, path))
    outcomes = run_together(calls)

    fresh_ids = set()
    for path in ALL_ENTRY_POINTS:
        first = check_storm([o for o in outcomes if o.label == path])
        fresh_ids.add(first.payment_id())
    assert len(fresh_ids) == len(ALL_ENTRY_POINTS)
    assert executions.count == len(ALL_ENTRY_POINTS)
    assert set(Payment.objects.values_list("pk", flat=True)) == fresh_ids


# --- across server processes ------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_servers(
    count: int, log_dir: Path, *, delay: float, write_delay: float = 0, lease: int | None = None
) -> list[Server]:
    """Start ``count`` ``tests.serve`` processes on the test database; the caller stops them."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IDEMPOTENCY_SERVE_DB_NAME": str(connection.settings_dict["NAME"]),
        "IDEMPOTENCY_SERVE_DELAY": str(delay),
        "IDEMPOTENCY_SERVE_WRITE_DELAY": str(write_delay),
        "IDEMPOTENCY_SERVE_LEASE": str(lease or ""),
    }
    started: list[tuple[subprocess.Popen[str], Path]] = []
    servers: list[Server] = []
    try:
        for i in range(count):
            log = log_dir / f"server-{i}.log"
            with log.open("w") as stderr:
                process = subprocess.Popen(  # noqa: S603 - our own module, no shell
                    [sys.executable, "-m", "tests.serve"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            started.append((process, log))
        deadline = time.monotonic() + TIMEOUT
        for process, log in started:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            line = process.stdout.readline() if ready else ""
            assert line.startswith("PORT "), f"server did not start:\n{log.read_text()}"
            servers.append(Server(process, int(line.split()[1]), log))
    except BaseException:
        stop_servers([p for p, _ in started])
        raise
    return servers


def stop_servers(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait(timeout=TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Server]]:
    """Three server processes; parametrize indirectly with the view's delay."""
    running = start_servers(3, tmp_path, delay=getattr(request, "param", OVERLAP_DELAY))
    try:
        yield running
    finally:
        stop_servers([s.process for s in running])


@pytest.mark.parametrize("path", DRF_ENTRY_POINTS)
@pytest.mark.parametrize(
    "servers", [OVERLAP_DELAY, 0.0], ids=["overlapping", "fast-view"], indirect=True
)
def test_storm_across_three_server_processes_runs_the_view_once(
    path: str, principal: Principal, servers: list[Server]
) -> None:
    key = new_key()
    calls: list[Callable[[], Outcome]] = [
        partial(http_post, servers[i % 3].url + path, key, principal.token, f"#{i}")
        for i in range(50)
    ]
    outcomes = run_together(calls)

    logs = "\n".join(s.stderr_tail() for s in servers)
    assert "Traceback" not in logs, logs
    try:
        first = check_storm(outcomes)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- server logs ---\n{logs}") from exc
    assert payment_ids() == [first.payment_id()]
    again = http_post(servers[1].url + path, key, principal.token)
    assert (again.status, again.replayed, again.body) == (201, True, first.body)
    assert Payment.objects.count() == 1


def test_key_of_a_killed_server_is_reclaimed_after_its_lease(
    principal: Principal, clock: Clock, tmp_path: Path
) -> None:
    """A worker killed mid-request leaves its claim; the lease, not the worker, frees the key."""
    path = "/mixin/payments/"
    key = new_key()
    (server,) = start_servers(1, tmp_path, delay=TIMEOUT)  # the view outlives the worker
    storage = get_storage()
    key_hash = hash_key(principal.scope, key)
    doomed = threading.Thread(
        target=lambda: _swallow(lambda: http_post(server.url + path, key, principal.token)),
        daemon=True,
    )
    try:
        doomed.start()
        deadline = time.monotonic() + TIMEOUT
        while storage.get(principal.scope, key_hash) is None:
            assert time.monotonic() < deadline, "the server never claimed the key"
            time.sleep(0.02)
        server.process.kill()
        server.process.wait(timeout=TIMEOUT)
    finally:
        stop_servers([server.process])
        doomed.join(TIMEOUT)
    assert not doomed.is_alive()

    before = client_post(path, key, principal.token)
    assert before.status == 409, before.describe()
    assert before.problem == IN_PROGRESS
    assert Payment.objects.count() == 0

    clock.advance(61)  # the server claimed with the default 60 s lease
    after = client_post(path, key, principal.token)
    assert after.fresh, after.describe()
    assert payment_ids() == [after.payment_id()]


def _wait_for_claim(principal: Principal, key: str) -> None:
    storage = get_storage()
    key_hash = hash_key(principal.scope, key)
    deadline = time.monotonic() + TIMEOUT
    while storage.get(principal.scope, key_hash) is None:
        assert time.monotonic() < deadline, "the server never claimed the key"
        time.sleep(0.02)


def test_slow_owner_keeps_its_claim_while_its_view_runs(
    principal: Principal, tmp_path: Path
) -> None:
    """Lease 1 s, view 3 s: the heartbeat renews the claim, so a retry long past the first lease
    waits (409) instead of taking over, then replays the one execution."""
    path = "/mixin/payments/"
    key = new_key()
    (server,) = start_servers(1, tmp_path, delay=3.0, lease=1)
    first: list[Outcome] = []
    owner = threading.Thread(
        target=lambda: first.append(http_post(server.url + path, key, principal.token, "owner"))
    )
    try:
        owner.start()
        _wait_for_claim(principal, key)
        time.sleep(1.8)  # almost two leases: the claim lives only if it was renewed
        during = http_post(server.url + path, key, principal.token, "retry")
        owner.join(TIMEOUT)
        after = http_post(server.url + path, key, principal.token, "after")
    finally:
        stop_servers([server.process])
        owner.join(TIMEOUT)
    assert "Traceback" not in server.stderr_tail(), server.stderr_tail()
    assert during.status == 409, during.describe()
    assert during.problem == IN_PROGRESS
    assert first and first[0].fresh, first
    assert (after.status, after.replayed, after.body) == (201, True, first[0].body)
    assert payment_ids() == [first[0].payment_id()]


def test_worker_killed_after_its_write_leaves_no_payment_and_the_retry_runs_once(
    principal: Principal, tmp_path: Path
) -> None:
    """SIGKILL after the view wrote its payment: the write never commits (the view runs in a
    transaction on every store), the claim expires one lease after its last renewal, and the
    retry that takes over pays once."""
    path = "/mixin/payments/"
    key = new_key()
    (server,) = start_servers(1, tmp_path, delay=0, write_delay=TIMEOUT, lease=1)
    doomed = threading.Thread(
        target=lambda: _swallow(lambda: http_post(server.url + path, key, principal.token)),
        daemon=True,
    )
    storage = get_storage()
    key_hash = hash_key(principal.scope, key)
    try:
        doomed.start()
        _wait_for_claim(principal, key)
        time.sleep(1.5)  # the view has written and sleeps; the heartbeat renews meanwhile
        record = storage.get(principal.scope, key_hash)
        assert record is not None
        if not (storage.transactional and connection.vendor == "sqlite"):
            assert record.lease_expires_at > core.now(), "the lease was not renewed"
        # On SQLite the ORM store's renewal waits for the write lock that the view holds until
        # it commits (docs/stores.md): the lease lapses, and the takeover waits for the lock.
        server.process.kill()
        server.process.wait(timeout=TIMEOUT)
    finally:
        stop_servers([server.process])
        doomed.join(TIMEOUT)
    outcomes = [client_post(path, key, principal.token, "retry")]
    deadline = time.monotonic() + 5
    while outcomes[-1].status == 409 and time.monotonic() < deadline:
        time.sleep(0.1)
        outcomes.append(client_post(path, key, principal.token, "retry"))
    assert all(o.problem == IN_PROGRESS for o in outcomes[:-1]), summary(outcomes)
    assert outcomes[-1].fresh, summary(outcomes)
    assert payment_ids() == [outcomes[-1].payment_id()]


def _swallow(call: Callable[[], object]) -> None:
    # The killed server's own client sees its connection reset; that is the point.
    with contextlib.suppress(OSError):
        call()


# --- leases and fencing -----------------------------------------------------------------------


def _orphan_claim(principal: Principal, path: str, key: str, lease: timedelta) -> None:
    """Claim ``key`` as a worker that then died: in flight, never completed nor released."""
    request = RequestFactory().post(path, data=BODY, content_type="application/json")
    claim = get_storage().claim(
        principal.scope,
        hash_key(principal.scope, key),
        request_fingerprint(request),
        now=core.now(),
        lease=lease,
        ttl=timedelta(days=1),
    )
    assert claim.won


@pytest.mark.parametrize("path", DRF_ENTRY_POINTS)
def test_orphaned_claim_is_reclaimable_after_the_lease_and_not_before(
    path: str, principal: Principal, clock: Clock
) -> None:
    key = new_key()
    _orphan_claim(principal, path, key, lease=timedelta(seconds=30))

    clock.advance(25)
    before = in_thread(lambda: client_post(path, key, principal.token))
    assert before.status == 409, before.describe()
    assert before.problem == IN_PROGRESS
    assert int(before.headers["retry-after"]) >= 1
    assert Payment.objects.count() == 0

    clock.advance(6)
    after = in_thread(lambda: client_post(path, key, principal.token))
    assert after.fresh, after.describe()
    assert payment_ids() == [after.payment_id()]
    replay = client_post(path, key, principal.token)
    assert (replay.status, replay.replayed, replay.body) == (201, True, after.body)


@pytest.mark.parametrize("path", DRF_ENTRY_POINTS)
def test_storm_over_a_dead_lease_reclaims_it_once(
    path: str, principal: Principal, clock: Clock, executions: Executions
) -> None:
    """Many retries race to take over the same dead lease: one wins, the rest see it in flight."""
    key = new_key()
    _orphan_claim(principal, path, key, lease=timedelta(seconds=30))
    clock.advance(31)
    views.DELAY = OVERLAP_DELAY

    outcomes = run_together(
        [partial(client_post, path, key, principal.token, f"#{i}") for i in range(30)]
    )

    first = check_storm(outcomes)
    assert executions.count == 1
    assert payment_ids() == [first.payment_id()]


@dataclass
class Takeover:
    """Run once inside the stale request's view: let its lease lapse, then retry on a new thread."""

    path: str
    key: str
    principal: Principal
    clock: Clock
    outcome: Outcome | None = None
    error: str | None = None

    def __call__(self) -> None:
        views.HOOKS.clear()  # the takeover's own view runs without this hook
        self.clock.advance(5)  # past the 1 s lease of the stale request
        try:
            self.outcome = in_thread(
                lambda: client_post(
                    self.path, self.key, self.principal.token, "takeover", raise_errors=False
                )
            )
        except AssertionError:
            self.error = traceback.format_exc()


@pytest.mark.parametrize("path", ALL_ENTRY_POINTS)
@override_settings(IDEMPOTENCY_LEASE=1)
def test_stale_request_cannot_complete_over_the_request_that_took_over(
    path: str, principal: Principal, clock: Clock, frozen_heartbeat: None
) -> None:
    key = new_key()
    takeover = Takeover(path, key, principal, clock)
    views.HOOKS.append(takeover)

    stale = in_thread(lambda: client_post(path, key, principal.token, "stale"))

    assert takeover.error is None, takeover.error
    assert takeover.outcome is not None
    assert takeover.outcome.fresh, takeover.outcome.describe()
    # The takeover's result is the key's result.
    replay = client_post(path, key, principal.token)
    assert (replay.status, replay.replayed, replay.body) == (201, True, takeover.outcome.body)
    if view_is_atomic(path):
        # The stale request's payment was rolled back with its lost completion.
        assert stale.status == 409, stale.describe()
        assert stale.problem == IN_PROGRESS
        assert payment_ids() == [takeover.outcome.payment_id()]
    else:
        # Outside a transaction the view cannot be rolled back: the stale request keeps its own
        # answer, but its completion does not overwrite the record of the request that took over.
        assert stale.fresh, stale.describe()
        assert payment_ids() == sorted([stale.payment_id(), takeover.outcome.payment_id()])


@pytest.mark.parametrize("failure", ["503", "raise"])
@override_settings(IDEMPOTENCY_LEASE=1)
def test_stale_request_cannot_release_the_request_that_took_over(
    failure: str, principal: Principal, clock: Clock, frozen_heartbeat: None
) -> None:
    """The stale request fails after the takeover; its release must not free the key."""
    path = "/mixin/payments/"
    key = new_key()
    views.SCRIPT[:] = [failure]  # the stale request's view runs first and takes this step
    takeover = Takeover(path, key, principal, clock)
    views.HOOKS.append(takeover)

    def stale_request() -> Outcome:
        headers = {"Idempotency-Key": key, "Authorization": f"Token {principal.token}"}
        client = Client(headers=headers, raise_request_exception=False)
        response = client.post(path, data=BODY, content_type="application/json")
        return _from_client(response, "stale")

    stale = in_thread(stale_request)

    assert takeover.error is None, takeover.error
    assert takeover.outcome is not None
    assert takeover.outcome.fresh, takeover.outcome.describe()
    assert stale.status == (503 if failure == "503" else 500), stale.describe()
    replay = client_post(path, key, principal.token)
    assert (replay.status, replay.replayed, replay.body) == (201, True, takeover.outcome.body)
    payments = payment_ids()
    assert takeover.outcome.payment_id() in payments
    # The failed stale view's payment was rolled back, and the key stayed the takeover's.
    assert len(payments) == 1


@pytest.mark.parametrize("path", ALL_ENTRY_POINTS)
@override_settings(IDEMPOTENCY_LEASE=1)
def test_takeover_after_the_stale_request_wrote_cannot_keep_that_write(
    path: str,
    principal: Principal,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    frozen_heartbeat: None,
) -> None:
    """The lease lapses after the stale request saved its payment, before it stores its result."""
    transactional = view_is_atomic(path)
    sqlite_locked = transactional and connection.vendor == "sqlite"
    if sqlite_locked:
        # The takeover waits on the stale request's write lock while the stale request waits for
        # the takeover: SQLite's busy timeout (shared by connections opened from now on) ends it.
        monkeypatch.setitem(connection.settings_dict["OPTIONS"], "timeout", 1)
    key = new_key()
    takeover = Takeover(path, key, principal, clock)
    stale_payment: list[int] = []

    def after_save(sender: type[Payment], instance: Payment, **kwargs: Any) -> None:
        if not stale_payment:
            stale_payment.append(instance.pk)
            takeover()

    post_save.connect(after_save, sender=Payment, weak=False, dispatch_uid="stale-write")
    try:
        stale = in_thread(
            lambda: client_post(path, key, principal.token, "stale", raise_errors=False)
        )
    finally:
        post_save.disconnect(sender=Payment, dispatch_uid="stale-write")

    assert takeover.error is None, takeover.error
    assert takeover.outcome is not None
    winner = stale if sqlite_locked else takeover.outcome
    if sqlite_locked and not get_storage().transactional:
        # The claim is in Redis, so the takeover wins it, but its view's own INSERT waits on the
        # stale request's write lock until SQLite gives up: that view fails (its key released),
        # and the stale request, whose claim is gone, rolls its payment back. Nothing is paid;
        # the next retry pays once.
        assert takeover.outcome.status == 500, takeover.outcome.describe()
        assert stale.status == 409, stale.describe()
        assert stale.problem == IN_PROGRESS
        assert payment_ids() == []
        retry = client_post(path, key, principal.token)
        assert retry.fresh, retry.describe()
        assert payment_ids() == [retry.payment_id()]
        return
    if sqlite_locked:
        # Lock contention surfaces as 503 for the takeover; the stale request kept its claim.
        assert takeover.outcome.status == 503, takeover.outcome.describe()
        assert takeover.outcome.problem == UNAVAILABLE
        assert stale.fresh, stale.describe()
        assert payment_ids() == stale_payment
    elif transactional:
        # ORM store: the stale payment is rolled back with the completion it lost.
        assert takeover.outcome.fresh, takeover.outcome.describe()
        assert stale.status == 409, stale.describe()
        assert stale.problem == IN_PROGRESS
        assert stale_payment[0] not in payment_ids()
        assert payment_ids() == [takeover.outcome.payment_id()]
    else:
        # Outside a transaction a write the stale view made stays, but its late
        # completion is refused: the key's result stays the takeover's.
        assert takeover.outcome.fresh, takeover.outcome.describe()
        assert stale.fresh, stale.describe()
        assert payment_ids() == sorted([stale_payment[0], takeover.outcome.payment_id()])
    replay = client_post(path, key, principal.token)
    assert (replay.status, replay.replayed, replay.body) == (201, True, winner.body)
