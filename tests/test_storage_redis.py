"""The Redis store's own behaviour: its settings, its client, and drills on real Cluster and
Sentinel set-ups and a replica that stops acknowledging.

The drills start real servers on loopback (``tests/redis_servers.py``; the session fixtures are
in ``tests/conftest.py``) and real server processes of the test project (``tests/serve.py``)
with ``IDEMPOTENCY_STORE = "redis"`` on a cluster or Sentinel client. They count ``Payment``
rows per key, the business side effect: each key is sent by its own user, so a payment's user
names the key it was made for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from django_idempotency.checks import check_settings
from django_idempotency.exceptions import StoreError
from django_idempotency.keys import ANONYMOUS_SCOPE, hash_key
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import StoredResponse
from django_idempotency.storage.redis import RedisStorage
from tests import redis_servers
from tests.test_concurrency import (
    Outcome,
    Server,
    check_storm,
    http_post,
    run_together,
    start_servers,
    stop_servers,
    summary,
)
from tests.testapp.models import Payment

LEASE = timedelta(seconds=60)
TTL = timedelta(hours=24)
PATH = "/mixin/payments/"
RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id": 1}')


def _ids(**overrides: Any) -> list[str]:
    with override_settings(IDEMPOTENCY_STORE="redis", **overrides):
        return [str(message.id) for message in check_settings()]


# --- settings and checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"IDEMPOTENCY_REDIS_URL": "http://redis:6379/0"},
        {"IDEMPOTENCY_REDIS_CLIENT": "no.such.factory"},
        {"IDEMPOTENCY_REDIS_CLIENT": "django_idempotency.storage.redis.SAFE_EVICTION_POLICIES"},
        {"IDEMPOTENCY_REDIS_URL": "redis://r/0", "IDEMPOTENCY_REDIS_KEY_PREFIX": "idem:{all}:"},
        {"IDEMPOTENCY_REDIS_URL": "redis://r/0", "IDEMPOTENCY_REDIS_ASYNC_CLIENT": "no.such"},
        {
            "IDEMPOTENCY_REDIS_URL": "redis://r/0",
            "IDEMPOTENCY_REDIS_ASYNC_CLIENT": "django_idempotency.keys.ANONYMOUS_SCOPE",
        },
    ],
    ids=[
        "nothing",
        "not-a-redis-url",
        "no-import",
        "not-callable",
        "hash-tag",
        "async-no-import",
        "async-not-callable",
    ],
)
def test_check_e008(overrides: dict[str, Any]) -> None:
    with override_settings(IDEMPOTENCY_REDIS_URL="", IDEMPOTENCY_REDIS_CLIENT=""):
        assert "django_idempotency.E009" in _ids(**overrides)


@pytest.mark.parametrize(
    "url", ["redis://r:6379/0", "rediss://r:6380/1", "unix:///run/redis.sock?db=2"]
)
def test_each_url_scheme_passes_the_checks(url: str) -> None:
    with override_settings(IDEMPOTENCY_REDIS_CLIENT=""):
        assert _ids(IDEMPOTENCY_REDIS_URL=url) == []
    assert _ids(IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client") == []
    assert (
        _ids(
            IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client",
            IDEMPOTENCY_REDIS_ASYNC_CLIENT="tests.redis_servers.async_cluster_client",
        )
        == []
    )


@pytest.mark.parametrize(
    "overrides",
    [{"IDEMPOTENCY_REDIS_WAIT_REPLICAS": -1}, {"IDEMPOTENCY_REDIS_WAIT_TIMEOUT": -5}],
)
def test_negative_wait_settings_are_e002(overrides: dict[str, Any]) -> None:
    assert "django_idempotency.E002" in _ids(IDEMPOTENCY_REDIS_URL="redis://r/0", **overrides)


def test_store_without_a_server_setting_is_refused() -> None:
    with (
        override_settings(
            IDEMPOTENCY_STORE="redis", IDEMPOTENCY_REDIS_URL="", IDEMPOTENCY_REDIS_CLIENT=""
        ),
        pytest.raises(ImproperlyConfigured, match="IDEMPOTENCY_REDIS_URL"),
    ):
        get_storage().client  # type: ignore[attr-defined]  # noqa: B018


def test_an_async_client_is_used_only_where_it_can_live() -> None:
    """Only a long-lived loop gets a client: outside any loop, and on a loop that
    ``async_to_sync`` made for one call (an async view under WSGI), the store hops to a thread,
    as it does when only a synchronous factory is named."""
    from asgiref.sync import async_to_sync

    async def native() -> bool:
        return get_storage().runs_on_loop()

    with override_settings(
        IDEMPOTENCY_STORE="redis", IDEMPOTENCY_REDIS_URL="redis://r/0", IDEMPOTENCY_REDIS_CLIENT=""
    ):
        assert not get_storage().runs_on_loop()
        assert not async_to_sync(native)()
        assert asyncio.run(native())
        with override_settings(IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client"):
            assert not asyncio.run(native())
        with (
            override_settings(IDEMPOTENCY_REDIS_ASYNC_CLIENT="no.such.factory"),
            pytest.raises(ImproperlyConfigured, match="IDEMPOTENCY_REDIS_ASYNC_CLIENT"),
        ):
            asyncio.run(_async_client())


async def _async_client() -> Any:
    return get_storage().aclient()  # type: ignore[attr-defined]


def test_keys_carry_no_hash_tag_and_hide_scope_and_key() -> None:
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_URL="redis://r/0",
        IDEMPOTENCY_REDIS_KEY_PREFIX="idempotency:",
    ):
        store = get_storage()
        assert isinstance(store, RedisStorage)
        key = store.record_key("user:alice@example.com", "k-1")
    assert key.startswith("idempotency:")
    assert "{" not in key and "}" not in key
    assert "alice" not in key and "k-1" not in key


_BUILT: list[object] = []


def counting_factory() -> object:
    """An ``IDEMPOTENCY_REDIS_CLIENT`` that records each client it builds."""
    import redis

    client = redis.Redis.from_url(
        os.environ.get("IDEMPOTENCY_TEST_REDIS_URL", "redis://127.0.0.1:1")
    )
    _BUILT.append(client)
    return client


def test_client_is_built_once_and_rebuilt_when_a_setting_changes() -> None:
    _BUILT.clear()
    path = f"{__name__}.counting_factory"
    with override_settings(IDEMPOTENCY_STORE="redis", IDEMPOTENCY_REDIS_CLIENT=path):
        store = get_storage()
        assert isinstance(store, RedisStorage)
        seen = {id(store.client) for _ in range(20)}
        threads = [threading.Thread(target=lambda: store.client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert get_storage() is store
        assert len(seen) == 1 and len(_BUILT) == 1
        with override_settings(IDEMPOTENCY_REDIS_KEY_PREFIX="other:"):
            again = get_storage()
            assert isinstance(again, RedisStorage)
            assert again is not store
            assert again.client is not store.client
    assert len(_BUILT) == 2


def _closed_port() -> int:
    return redis_servers.free_port()


@pytest.mark.parametrize("kind", ["url", "cluster-client"])
def test_unreachable_server_is_a_store_error_on_every_operation(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _closed_port()
    overrides = {
        "IDEMPOTENCY_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "IDEMPOTENCY_REDIS_CLIENT": "",
    }
    if kind == "cluster-client":
        # A cluster client builds itself by reading the topology: no node answers at all.
        monkeypatch.setenv("IDEMPOTENCY_TEST_CLUSTER_NODES", f"127.0.0.1:{port}")
        overrides["IDEMPOTENCY_REDIS_CLIENT"] = "tests.redis_servers.cluster_client"
    now = timezone.now()
    with override_settings(IDEMPOTENCY_STORE="redis", **overrides):
        store = get_storage()
        calls: list[Callable[[], object]] = [
            lambda: store.claim("s", "k", "fp", now=now, lease=LEASE, ttl=TTL),
            lambda: store.complete("s", "k", "t", StoredResponse(201, (), b""), now=now),
            lambda: store.renew("s", "k", "t", now=now, lease=LEASE),
            lambda: store.release("s", "k", "t"),
            lambda: store.get("s", "k"),
        ]
        for call in calls:
            with pytest.raises(StoreError, match="failed"):
                call()


# --- real servers -----------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[redis_servers.Server, redis_servers.Server]]:
    """A primary and its replica of our own, to stop and reconfigure at will."""
    from tests.conftest import _servers_or_skip

    _servers_or_skip()
    primary = redis_servers.start_server(tmp_path / "primary", [])
    replica = redis_servers.start_server(
        tmp_path / "replica", ["--replicaof", "127.0.0.1", str(primary.port)]
    )
    try:
        redis_servers.wait_until(
            lambda: replica.client().info("replication").get("master_link_status") == "up",
            "the replica to sync",
        )
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_evicting_policy_is_warned_about_once(
    pair: tuple[redis_servers.Server, redis_servers.Server], caplog: pytest.LogCaptureFixture
) -> None:
    primary, _ = pair
    url = f"redis://127.0.0.1:{primary.port}/0"
    with override_settings(IDEMPOTENCY_STORE="redis", IDEMPOTENCY_REDIS_URL=url):
        with caplog.at_level(logging.WARNING, logger="django_idempotency"):
            get_storage().client  # type: ignore[attr-defined]  # noqa: B018
        assert "maxmemory-policy" not in caplog.text  # noeviction, the default
        primary.client().config_set("maxmemory", "100mb")
        primary.client().config_set("maxmemory-policy", "volatile-lru")
        with (
            override_settings(IDEMPOTENCY_REDIS_KEY_PREFIX="p2:"),
            caplog.at_level(logging.WARNING, logger="django_idempotency"),
        ):
            store = get_storage()
            store.client  # type: ignore[attr-defined]  # noqa: B018
            store.client  # type: ignore[attr-defined]  # noqa: B018
    warnings = [r for r in caplog.records if "maxmemory-policy volatile-lru" in r.getMessage()]
    assert len(warnings) == 1


# --- replica-acknowledged claims --------------------------------------------------------------


def _wait_store(primary: redis_servers.Server, replicas: int) -> RedisStorage:
    store = get_storage()
    assert isinstance(store, RedisStorage)
    assert store.wait_replicas == replicas
    return store


@pytest.mark.django_db(transaction=True)
def test_claim_without_a_replica_acknowledgement_is_503_and_the_view_does_not_run(
    pair: tuple[redis_servers.Server, redis_servers.Server], client: Any
) -> None:
    primary, replica = pair
    url = f"redis://127.0.0.1:{primary.port}/0"
    key = "wait-1"
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_URL=url,
        IDEMPOTENCY_REDIS_CLIENT="",
        IDEMPOTENCY_REDIS_WAIT_REPLICAS=1,
        IDEMPOTENCY_REDIS_WAIT_TIMEOUT=200,
    ):
        store = _wait_store(primary, 1)
        ok = client.post(
            PATH,
            {"amount": 5},
            content_type="application/json",
            headers={"Idempotency-Key": "wait-0"},
        )
        assert ok.status_code == 201
        assert Payment.objects.count() == 1

        replica.stop()
        redis_servers.wait_until(
            lambda: primary.client().info("replication").get("connected_slaves") == 0,
            "the primary to notice its replica left",
        )
        started = time.monotonic()
        refused = client.post(
            PATH, {"amount": 5}, content_type="application/json", headers={"Idempotency-Key": key}
        )
        elapsed = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.json()["type"].endswith("#idempotency-store-unavailable")
        assert int(refused["Retry-After"]) >= 1
        assert Payment.objects.count() == 1  # the view did not run
        assert elapsed >= 0.2  # it waited for the acknowledgement it never got
        # The claim was released, so the retry is not stuck behind a 409 for a lease.
        assert store.get(ANONYMOUS_SCOPE, hash_key(ANONYMOUS_SCOPE, key)) is None
        # An async view on a long-lived loop is refused alike.
        payer = Payer()
        assert _post_together("/async/payments/", key, 1, payer.user)[0].status_code == 503
        assert Payment.objects.count() == 1

        replica.restart()
        redis_servers.wait_until(
            lambda: replica.client().info("replication").get("master_link_status") == "up",
            "the replica to sync again",
        )
        retry = client.post(
            PATH, {"amount": 5}, content_type="application/json", headers={"Idempotency-Key": key}
        )
        assert retry.status_code == 201
        assert Payment.objects.count() == 2


def test_wait_latency_with_the_replica_up(
    pair: tuple[redis_servers.Server, redis_servers.Server], capsys: pytest.CaptureFixture[str]
) -> None:
    """A short, bounded measurement of what ``WAIT 1`` adds to a claim; docs/stores.md quotes it.

    It asserts no speed, which depends on the machine: only that the median claim returns before
    the wait's timeout, i.e. on the replica's acknowledgement rather than by giving up.
    """
    primary, _ = pair
    url = f"redis://127.0.0.1:{primary.port}/0"
    rounds = 300
    figures: dict[int, float] = {}
    for replicas in (0, 1):
        with override_settings(
            IDEMPOTENCY_STORE="redis",
            IDEMPOTENCY_REDIS_URL=url,
            IDEMPOTENCY_REDIS_CLIENT="",
            IDEMPOTENCY_REDIS_WAIT_REPLICAS=replicas,
            IDEMPOTENCY_REDIS_WAIT_TIMEOUT=100,
        ):
            store = _wait_store(primary, replicas)
            now = timezone.now()
            store.claim("warm", "up", "fp", now=now, lease=LEASE, ttl=TTL)
            samples = []
            for i in range(rounds):
                started = time.perf_counter()
                claim = store.claim(f"m{replicas}", str(i), "fp", now=now, lease=LEASE, ttl=TTL)
                samples.append(time.perf_counter() - started)
                assert claim.won
            samples.sort()
            figures[replicas] = samples[len(samples) // 2] * 1000
            # Under the 100 ms timeout: WAIT returned on the replica's acknowledgement.
            assert figures[replicas] < 100
    with capsys.disabled():
        print(
            f"\nclaim median over {rounds}: {figures[0]:.3f} ms without WAIT, "
            f"{figures[1]:.3f} ms with WAIT 1 (replica up, loopback)"
        )


# --- drills over HTTP, with server processes --------------------------------------------------


class Payer:
    """One user per key: ``Payment.user`` then says which key a payment was made for."""

    def __init__(self) -> None:
        user = get_user_model().objects.create_user(username=f"p-{uuid.uuid4().hex[:10]}")
        self.user = user
        self.token = Token.objects.create(user=user).key
        self.key = str(uuid.uuid4())
        self.scope = f"user:{user.pk}"

    def payments(self) -> int:
        return int(Payment.objects.filter(user=self.user).count())


@pytest.fixture
def serve_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., list[Server]]]:
    """Start ``tests.serve`` processes on the Redis store with a client factory."""
    running: list[Server] = []

    def start(client_path: str, count: int = 3, delay: float = 0.2) -> list[Server]:
        monkeypatch.setenv("IDEMPOTENCY_TEST_STORE", "redisstore")
        monkeypatch.setenv("IDEMPOTENCY_TEST_REDIS_CLIENT", client_path)
        servers = start_servers(count, tmp_path, delay=delay)
        running.extend(servers)
        return servers

    yield start
    stop_servers([s.process for s in running])


def _logs(servers: list[Server]) -> str:
    return "\n".join(s.stderr_tail() for s in servers)


def _record_key(payer: Payer) -> str:
    from tests import settings as test_settings

    prefix = f"{test_settings.REDIS_KEY_PREFIX}:"
    return f"{prefix}{hash_key(payer.scope, hash_key(payer.scope, payer.key))}"


def _held_by(server: redis_servers.Server, payers: list[Payer]) -> list[Payer]:
    """The payers whose record is on ``server`` (a SCAN of one node sees only its own keys)."""
    from tests import settings as test_settings

    keys = {
        k.decode() for k in server.client().scan_iter(match=f"{test_settings.REDIS_KEY_PREFIX}:*")
    }
    return [p for p in payers if _record_key(p) in keys]


def _primaries_holding(cluster: redis_servers.Cluster, payers: list[Payer]) -> set[int]:
    return {primary.port for primary in cluster.primaries() if _held_by(primary, payers)}


def _payers_on_every_primary(cluster: redis_servers.Cluster, count: int) -> list[Payer]:
    """At least ``count`` payers whose records fall on every primary between them.

    Keys are random: a dozen of them miss one of three primaries about once in forty runs, and
    the spread is what the tests assert, so they are drawn until it is there.
    """
    client = redis_servers.cluster_client()
    wanted = {primary.port for primary in cluster.primaries()}
    payers: list[Payer] = []
    owners: set[int] = set()
    while len(payers) < count or owners != wanted:
        payer = Payer()
        payers.append(payer)
        owners.add(client.get_node_from_key(_record_key(payer)).port)
    client.close()
    return payers


@pytest.mark.django_db(transaction=True)
def test_cluster_storm_runs_each_key_once_on_every_primary(
    redis_cluster: redis_servers.Cluster, serve_with: Callable[..., list[Server]]
) -> None:
    servers = serve_with("tests.redis_servers.cluster_client")
    payers = _payers_on_every_primary(redis_cluster, 20)
    outcomes: list[Outcome] = []
    # 50 identical requests at once, key after key: more at once would exceed PostgreSQL's
    # default max_connections (100) with a connection per server thread.
    for payer in payers:
        calls: list[Callable[[], Outcome]] = [
            partial(http_post, servers[i % 3].url + PATH, payer.key, payer.token, payer.key)
            for i in range(50)
        ]
        outcomes.extend(run_together(calls))
    logs = _logs(servers)
    assert "Traceback" not in logs, logs
    for payer in payers:
        check_storm([o for o in outcomes if o.label == payer.key])
        assert payer.payments() == 1
    assert Payment.objects.count() == 20
    assert _primaries_holding(redis_cluster, payers) == {p.port for p in redis_cluster.primaries()}
    assert len(redis_cluster.primaries()) == 3


def _final(url: str, payer: Payer, deadline: float) -> Outcome:
    """POST until the answer is final (201), as a retrying client does."""
    while True:
        outcome = http_post(url, payer.key, payer.token, payer.key)
        if outcome.status not in (409, 503) or time.monotonic() > deadline:
            return outcome
        time.sleep(0.1)


@pytest.mark.django_db(transaction=True)
def test_cluster_primary_killed_mid_run_gives_503s_then_exactly_once(
    redis_cluster: redis_servers.Cluster, serve_with: Callable[..., list[Server]]
) -> None:
    servers = serve_with("tests.redis_servers.cluster_client", delay=0.0)
    before = [Payer() for _ in range(12)]
    for payer in before:
        assert http_post(servers[0].url + PATH, payer.key, payer.token).fresh
    first_bodies = {p.key: p.payments() for p in before}
    assert set(first_bodies.values()) == {1}
    victim = redis_cluster.primaries()[0]
    on_victim = _held_by(victim, before)
    assert on_victim, "no key on the primary to be killed; the keys do not spread"

    # Traffic that runs through the kill: replays of finished keys, and fresh keys sent once
    # the primary is gone (their claims cannot have been acknowledged by the dead primary).
    during = [Payer() for _ in range(12)]
    seen: list[Outcome] = []
    stop = threading.Event()
    killed = threading.Event()
    errors: list[BaseException] = []

    def traffic(index: int) -> None:
        try:
            i = index
            while not stop.is_set():
                pool = before + (during if killed.is_set() else [])
                payer = pool[i % len(pool)]
                seen.append(http_post(servers[i % 3].url + PATH, payer.key, payer.token, payer.key))
                i += 7
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=traffic, args=(n,), daemon=True) for n in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    victim.kill()
    killed.set()
    try:
        redis_servers.wait_until(redis_cluster.healthy, "the replica to take over", timeout=30)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    logs = _logs(servers)
    statuses = Counter(o.status for o in seen)
    assert statuses[500] == 0, (summary(seen), logs)
    assert set(statuses) <= {201, 409, 503}, summary(seen)
    assert statuses[503] > 0, f"no 503 while a primary was down: {summary(seen)}"
    for outcome in seen:
        if outcome.status == 503:
            assert outcome.problem == "idempotency-store-unavailable"
    assert "Traceback" not in logs, logs

    # After the takeover: every key's answer is final, and every key ran exactly once.
    deadline = time.monotonic() + 30
    after = [Payer() for _ in range(6)]
    for payer in before + during + after:
        final = _final(servers[1].url + PATH, payer, deadline)
        assert final.status == 201, (payer.key, final.describe())
    for payer in before:
        assert payer.payments() == 1
    for payer in during + after:
        assert payer.payments() == 1
    finished_replays = [o for o in seen if o.status == 201 and o.label in first_bodies]
    assert all(o.replayed for o in finished_replays)
    # The killed primary comes back as a replica, so the next test has a whole cluster again.
    victim.restart()
    redis_servers.wait_until(
        lambda: victim.client().info("replication").get("master_link_status") == "up",
        "the old primary to rejoin as a replica",
    )


@pytest.mark.django_db(transaction=True)
def test_sentinel_failover_during_a_run_is_followed_without_a_restart(
    redis_sentinel: redis_servers.SentinelSet, serve_with: Callable[..., list[Server]]
) -> None:
    """The primary dies in the middle of a run; the Sentinels promote the replica.

    The primary is killed rather than demoted with ``SENTINEL FAILOVER``: a demoted primary keeps
    accepting writes until the Sentinels reconfigure it, and what it accepted then is lost when it
    resyncs (docs/stores.md, Sentinel). Fresh keys join the traffic once the primary is gone, so
    that none of them can have a claim that only the dead primary acknowledged.
    """
    servers = serve_with("tests.redis_servers.sentinel_client", delay=0.0)
    old = redis_sentinel.by_port(redis_sentinel.current_primary_port())
    before = [Payer() for _ in range(6)]
    for payer in before:
        assert http_post(servers[0].url + PATH, payer.key, payer.token).fresh

    during = [Payer() for _ in range(8)]
    seen: list[Outcome] = []
    stop = threading.Event()
    killed = threading.Event()
    errors: list[BaseException] = []

    def traffic(index: int) -> None:
        try:
            i = index
            while not stop.is_set():
                pool = before + (during if killed.is_set() else [])
                payer = pool[i % len(pool)]
                seen.append(http_post(servers[i % 3].url + PATH, payer.key, payer.token, payer.key))
                i += 5
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=traffic, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    old.kill()
    killed.set()
    try:
        redis_servers.wait_until(
            lambda: redis_sentinel.current_primary_port() != old.port,
            "the Sentinels to promote the replica",
        )
        new_primary = redis_sentinel.by_port(redis_sentinel.current_primary_port())
        redis_servers.wait_until(
            lambda: new_primary.client().info("replication").get("role") == "master",
            "the replica to become primary",
        )
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    statuses = Counter(o.status for o in seen)
    assert statuses[500] == 0, summary(seen)
    assert set(statuses) <= {201, 409, 503}, summary(seen)
    assert statuses[503] > 0, f"no 503 while the primary was down: {summary(seen)}"
    logs = _logs(servers)
    assert "Traceback" not in logs, logs

    deadline = time.monotonic() + 30
    fresh = Payer()
    for payer in [*before, *during, fresh]:
        final = _final(servers[2].url + PATH, payer, deadline)
        assert final.status == 201, (payer.key, final.describe())
    # The same server processes, never restarted, now write to the new primary.
    assert _held_by(new_primary, [fresh]) == [fresh]
    for payer in [*before, *during, fresh]:
        assert payer.payments() == 1
    replays = [o for o in seen if o.status == 201 and o.label in {p.key for p in before}]
    assert all(o.replayed for o in replays)

    # The old primary comes back; the Sentinels turn it into a replica of the new one.
    old.restart()
    redis_servers.wait_until(
        lambda: old.client().info("replication").get("master_link_status") == "up",
        "the old primary to rejoin as a replica",
    )


def test_wait_on_a_cluster_runs_on_the_primary_that_owns_each_key(
    redis_cluster: redis_servers.Cluster,
) -> None:
    """With ``WAIT`` the claim goes through the key's primary directly (one connection for the
    claim and its ``WAIT``): every claim must still land on the right shard, and be counted."""
    prefix = f"idem-wait-{uuid.uuid4().hex[:8]}:"
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client",
        IDEMPOTENCY_REDIS_KEY_PREFIX=prefix,
        IDEMPOTENCY_REDIS_WAIT_REPLICAS=1,
        IDEMPOTENCY_REDIS_WAIT_TIMEOUT=1000,
    ):
        store = get_storage()
        assert isinstance(store, RedisStorage)
        now = timezone.now()
        for i in range(30):
            assert store.claim("s", f"k{i}", "fp", now=now, lease=LEASE, ttl=TTL).won
            assert not store.claim("s", f"k{i}", "fp", now=now, lease=LEASE, ttl=TTL).won
        holders = {
            primary.port
            for primary in redis_cluster.primaries()
            if list(primary.client().scan_iter(match=f"{prefix}*"))
        }
        assert holders == {p.port for p in redis_cluster.primaries()}
        for primary in redis_cluster.primaries():
            for key in list(primary.client().scan_iter(match=f"{prefix}*")):
                primary.client().delete(key)


def test_wait_claim_follows_a_moved_slot(
    redis_cluster: redis_servers.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A topology read before a slot moved sends the claim to the wrong primary, which answers
    MOVED: the store reads the topology again and claims on the right one."""
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client",
        IDEMPOTENCY_REDIS_KEY_PREFIX=f"idem-moved-{uuid.uuid4().hex[:8]}:",
        IDEMPOTENCY_REDIS_WAIT_REPLICAS=1,
        IDEMPOTENCY_REDIS_WAIT_TIMEOUT=1000,
    ):
        store = get_storage()
        assert isinstance(store, RedisStorage)
        key = store.record_key("s", "k")
        right = store.client.get_node_from_key(key)
        wrong = next(n for n in store.client.get_primaries() if n.name != right.name)
        stale = [wrong.redis_connection]
        real = RedisStorage._node_client
        monkeypatch.setattr(
            RedisStorage, "_node_client", lambda self, k: stale.pop() if stale else real(self, k)
        )
        claim = store.claim("s", "k", "fp", now=timezone.now(), lease=LEASE, ttl=TTL)
        assert claim.won and not stale
        assert store.release("s", "k", claim.token or "")


# --- async views on the event loop ------------------------------------------------------------


def _forbid_sync_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the synchronous store calls fail, so that only the loop's own client can answer."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an async view made a synchronous store call")

    for name in ("claim", "complete", "release"):
        monkeypatch.setattr(RedisStorage, name, refuse)


def _post_together(
    url: str, key: str | None, count: int, user: Any, *, method: str = "post"
) -> list[Any]:
    """``count`` identical requests at once, on one long-lived loop as under an ASGI server."""
    from asgiref.sync import sync_to_async
    from django.db import connections
    from django.test import AsyncClient

    client = AsyncClient(raise_request_exception=False)
    client.force_login(user)

    async def storm() -> list[Any]:
        try:
            return list(
                await asyncio.gather(
                    *(
                        client.generic(
                            method.upper(),
                            url,
                            json.dumps({"amount": 10}),
                            content_type="application/json",
                            headers={} if key is None else {"Idempotency-Key": key},
                        )
                        for _ in range(count)
                    )
                )
            )
        finally:
            store = get_storage()
            if isinstance(store, RedisStorage):
                await store.aclose()
            await sync_to_async(connections.close_all)()

    return asyncio.run(storm())


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("wait", [0, 10])
@pytest.mark.parametrize("url", ["/async/payments/", "/mw/async/payments/"])
def test_async_view_awaits_the_redis_store_on_the_loop_and_runs_once(
    url: str, wait: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import settings as test_settings
    from tests.test_storage import _shared_redis_or_skip
    from tests.testapp import views

    _shared_redis_or_skip()
    _forbid_sync_operations(monkeypatch)
    views.DELAY = 0.2
    payer = Payer()
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_URL=test_settings.REDIS_URL,
        IDEMPOTENCY_REDIS_CLIENT="",
        IDEMPOTENCY_REDIS_KEY_PREFIX=f"idem-async-{uuid.uuid4().hex[:8]}:",
        IDEMPOTENCY_WAIT=wait,
    ):
        responses = _post_together(url, payer.key, 30, payer.user)
        statuses = Counter(r.status_code for r in responses)
        again = _post_together(url, payer.key, 1, payer.user)[0]
    assert payer.payments() == 1
    assert statuses[201] >= 1 and set(statuses) <= {201, 409}, statuses
    if wait:
        assert statuses == {201: 30}  # the duplicates waited for the original, then replayed
    first = next(r for r in responses if r.status_code == 201)
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.content == first.content


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("method", "key", "required", "status", "payments", "calls"),
    [
        ("post", "fresh", False, 201, 1, ["claim", "complete"]),
        ("get", "fresh", False, 200, 0, []),  # a safe method is not protected
        ("post", None, False, 201, 1, []),  # no key on an optional view: runs unprotected
        ("post", None, True, 400, 0, []),  # a required key is missing
        ("post", "x" * 300, False, 400, 0, []),  # a malformed key
    ],
)
def test_what_an_async_view_on_the_loop_decides_before_the_claim(
    method: str,
    key: str | None,
    required: bool,
    status: int,
    payments: int,
    calls: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django_idempotency import core
    from tests import settings as test_settings
    from tests.test_storage import _shared_redis_or_skip

    _shared_redis_or_skip()
    _forbid_sync_operations(monkeypatch)
    timed: list[str] = []
    monkeypatch.setattr(core, "store_timer", lambda operation, seconds: timed.append(operation))
    payer = Payer()
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_URL=test_settings.REDIS_URL,
        IDEMPOTENCY_REDIS_CLIENT="",
        IDEMPOTENCY_REDIS_KEY_PREFIX=f"idem-async-{uuid.uuid4().hex[:8]}:",
        IDEMPOTENCY_REQUIRED=required,
    ):
        answer = _post_together("/async/payments/", key, 1, payer.user, method=method)[0]
    assert answer.status_code == status
    if status == 400:
        assert answer["Content-Type"] == "application/problem+json"
    assert payer.payments() == payments
    assert timed == calls


@pytest.mark.django_db(transaction=True)
def test_async_view_with_the_redis_store_down_is_503_and_does_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forbid_sync_operations(monkeypatch)
    payer = Payer()
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0",
        IDEMPOTENCY_REDIS_CLIENT="",
    ):
        response = _post_together("/async/payments/", payer.key, 1, payer.user)[0]
    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    assert payer.payments() == 0


@pytest.mark.django_db(transaction=True)
def test_async_views_on_a_cluster_run_each_key_once_on_every_primary(
    redis_cluster: redis_servers.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_sync_operations(monkeypatch)
    payers = _payers_on_every_primary(redis_cluster, 12)
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client",
        IDEMPOTENCY_REDIS_ASYNC_CLIENT="tests.redis_servers.async_cluster_client",
        IDEMPOTENCY_WAIT=10,
    ):
        for payer in payers:
            responses = _post_together("/async/payments/", payer.key, 10, payer.user)
            assert [r.status_code for r in responses] == [201] * 10
            assert payer.payments() == 1
    assert _primaries_holding(redis_cluster, payers) == {p.port for p in redis_cluster.primaries()}


def _store_answers(name: str, answer: Any) -> Callable[..., Any]:
    async def fake(self: RedisStorage, *args: Any, **kwargs: Any) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    return fake


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("step", "fault", "first", "retry", "payments"),
    [
        # The view raised before writing: the key goes back and the retry runs.
        ("early-raise", None, 500, 201, 1),
        # Django's answer to Http404 is final: the retry replays it.
        ("early-http404", None, 404, 404, 0),
        # A 5xx is not final: released, so the retry runs again (no transaction to roll back).
        ("500", None, 500, 201, 2),
        # A response that cannot be rendered is the view failing.
        ("unrenderable", None, 500, 201, 2),
        # A streamed result is not kept: the retry learns that it cannot be replayed.
        ("stream", None, 201, 409, 1),
        # The result could not be stored: the real response goes out, the lease keeps the key.
        ("ok", ("acomplete", StoreError("complete failed: ConnectionError")), 201, 409, 1),
        # The claim was taken over meanwhile: the response goes out, the record is not touched.
        ("ok", ("acomplete", False), 201, 409, 1),
        # The release failed: the lease still ends on its own, the retry waits for it.
        ("500", ("arelease", StoreError("release failed: ConnectionError")), 500, 409, 1),
    ],
)
def test_every_outcome_of_an_async_view_on_the_loop(
    step: str,
    fault: tuple[str, Any] | None,
    first: int,
    retry: int,
    payments: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django.dispatch import receiver

    from django_idempotency import signals
    from tests import settings as test_settings
    from tests.test_storage import _shared_redis_or_skip
    from tests.testapp import views

    _shared_redis_or_skip()
    _forbid_sync_operations(monkeypatch)
    heard: list[tuple[str, int]] = []

    # Receivers may use the ORM, which Django refuses on the loop: they run in a thread.
    def listen(name: str) -> Callable[..., None]:
        def hear(sender: Any, **kwargs: Any) -> None:
            heard.append((name, get_user_model().objects.count()))

        return hear

    hearers = {name: listen(name) for name in ("key_claimed", "response_replayed", "store_error")}
    for name, hear in hearers.items():
        receiver(getattr(signals, name))(hear)
    payer = Payer()
    views.SCRIPT.append(step)
    try:
        with override_settings(
            IDEMPOTENCY_STORE="redis",
            IDEMPOTENCY_REDIS_URL=test_settings.REDIS_URL,
            IDEMPOTENCY_REDIS_CLIENT="",
            IDEMPOTENCY_REDIS_KEY_PREFIX=f"idem-async-{uuid.uuid4().hex[:8]}:",
        ):
            if fault is not None:
                monkeypatch.setattr(RedisStorage, fault[0], _store_answers(*fault))
            answer = _post_together("/async/payments/", payer.key, 1, payer.user)[0]
            monkeypatch.undo()
            _forbid_sync_operations(monkeypatch)
            again = _post_together("/async/payments/", payer.key, 1, payer.user)[0]
    finally:
        for name, hear in hearers.items():
            getattr(signals, name).disconnect(hear)
    assert (answer.status_code, again.status_code) == (first, retry)
    assert payer.payments() == payments
    assert ("key_claimed", 1) in heard
    assert (("store_error", 1) in heard) == (fault is not None and fault[1] is not False)


# --- resharding and a cluster that is down ----------------------------------------------------


def _two_nodes(root: Path, *, b_slots: bool) -> tuple[redis_servers.Server, redis_servers.Server]:
    args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    a = redis_servers.start_server(root / "a", args, port=redis_servers.free_port(bus=True))
    b = redis_servers.start_server(root / "b", args, port=redis_servers.free_port(bus=True))
    if b_slots:
        a.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
        b.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
    else:
        a.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    a.client().execute_command("CLUSTER", "MEET", "127.0.0.1", b.port)
    redis_servers.wait_until(
        lambda: all(
            s.client().cluster("info").get("cluster_state") == "ok"
            and int(s.client().cluster("info").get("cluster_known_nodes", 0)) == 2
            for s in (a, b)
        ),
        "the two nodes to form a cluster",
    )
    return a, b


@pytest.fixture(params=["rebalance", "new-shard"])
def two_nodes(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[redis_servers.Server, redis_servers.Server]]:
    """A cluster of our own, free to reshard: node A and node B, each serving half the slots
    (``rebalance``), or A serving all of them and B none yet (``new-shard``, a shard just
    added)."""
    from tests.conftest import _servers_or_skip

    _servers_or_skip()
    a, b = _two_nodes(tmp_path, b_slots=request.param == "rebalance")
    try:
        monkeypatch.setenv("IDEMPOTENCY_TEST_CLUSTER_NODES", f"{a.address},{b.address}")
        yield a, b
    finally:
        b.stop()
        a.stop()


def _node_id(server: redis_servers.Server) -> str:
    return str(server.client().execute_command("CLUSTER", "MYID").decode())


def _key_on(store: RedisStorage, slots: range, *, not_: tuple[str, ...] = ()) -> str:
    """A key hash whose record lands on one of ``slots``."""
    for i in range(1_000_000):
        name = f"k{i}"
        if name not in not_ and store.client.keyslot(store.record_key("s", name)) in slots:
            return name
    raise AssertionError("no key for the slots")  # pragma: no cover


def _asking(server: redis_servers.Server) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_asking", {}).get("calls", 0))


def test_a_slot_resharded_under_the_store_is_followed_through_ask_and_moved(
    two_nodes: tuple[redis_servers.Server, redis_servers.Server], request: pytest.FixtureRequest
) -> None:
    """A live slot migration (``CLUSTER SETSLOT … MIGRATING/IMPORTING``, ``MIGRATE``, then
    ``SETSLOT … NODE``) from A to B. While the slot moves, A answers ``ASK`` for the records it
    no longer holds; once it moved, ``MOVED``. Claims stay exactly-once and results replay.

    Between two shards the client follows ``ASK`` to B. To a shard that served no slot when the
    client read the topology (one just added), redis-py's cluster client cannot follow ``ASK``
    (it knows no such node): those calls are a 503 until the slot has moved, never a 500."""
    a, b = two_nodes
    new_shard = request.node.callspec.params["two_nodes"] == "new-shard"
    with override_settings(
        IDEMPOTENCY_STORE="redis",
        IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client",
        IDEMPOTENCY_REDIS_ASYNC_CLIENT="tests.redis_servers.async_cluster_client",
        IDEMPOTENCY_REDIS_KEY_PREFIX="idem-reshard:",
    ):
        store = get_storage()
        assert isinstance(store, RedisStorage)
        now = timezone.now()
        name = _key_on(store, range(8192))  # a slot A serves in both layouts
        moved = store.record_key("s", name)
        slot = store.client.keyslot(moved)
        fresh = _key_on(store, range(slot, slot + 1), not_=(name,))
        on_loop = _key_on(store, range(slot, slot + 1), not_=(name, fresh))

        async def claim_on_the_loop() -> Any:
            try:
                assert store.runs_on_loop()
                return await store.aclaim("s", on_loop, "fp", now=now, lease=LEASE, ttl=TTL)
            finally:
                await store.aclose()

        first = store.claim("s", name, "fp", now=now, lease=LEASE, ttl=TTL)
        assert first.won and a.client().exists(moved)

        # The slot starts moving, and its one record goes to B.
        b.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(a))
        a.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(b))
        a.client().execute_command("MIGRATE", "127.0.0.1", b.port, "", 0, 5000, "KEYS", moved)
        assert a.client().dbsize() == 0
        assert b.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        asked = _asking(b)
        if new_shard:
            with pytest.raises(StoreError, match="node its client does not know"):
                store.complete("s", name, first.token or "", RESPONSE, now=now)
            with pytest.raises(StoreError, match="node its client does not know"):
                store.claim("s", fresh, "fp", now=now, lease=LEASE, ttl=TTL)
            with pytest.raises(StoreError):
                asyncio.run(claim_on_the_loop())
            assert b.client().dbsize() == 1  # nothing ran on B, or anywhere
        else:
            assert store.complete("s", name, first.token or "", RESPONSE, now=now)
            won = store.claim("s", fresh, "fp", now=now, lease=LEASE, ttl=TTL)
            lost = store.claim("s", fresh, "fp", now=now, lease=LEASE, ttl=TTL)
            assert won.won and not lost.won
            assert asyncio.run(claim_on_the_loop()).won
            assert _asking(b) >= asked + 4  # each of them was redirected by ASK
            assert store.release("s", fresh, won.token or "")

        # The move completes: A now answers MOVED to a client that still thinks it owns the slot.
        for server in (a, b):
            server.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", _node_id(b))
        assert store.client.get_node_from_key(moved).port == a.port
        if new_shard:
            assert not store.claim("s", name, "fp", now=now, lease=LEASE, ttl=TTL).won
            assert store.complete("s", name, first.token or "", RESPONSE, now=now)
        replay = store.claim("s", name, "fp", now=now, lease=LEASE, ttl=TTL)
        assert replay.record is not None and replay.record.response == RESPONSE
        assert store.client.get_node_from_key(moved).port == b.port
        assert b.client().exists(moved) and not b.client().exists(store.record_key("s", fresh))
        assert a.client().dbsize() == 0


@pytest.mark.django_db(transaction=True)
def test_clusterdown_is_a_503_and_the_view_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: Any
) -> None:
    """A cluster that reports itself down (here: a slot that no node serves any more) answers
    ``CLUSTERDOWN``: the request gets a 503 problem, the view does not run, nothing is left."""
    from tests.conftest import _servers_or_skip

    _servers_or_skip()
    a, b = _two_nodes(tmp_path, b_slots=False)
    monkeypatch.setenv("IDEMPOTENCY_TEST_CLUSTER_NODES", f"{a.address},{b.address}")
    payer = Payer()
    key_hash = hash_key(payer.scope, payer.key)
    try:
        with override_settings(
            IDEMPOTENCY_STORE="redis",
            IDEMPOTENCY_REDIS_CLIENT="tests.redis_servers.cluster_client",
            IDEMPOTENCY_REDIS_KEY_PREFIX="idem-down:",
        ):
            store = get_storage()
            assert isinstance(store, RedisStorage)
            slot = store.client.keyslot(store.record_key(payer.scope, key_hash))
            a.client().execute_command("CLUSTER", "DELSLOTS", slot)
            with pytest.raises(redis.exceptions.ClusterDownError):
                a.client().execute_command("SET", store.record_key(payer.scope, key_hash), "x")
            response = client.post(
                PATH,
                {"amount": 5},
                content_type="application/json",
                headers={"Idempotency-Key": payer.key, "Authorization": f"Token {payer.token}"},
            )
            assert response.status_code == 503
            assert response["Content-Type"] == "application/problem+json"
            assert response.json()["type"].endswith("#idempotency-store-unavailable")
            assert payer.payments() == 0
            errors = a.client().info("errorstats")
            assert errors["errorstat_CLUSTERDOWN"]["count"] >= 1  # what the server answered
            # redis-py reads the topology again after CLUSTERDOWN, and finds the hole in it.
            with pytest.raises(StoreError, match="claim failed: RedisClusterException"):
                store.claim(payer.scope, key_hash, "fp", now=timezone.now(), lease=LEASE, ttl=TTL)
            assert a.client().dbsize() == b.client().dbsize() == 0
    finally:
        b.stop()
        a.stop()
