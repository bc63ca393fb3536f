"""Create the example's PostgreSQL database if it is missing (``run.py`` calls it in production).

It runs in the example's virtualenv, where psycopg is installed, and connects to the ``postgres``
maintenance database with the same ``PG*`` variables as ``settings.py``.
"""

from __future__ import annotations

import os

import psycopg
from psycopg import sql


def main() -> None:
    name = os.environ.get("PGDATABASE", "django_idempotency_example")
    with psycopg.connect(
        dbname="postgres",
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER", "postgres"),
        password=os.environ.get("PGPASSWORD", ""),
        autocommit=True,
    ) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"Created the PostgreSQL database {name}")


if __name__ == "__main__":
    main()
