"""How long ``manage.py idempotency_stats`` takes on a large ORM table (PostgreSQL).

Run from the repository root (PostgreSQL settings come from the usual ``PG*`` variables)::

    python bench/stats_bench.py                 # 1,000,000 rows
    python bench/stats_bench.py --rows 200000

It creates its own database, fills it with the same ``INSERT ... SELECT generate_series`` as
``bench/purge_bench.py`` (expired and live rows interleaved, one in ten live rows in flight),
runs the command three times (text, then ``--json`` twice) and prints each run's wall time,
then drops the database. It exits non-zero when a run takes longer than 10 s.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

from bench.purge_bench import admin_sql, fill, server_settings  # noqa: E402

TARGET_SECONDS = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database", default="idem_stats_bench")
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
        return run(args.rows)
    finally:
        from django.db import connections

        connections.close_all()
        admin_sql(f'DROP DATABASE IF EXISTS "{args.database}"')


def run(rows: int) -> int:
    from django.core.management import call_command

    call_command("migrate", "django_idempotency", verbosity=0)
    live = rows // 5
    fill_seconds = fill(rows - live, live)
    print(f"filled {rows:,} rows ({live:,} live) in {fill_seconds:.1f}s")
    worst = 0.0
    for args in ([], ["--json"], ["--json"]):
        out = io.StringIO()
        began = time.monotonic()
        call_command("idempotency_stats", *args, stdout=out)
        elapsed = time.monotonic() - began
        worst = max(worst, elapsed)
        print(f"idempotency_stats {' '.join(args) or '(text)'}: {elapsed:.2f}s")
        if not args:
            print(out.getvalue())
    ok = worst <= TARGET_SECONDS
    print(f"slowest run {worst:.2f}s (target {TARGET_SECONDS:.0f}s): {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
