"""What ``purge_idempotency_keys`` costs on a big PostgreSQL table.

Run from the repository root (PostgreSQL settings come from the usual ``PG*`` variables)::

    PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres .venv/bin/python bench/purge_bench.py

Options: ``--expired`` and ``--live`` (rows, default 1,000,000 and 200,000), ``--batch-size``
(default: the command's), ``--with-claims`` (a second process claims keys before and during the
purge and reports its claim latencies), ``--database`` (default ``idem_bench``), ``--keep`` (leave
the database behind for inspection).

The script creates its own database, migrates it, fills it with one ``INSERT ... SELECT`` over
``generate_series`` (expired and live rows interleaved, so every batch walks past live rows, the
harder case for a primary-key walk), runs the purge through the ORM store as the command does, and
drops the database again. It exits non-zero when a target is missed: the expired rows gone in
under 60 s, peak memory under 150 MB, no batch longer than 1 s (a batch's SELECT and DELETE
together bound how long any row lock is held), every live row still there.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time
import tracemalloc
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

TARGET_SECONDS = 60.0
TARGET_MEMORY_MB = 150.0
TARGET_BATCH_SECONDS = 1.0


def server_settings(name: str) -> dict[str, str]:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
    }


def admin_sql(statement: str) -> None:
    """CREATE and DROP DATABASE cannot run in a transaction, so use a bare autocommit link."""
    import psycopg

    db = server_settings("postgres")
    with psycopg.connect(
        host=db["HOST"],
        port=db["PORT"],
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    ) as conn:
        conn.execute(statement)


FILL = """
INSERT INTO django_idempotency_idempotencykey (
    scope, key_hash, fingerprint, state, owner_token, created_at, lease_expires_at, expires_at,
    response_status, response_headers, response_body
)
SELECT
    'user:' || (g %% 5000),
    md5(g::text) || md5((g + 1)::text),
    md5((-g)::text) || md5((-g - 1)::text),
    CASE WHEN live AND g %% 10 = 0 THEN 'in_flight' ELSE 'completed' END,
    left(md5((g * 7)::text), 32),
    base - interval '24 hours',
    CASE WHEN live AND g %% 10 = 0 THEN now() + interval '1 hour'
         ELSE base - interval '24 hours' + interval '60 seconds' END,
    base,
    201,
    '[["Content-Type", "application/json"], ["Location", "/payments/1"]]'::jsonb,
    convert_to(repeat('{"id": 1, "amount": 1000, "currency": "eur"} ', 6), 'UTF8')
FROM (
    SELECT g, (g %% %(every)s = 0) AS live,
           CASE WHEN g %% %(every)s = 0
                THEN now() + interval '1 hour' + (g %% 3600) * interval '1 second'
                ELSE now() - interval '1 hour' - (g %% 86400) * interval '1 second' END AS base
    FROM generate_series(1, %(total)s) AS g
) AS rows
"""


def fill(expired: int, live: int) -> float:
    """Every ``every``-th row is live, the rest expired: live rows sit between expired ones."""
    from django.db import connection

    total = expired + live
    every = max(1, round(total / live)) if live else total + 1
    began = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute(FILL, {"every": every, "total": total})
        cursor.execute("VACUUM ANALYZE django_idempotency_idempotencykey")
    return time.monotonic() - began


def count(live_at: object) -> tuple[int, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), count(*) FILTER (WHERE expires_at > %s) "
            "FROM django_idempotency_idempotencykey",
            [live_at],
        )
        total, live = cursor.fetchone()
    return int(total), int(live)


def claim_loop(stop: Event, purging: Event, results: Connection) -> None:
    from django.db import connections
    from django.utils import timezone

    from django_idempotency.storage.db import DatabaseStorage

    store = DatabaseStorage()
    before: list[float] = []
    during: list[float] = []
    lost = 0
    n = 0
    try:
        while not stop.is_set():
            n += 1
            began = time.monotonic()
            claim = store.claim(
                "bench:probe",
                f"{n:064x}",
                "p" * 64,
                now=timezone.now(),
                lease=timedelta(seconds=60),
                ttl=timedelta(hours=1),
            )
            (during if purging.is_set() else before).append(time.monotonic() - began)
            lost += not claim.won
    finally:
        connections.close_all()
        results.send((before, during, lost))


class ClaimProbe:
    """A second process, as a web worker would be, claims fresh keys back to back.

    Its claim latencies before and during the purge show what the purge costs requests. A
    process rather than a thread, so that the GIL and tracemalloc do not slow it down.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Event()
        self.purging = ctx.Event()
        self._results, sender = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=claim_loop, args=(self.stop, self.purging, sender), daemon=True
        )
        self.before: list[float] = []
        self.latencies: list[float] = []
        self.failures = 0

    def start(self) -> None:
        from django.db import connections

        connections.close_all()  # the child opens its own connection
        self._process.start()

    def join(self) -> None:
        self.before, self.latencies, self.failures = self._results.recv()
        self._process.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expired", type=int, default=1_000_000)
    parser.add_argument("--live", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--with-claims", action="store_true")
    parser.add_argument("--database", default="idem_bench")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    admin_sql(f'DROP DATABASE IF EXISTS "{args.database}"')
    admin_sql(f'CREATE DATABASE "{args.database}"')
    settings.configure(
        DATABASES={"default": server_settings(args.database)},
        INSTALLED_APPS=["django_idempotency"],
        USE_TZ=True,
        TIME_ZONE="UTC",
    )
    django.setup()
    try:
        return run(args)
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            admin_sql(f'DROP DATABASE IF EXISTS "{args.database}"')


def run(args: argparse.Namespace) -> int:
    from django.core.management import call_command
    from django.utils import timezone

    from django_idempotency.storage.base import PURGE_BATCH_SIZE
    from django_idempotency.storage.db import DatabaseStorage

    if args.batch_size is None:
        args.batch_size = PURGE_BATCH_SIZE
    call_command("migrate", "django_idempotency", verbosity=0)
    fill_seconds = fill(args.expired, args.live)
    now = timezone.now()
    total_before, live_before = count(now)
    print(
        f"filled {total_before:,} rows ({total_before - live_before:,} expired, "
        f"{live_before:,} live) in {fill_seconds:.1f}s"
    )

    probe = ClaimProbe() if args.with_claims else None
    if probe is not None:
        probe.start()
        time.sleep(3)  # claims alone first, for a baseline
        probe.purging.set()
    tracemalloc.start()
    began = time.monotonic()
    result = DatabaseStorage().purge_expired(now=now, batch_size=args.batch_size)
    elapsed = time.monotonic() - began
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if probe is not None:
        probe.stop.set()
        probe.join()

    total_after, live_after = count(now)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    longest = max(result.batch_seconds, default=0.0)
    expected_live = live_before
    if probe is not None:
        expected_live += len(probe.before) + len(probe.latencies)

    print(f"batch size            {args.batch_size:,}")
    print(f"deleted               {result.deleted:,} rows in {result.batches:,} batches")
    print(f"total time            {elapsed:.2f}s")
    print(f"rows per second       {result.deleted / elapsed:,.0f}")
    print(f"longest batch         {longest * 1000:.1f} ms")
    print(f"median batch          {statistics.median(result.batch_seconds or [0]) * 1000:.1f} ms")
    print(f"peak RSS (process)    {rss_mb:.1f} MiB")
    print(f"peak traced (purge)   {traced_peak / 2**20:.2f} MiB")
    print(f"live rows after       {live_after:,} of {expected_live:,}")
    if probe is not None:
        for label, latencies in (
            ("claims before purge", probe.before),
            ("claims during purge", probe.latencies),
        ):
            print(
                f"{label:<22}{len(latencies):,}, median "
                f"{statistics.median(latencies or [0]) * 1000:.1f} ms, slowest "
                f"{max(latencies, default=0) * 1000:.1f} ms"
            )
        print(f"claims lost           {probe.failures}")

    checks = {
        f"expired rows gone in under {TARGET_SECONDS:.0f}s": elapsed < TARGET_SECONDS,
        f"peak memory under {TARGET_MEMORY_MB:.0f} MB": rss_mb < TARGET_MEMORY_MB,
        f"no batch over {TARGET_BATCH_SECONDS:.0f}s": longest < TARGET_BATCH_SECONDS,
        "every expired row deleted": result.deleted == total_before - live_before,
        "every live row survived": live_after == total_after == expected_live,
    }
    if probe is not None:
        checks["every concurrent claim won"] = probe.failures == 0
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
