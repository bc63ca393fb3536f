"""``DatabaseStorage.purge_expired`` and ``manage.py purge_idempotency_keys``.

Time is frozen: the store takes ``now``, and the command's module-level clock is replaced. Every
test runs against the database that ``IDEMPOTENCY_TEST_DB`` selects.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test import override_settings

from django_idempotency.exceptions import StoreError
from django_idempotency.management.commands import purge_idempotency_keys as command
from django_idempotency.models import IdempotencyKey
from django_idempotency.storage import db as db_module
from django_idempotency.storage.base import (
    BaseStorage,
    Claim,
    PurgeBatch,
    Record,
    State,
    StoredResponse,
)
from django_idempotency.storage.db import DatabaseStorage
from tests.faults import unreachable_database

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
REAL_CLOCK = command.now
HOUR = timedelta(hours=1)
LEASE = timedelta(seconds=60)


class NativeStore(BaseStorage):
    """Stands in for a store whose backend expires records on its own."""

    native_expiry = True

    def claim(
        self,
        scope: str,
        key_hash: str,
        fingerprint: str,
        *,
        now: datetime,
        lease: timedelta,
        ttl: timedelta,
    ) -> Claim:
        raise NotImplementedError

    def complete(
        self,
        scope: str,
        key_hash: str,
        token: str,
        response: StoredResponse | None,
        *,
        now: datetime,
        min_retention: timedelta = timedelta(0),
    ) -> bool:
        raise NotImplementedError

    def renew(
        self, scope: str, key_hash: str, token: str, *, now: datetime, lease: timedelta
    ) -> bool:
        raise NotImplementedError

    def release(self, scope: str, key_hash: str, token: str) -> bool:
        raise NotImplementedError

    def get(self, scope: str, key_hash: str) -> Record | None:
        raise NotImplementedError


_serial = iter(range(10**9))


def make(
    count: int,
    *,
    expires_at: datetime,
    state: State = State.COMPLETED,
    lease_expires_at: datetime | None = None,
    scope: str = "user:1",
) -> list[str]:
    """Insert ``count`` records and return their key hashes."""
    hashes = [f"{next(_serial):064x}" for _ in range(count)]
    IdempotencyKey.objects.bulk_create(
        IdempotencyKey(
            scope=scope,
            key_hash=key_hash,
            fingerprint="f" * 64,
            state=state.value,
            owner_token="t" * 32,
            created_at=expires_at - 24 * HOUR,
            lease_expires_at=lease_expires_at or expires_at - 24 * HOUR + LEASE,
            expires_at=expires_at,
        )
        for key_hash in hashes
    )
    return hashes


def remaining() -> set[str]:
    return set(IdempotencyKey.objects.values_list("key_hash", flat=True))


def run(*args: str, verbosity: int = 1) -> str:
    out = StringIO()
    call_command("purge_idempotency_keys", *args, verbosity=verbosity, stdout=out)
    return out.getvalue()


def normalise(output: str) -> str:
    return re.sub(r"\(\d+\.\d+s\)", "(T)", output)


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command, "now", lambda: NOW)


@pytest.fixture(autouse=True)
def _orm_store() -> Iterator[None]:
    # The purge is the ORM store's; in the Redis matrix the configured store is the cache one.
    # Tests that exercise another store override this inside the test.
    with override_settings(IDEMPOTENCY_STORE="db"):
        yield


@pytest.fixture
def store() -> DatabaseStorage:
    return DatabaseStorage()


# The store ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_only_expired_records_go(store: DatabaseStorage) -> None:
    expired = make(3, expires_at=NOW - HOUR)
    at_expiry = make(1, expires_at=NOW)
    live = make(2, expires_at=NOW + timedelta(seconds=1))
    in_flight = make(2, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW + LEASE)
    dead_lease = make(1, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - HOUR)
    unavailable = make(1, expires_at=NOW + HOUR, state=State.UNAVAILABLE)

    result = store.purge_expired(now=NOW)

    assert (result.deleted, result.batches, result.stale_in_flight) == (4, 1, 0)
    assert result.stopped_by is None
    assert not result.dry_run
    assert len(result.batch_seconds) == 1
    assert result.seconds >= result.batch_seconds[0] >= 0
    assert remaining() == set(live + in_flight + dead_lease + unavailable)
    assert not remaining() & set(expired + at_expiry)


@pytest.mark.django_db
def test_nothing_to_purge(store: DatabaseStorage) -> None:
    live = make(2, expires_at=NOW + HOUR)

    result = store.purge_expired(now=NOW)

    assert (result.deleted, result.batches, result.batch_seconds) == (0, 0, [])
    assert remaining() == set(live)


@pytest.mark.django_db
def test_dry_run_counts_and_deletes_nothing(store: DatabaseStorage) -> None:
    make(25, expires_at=NOW - HOUR)
    make(5, expires_at=NOW + HOUR)
    before = remaining()

    result = store.purge_expired(now=NOW, batch_size=10, dry_run=True)

    assert (result.deleted, result.batches, result.dry_run) == (25, 3, True)
    assert remaining() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("rows", "batch_size", "batches"),
    [(0, 10, 0), (1, 10, 1), (10, 10, 1), (11, 10, 2), (95, 10, 10), (7, 1, 7), (30, 1000, 1)],
)
def test_batches_are_bounded(
    store: DatabaseStorage, rows: int, batch_size: int, batches: int
) -> None:
    make(rows, expires_at=NOW - HOUR)
    live = make(3, expires_at=NOW + HOUR)
    seen: list[PurgeBatch] = []

    result = store.purge_expired(now=NOW, batch_size=batch_size, progress=seen.append)

    assert (result.deleted, result.batches) == (rows, batches)
    assert [b.number for b in seen] == list(range(1, batches + 1))
    assert all(b.count <= batch_size and b.kind == "expired" for b in seen)
    assert sum(b.count for b in seen) == rows
    assert result.batch_seconds == [b.seconds for b in seen]
    assert remaining() == set(live)


@pytest.mark.django_db
def test_live_records_between_expired_ones_survive(store: DatabaseStorage) -> None:
    # Each batch's DELETE spans a primary-key range; live rows inside the range stay.
    live: list[str] = []
    for _ in range(6):
        make(2, expires_at=NOW - HOUR)
        live += make(1, expires_at=NOW + HOUR)
        live += make(1, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - HOUR)

    result = store.purge_expired(now=NOW, batch_size=5)

    assert (result.deleted, result.batches) == (12, 3)
    assert remaining() == set(live)


@pytest.mark.django_db
def test_older_than_keeps_recently_expired(store: DatabaseStorage) -> None:
    long_gone = make(2, expires_at=NOW - 3 * HOUR)
    recent = make(2, expires_at=NOW - HOUR)
    live = make(1, expires_at=NOW + HOUR)

    result = store.purge_expired(now=NOW, older_than=2 * HOUR)

    assert result.deleted == 2
    assert remaining() == set(recent + live)
    assert not remaining() & set(long_gone)


@pytest.mark.django_db
def test_stale_in_flight(store: DatabaseStorage) -> None:
    crashed = make(3, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - 2 * HOUR)
    recent = make(
        1,
        expires_at=NOW + HOUR,
        state=State.IN_FLIGHT,
        lease_expires_at=NOW - timedelta(minutes=30),
    )
    running = make(1, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW + LEASE)
    # A completed record keeps the lease of its claim; only in-flight records are stale.
    completed = make(2, expires_at=NOW + HOUR, lease_expires_at=NOW - 5 * HOUR)
    expired = make(2, expires_at=NOW - HOUR)

    untouched = store.purge_expired(now=NOW, dry_run=True)
    assert (untouched.deleted, untouched.stale_in_flight) == (2, 0)

    seen: list[PurgeBatch] = []
    result = store.purge_expired(now=NOW, stale_in_flight=HOUR, batch_size=2, progress=seen.append)

    assert (result.deleted, result.stale_in_flight, result.batches) == (5, 3, 3)
    assert [(b.kind, b.count) for b in seen] == [
        ("expired", 2),
        ("stale_in_flight", 2),
        ("stale_in_flight", 1),
    ]
    assert remaining() == set(recent + running + completed)
    assert not remaining() & set(crashed + expired)


@pytest.mark.django_db
def test_record_reclaimed_between_select_and_delete_survives(
    store: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired = make(5, expires_at=NOW - HOUR, scope="user:7")
    delete_batch = DatabaseStorage._delete_batch
    claims: list[Claim] = []

    def reclaim_first(self: DatabaseStorage, first: object, last: object, condition: Any) -> int:
        # A retry takes the expired key over after the SELECT picked it, before the DELETE.
        claims.append(
            store.claim("user:7", expired[0], "g" * 64, now=NOW, lease=LEASE, ttl=24 * HOUR)
        )
        return delete_batch(self, first, last, condition)

    monkeypatch.setattr(DatabaseStorage, "_delete_batch", reclaim_first)

    result = store.purge_expired(now=NOW)

    assert claims[0].won
    assert result.deleted == 4
    assert remaining() == {expired[0]}
    record = store.get("user:7", expired[0])
    assert record is not None
    assert (record.state, record.fingerprint) == (State.IN_FLIGHT, "g" * 64)


@pytest.mark.django_db
def test_max_batches_stops_and_the_next_run_continues(store: DatabaseStorage) -> None:
    make(30, expires_at=NOW - HOUR)

    first = store.purge_expired(now=NOW, batch_size=10, max_batches=2)
    second = store.purge_expired(now=NOW, batch_size=10, max_batches=2)

    assert (first.deleted, first.batches, first.stopped_by) == (20, 2, "max_batches")
    assert (second.deleted, second.batches, second.stopped_by) == (10, 1, None)
    assert remaining() == set()


@pytest.mark.django_db
def test_max_batches_also_bounds_the_stale_pass(store: DatabaseStorage) -> None:
    make(10, expires_at=NOW - HOUR)
    stale = make(3, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - HOUR)

    result = store.purge_expired(
        now=NOW, batch_size=10, max_batches=1, stale_in_flight=timedelta(0)
    )

    assert (result.deleted, result.stopped_by) == (10, "max_batches")
    assert remaining() == set(stale)


@pytest.mark.django_db
def test_time_limit_starts_no_batch_after_the_budget(
    store: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

    def one_second_per_batch(batch: PurgeBatch) -> None:
        clock[0] += 1.0

    monkeypatch.setattr(db_module, "time", FakeTime)
    make(50, expires_at=NOW - HOUR)

    result = store.purge_expired(
        now=NOW, batch_size=10, time_limit=2.5, progress=one_second_per_batch
    )

    assert (result.deleted, result.batches, result.stopped_by) == (30, 3, "time_limit")
    assert result.seconds == 3.0


@pytest.mark.django_db
def test_rejects_an_empty_batch(store: DatabaseStorage) -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        store.purge_expired(now=NOW, batch_size=0)


@pytest.mark.django_db
def test_database_errors_become_store_errors() -> None:
    with (
        unreachable_database() as alias,
        pytest.raises(StoreError, match=r"^purge failed after 0 records in 0 batches: "),
    ):
        DatabaseStorage(using=alias).purge_expired(now=NOW)


def test_the_base_store_has_nothing_to_purge() -> None:
    result = NativeStore().purge_expired(now=NOW, dry_run=True)

    assert (result.deleted, result.batches, result.dry_run) == (0, 0, True)


# The command -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_command_verbosity_0_prints_nothing() -> None:
    make(3, expires_at=NOW - HOUR)

    assert run(verbosity=0) == ""
    assert remaining() == set()


@pytest.mark.django_db
def test_command_verbosity_1_prints_one_summary_line() -> None:
    make(1, expires_at=NOW - HOUR)
    live = make(1, expires_at=NOW + HOUR)

    assert normalise(run()) == "Deleted 1 idempotency key in 1 batch (T).\n"
    assert remaining() == set(live)


@pytest.mark.django_db
def test_command_verbosity_2_prints_each_batch() -> None:
    make(25, expires_at=NOW - HOUR)
    make(1, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - 3 * HOUR)

    output = run("--batch-size", "10", "--stale-in-flight", "2h", verbosity=2)

    assert normalise(output) == (
        "Batch 1: deleted 10 expired (T)\n"
        "Batch 2: deleted 10 expired (T)\n"
        "Batch 3: deleted 5 expired (T)\n"
        "Batch 4: deleted 1 stale in-flight (T)\n"
        "Deleted 26 idempotency keys (1 stale in flight) in 4 batches (T).\n"
    )
    assert re.fullmatch(
        r"(Batch \d: .* \(\d+\.\d{3}s\)\n){4}Deleted .* \(\d+\.\d{2}s\)\.\n", output
    )
    assert remaining() == set()


@pytest.mark.django_db
def test_command_dry_run() -> None:
    make(12, expires_at=NOW - HOUR)
    before = remaining()

    output = run("--dry-run", "--batch-size", "5", verbosity=2)

    assert normalise(output) == (
        "Batch 1: would delete 5 expired (T)\n"
        "Batch 2: would delete 5 expired (T)\n"
        "Batch 3: would delete 2 expired (T)\n"
        "Dry run: would delete 12 idempotency keys in 3 batches (T).\n"
    )
    assert remaining() == before


@pytest.mark.django_db
def test_command_nothing_to_delete() -> None:
    assert normalise(run()) == "Deleted 0 idempotency keys in 0 batches (T).\n"


@pytest.mark.django_db
def test_command_older_than() -> None:
    make(2, expires_at=NOW - 8 * 24 * HOUR)
    kept = make(3, expires_at=NOW - 6 * 24 * HOUR)

    assert normalise(run("--older-than", "7d")) == "Deleted 2 idempotency keys in 1 batch (T).\n"
    assert remaining() == set(kept)


@pytest.mark.django_db
def test_command_max_batches_says_it_stopped() -> None:
    make(5, expires_at=NOW - HOUR)

    output = run("--batch-size", "2", "--max-batches", "2")

    assert normalise(output) == (
        "Deleted 4 idempotency keys in 2 batches (T). Stopped by --max-batches; more may remain.\n"
    )
    assert len(remaining()) == 1


@pytest.mark.django_db
def test_command_time_limit_says_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0])

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            # The purge starts at 0; by its first check the budget is long gone.
            return next(ticks, 100.0)

    monkeypatch.setattr(db_module, "time", FakeTime)
    make(5, expires_at=NOW - HOUR)

    output = run("--batch-size", "2", "--time-limit", "15")

    assert output == (
        "Deleted 0 idempotency keys in 0 batches (100.00s). Stopped by --time-limit; "
        "more may remain.\n"
    )
    assert len(remaining()) == 5


@pytest.mark.django_db
def test_command_accepts_durations_as_call_command_keywords() -> None:
    make(2, expires_at=NOW - 8 * 24 * HOUR)
    kept = make(1, expires_at=NOW - HOUR)
    make(1, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - 3 * HOUR)
    out = StringIO()

    call_command(
        "purge_idempotency_keys", older_than="7d", stale_in_flight="2h", batch_size=10, stdout=out
    )

    assert normalise(out.getvalue()) == (
        "Deleted 3 idempotency keys (1 stale in flight) in 2 batches (T).\n"
    )
    assert len(remaining()) == 1
    assert remaining() == set(kept)


def test_command_rejects_a_bad_duration_keyword() -> None:
    with pytest.raises(CommandError) as excinfo:
        call_command("purge_idempotency_keys", older_than="soon")

    assert str(excinfo.value) == (
        "--older-than: 'soon' is not a duration: use a whole number followed by "
        "w, d, h, m or s (7d, 36h, 90m, 45s, or a sum such as 1d12h)"
    )


@pytest.mark.django_db
def test_command_database_option() -> None:
    make(2, expires_at=NOW - HOUR)

    assert normalise(run("--database", "default")) == (
        "Deleted 2 idempotency keys in 1 batch (T).\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: '0' is not a positive whole number"),
        (["--batch-size", "many"], "argument --batch-size: 'many' is not a positive whole number"),
        (["--max-batches", "-1"], "argument --max-batches: '-1' is not a positive whole number"),
        (
            ["--time-limit", "0"],
            "argument --time-limit: '0' is not a positive number of seconds",
        ),
        (
            ["--time-limit", "soon"],
            "argument --time-limit: 'soon' is not a positive number of seconds",
        ),
        (
            ["--older-than", "7x"],
            "argument --older-than: '7x' is not a duration: use a whole number followed by "
            "w, d, h, m or s (7d, 36h, 90m, 45s, or a sum such as 1d12h)",
        ),
        (
            ["--older-than=-7d"],
            "argument --older-than: '-7d' is not a duration: use a whole number followed by "
            "w, d, h, m or s (7d, 36h, 90m, 45s, or a sum such as 1d12h)",
        ),
        (
            ["--stale-in-flight", "7"],
            "argument --stale-in-flight: '7' is not a duration: use a whole number followed by "
            "w, d, h, m or s (7d, 36h, 90m, 45s, or a sum such as 1d12h)",
        ),
    ],
)
def test_command_rejects_bad_arguments(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as excinfo:
        run(*args)

    assert str(excinfo.value) == f"Error: {message}"


def test_the_command_clock_is_aware_wall_time() -> None:
    before = datetime.now(timezone.utc)
    assert before <= REAL_CLOCK() <= datetime.now(timezone.utc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("36h", timedelta(hours=36)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(hours=36)),
        (" 0S ", timedelta(0)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert command.parse_duration(text) == expected


def test_command_rejects_an_unknown_database() -> None:
    with pytest.raises(CommandError, match=r"^--database: no database is configured as 'other'\.$"):
        run("--database", "other")


@override_settings(IDEMPOTENCY_STORE="tests.test_purge.NativeStore")
def test_command_database_needs_the_orm_store() -> None:
    with pytest.raises(
        CommandError,
        match=r"^--database applies to the ORM store; IDEMPOTENCY_STORE is NativeStore\.$",
    ):
        run("--database", "default")


@override_settings(IDEMPOTENCY_STORE="tests.test_purge.NativeStore")
@pytest.mark.parametrize("args", [[], ["--dry-run", "--older-than", "7d", "--batch-size", "5"]])
def test_command_native_expiry(args: list[str]) -> None:
    assert (
        run(*args) == "NativeStore expires idempotency keys natively; there is nothing to purge.\n"
    )
    assert run(*args, verbosity=0) == ""


@override_settings(
    IDEMPOTENCY_STORE="cache",
    IDEMPOTENCY_CACHE_ALIAS="default",
    CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
)
def test_command_with_the_cache_store() -> None:
    # A non-Redis cache: "cache" stands for the add() store there.
    assert run("--dry-run") == (
        "CacheAddStorage expires idempotency keys natively; there is nothing to purge.\n"
    )


@pytest.mark.django_db
def test_command_failure_is_a_command_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: DatabaseStorage, **kwargs: object) -> None:
        raise StoreError("purge failed after 0 records in 0 batches: OperationalError: gone")

    monkeypatch.setattr(DatabaseStorage, "purge_expired", broken)

    with pytest.raises(CommandError) as excinfo:
        run()

    assert str(excinfo.value) == (
        "Purging idempotency keys failed: purge failed after 0 records in 0 batches: "
        "OperationalError: gone"
    )
    assert excinfo.value.returncode == 1


@pytest.mark.django_db(transaction=True)
def test_command_failure_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self: DatabaseStorage, **kwargs: object) -> None:
        raise StoreError("boom")

    monkeypatch.setattr(DatabaseStorage, "purge_expired", broken)

    with pytest.raises(SystemExit) as excinfo:
        command.Command().run_from_argv(["manage.py", "purge_idempotency_keys", "--skip-checks"])

    assert excinfo.value.code == 1
    assert capsys.readouterr().err == "CommandError: Purging idempotency keys failed: boom\n"


# Concurrency -------------------------------------------------------------------------------


@pytest.fixture
def _close_connections() -> Iterator[None]:
    yield
    connections.close_all()


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_close_connections")
def test_claims_keep_working_while_a_purge_runs() -> None:
    """Claims on fresh keys and on expired keys the purge is deleting all win, exactly once."""
    expired = make(600, expires_at=NOW - HOUR, scope="user:old")
    make(1500, expires_at=NOW - HOUR, scope="user:other")
    fresh = [f"{n:064x}" for n in range(300)]
    wanted = [("user:old", h) for h in expired[::2]] + [("user:new", h) for h in fresh]
    start = threading.Barrier(2)
    claims: list[Claim] = []
    errors: list[BaseException] = []
    purged: list[int] = []

    def claimer() -> None:
        store = DatabaseStorage()
        try:
            start.wait()
            for scope, key_hash in wanted:
                claims.append(
                    store.claim(scope, key_hash, "c" * 64, now=NOW, lease=LEASE, ttl=HOUR)
                )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    def purger() -> None:
        store = DatabaseStorage()
        try:
            start.wait()
            purged.append(store.purge_expired(now=NOW, batch_size=50).deleted)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=claimer), threading.Thread(target=purger)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert len(claims) == len(wanted)
    assert all(claim.won for claim in claims)
    rows = set(IdempotencyKey.objects.values_list("scope", "key_hash", "state", "expires_at"))
    assert rows == {(scope, h, State.IN_FLIGHT.value, NOW + HOUR) for scope, h in wanted}
    # Every expired record went, either deleted by the purge or taken over by a claim.
    assert 1500 + 300 <= purged[0] <= 1500 + 600


@pytest.mark.django_db
@pytest.mark.parametrize("batch_size", [3, 1000])
def test_dry_run_reports_exactly_what_the_real_run_deletes(batch_size: int) -> None:
    # Crashed claims that are also expired match both conditions: the expired pass owns them.
    both = make(7, expires_at=NOW - HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - 3 * HOUR)
    expired = make(5, expires_at=NOW - HOUR)
    stale = make(4, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - 3 * HOUR)
    live = make(3, expires_at=NOW + HOUR)
    running = make(2, expires_at=NOW + HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW + LEASE)
    args = ("--stale-in-flight", "2h", "--batch-size", str(batch_size))
    batches = {3: "6 batches", 1000: "2 batches"}[batch_size]

    dry = normalise(run(*args, "--dry-run"))
    assert remaining() == set(both + expired + stale + live + running)
    real = normalise(run(*args))

    assert (
        dry == f"Dry run: would delete 16 idempotency keys (4 stale in flight) in {batches} (T).\n"
    )
    assert real == f"Deleted 16 idempotency keys (4 stale in flight) in {batches} (T).\n"
    assert remaining() == set(live + running)

    store = DatabaseStorage()
    make(2, expires_at=NOW - HOUR, state=State.IN_FLIGHT, lease_expires_at=NOW - 3 * HOUR)
    counted = store.purge_expired(now=NOW, stale_in_flight=2 * HOUR, dry_run=True)
    deleted = store.purge_expired(now=NOW, stale_in_flight=2 * HOUR)
    assert (counted.deleted, counted.stale_in_flight, counted.batches) == (2, 0, 1)
    assert (deleted.deleted, deleted.stale_in_flight, deleted.batches) == (2, 0, 1)
